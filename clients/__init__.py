"""Clients of the flover Triton models: streaming calls, a CLI, load generators and benchmarks."""
