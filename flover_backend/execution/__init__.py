"""Execution: the model runner, the KV arena, CUDA graphs, layers and model families."""
