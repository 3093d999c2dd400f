"""Triton loads this file; the adapter lives in the package so it is tested and shared by every model."""

from flover_backend.frontends.triton.adapter import TritonPythonModel

__all__ = ["TritonPythonModel"]
