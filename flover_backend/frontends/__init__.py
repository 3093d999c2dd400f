"""The fronts clients talk to: the Triton Python model and the OpenAI-compatible API."""
