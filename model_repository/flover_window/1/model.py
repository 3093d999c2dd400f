"""Triton loads this file; the adapter lives in the package so it is tested and shared by every model."""

from flover_backend.triton_model.adapter import TritonPythonModel

__all__ = ["TritonPythonModel"]
