"""The Triton Python-backend face of the engine: request parsing, the adapter, metrics."""
