"""The CPU's C kernels as the engine builds them, for the tests that call them directly."""

from __future__ import annotations

from types import ModuleType

from flover_backend.paths import kernels_dir


def built(kernel_module: ModuleType):
    """`kernel_module.load()` into the engine's kernel folder; the tests need a C compiler, so None fails."""
    kernel = kernel_module.load(kernels_dir())
    assert kernel is not None, f"{kernel_module.__name__} must build where the tests run"
    return kernel
