"""Sampling: request parameters, the batched sampler, penalties and logprobs."""
