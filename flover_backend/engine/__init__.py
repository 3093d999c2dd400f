"""The engine: one loop, its scheduler, requests and their outputs."""
