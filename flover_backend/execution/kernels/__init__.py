"""Triton-language kernels of a Llama decode step for the GPU, each in its own file beside its torch reference.

`TRITON_INTERPRET=1` (set before triton is imported) runs the same kernels on CPU tensors, which is how the
tests check them against the references without a GPU. Not wired into the model yet: see the README.
"""
