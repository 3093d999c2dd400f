"""Engine settings: one validated dataclass shared by Triton parameters, the CLI and tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flover_backend.admission import AdmissionLimits

POLICIES = ("fused", "window", "solo")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    """What model to serve and how the single inference loop schedules it."""

    model: str = "builtin:small"
    max_num_seqs: int = 32
    max_model_len: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    policy: str = "fused"
    window_ms: float = 100.0
    max_batch: int = 0  # window policy: batch size that closes the window early; 0 means max_num_seqs
    compaction: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    seed: int = 0  # seed for requests that ask for sampling without their own seed
    tensor_parallel_size: int = 1  # ranks that split the model's heads and MLP columns
    cuda_graphs: bool = True  # replay the decode step as CUDA graphs; only on CUDA with tensor_parallel_size 1
    native_attention: bool = True  # CPU fp32 decode attention in the compiled kernel (native/decode_attention.c)
    # With native_attention: decode rows holding copies of one reused prefix read it once for all of them
    shared_prefix_attention: bool = True
    native_elementwise: bool = True  # CPU fp32 RMSNorm, rotary and SwiGLU in native/elementwise.c (Llama family)
    native_small_gemm: bool = True  # CPU fp32 linear layers at 1-12 rows in native/small_gemm.c (own weight layout)
    native_sampling: bool = True  # CPU sampling pass (top-k / top-p floors, race) in native/sampling.c
    max_prefill_tokens: int = 256  # prompt tokens written per iteration (chunked prefill); 0: whole prompts
    max_num_waiting: int = 1024  # requests queued for a row beyond this are refused at once as "busy"
    max_prompt_bytes: int = 0  # a text prompt's UTF-8 bytes, checked before tokenizing; 0: 32 x max_model_len
    prefix_caching: bool = True  # a prompt copies the keys of its longest start that a live or retained row holds
    max_retained_prefixes: int = 8  # finished requests' rows kept for prefix reuse; an arrival takes one back first
    log_prompts: bool = False  # the INFO line logged per finished request also holds its prompt text
    # CUDA only: > 0 sizes the arena from free device memory (as vLLM's setting does): max_num_seqs is then the
    # cap, and the engine takes as many rows as this share of the card holds beside what is in use; 0: exactly
    # max_num_seqs rows.
    gpu_memory_utilization: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {self.window_ms}")
        if not 0 <= self.max_batch <= self.max_num_seqs:
            raise ValueError(f"max_batch must be in [0, max_num_seqs={self.max_num_seqs}], got {self.max_batch}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_prefill_tokens < 0:
            raise ValueError(f"max_prefill_tokens must be >= 0, got {self.max_prefill_tokens}")
        if self.max_num_waiting < 0:
            raise ValueError(f"max_num_waiting must be >= 0, got {self.max_num_waiting}")
        if self.max_prompt_bytes < 0:
            raise ValueError(f"max_prompt_bytes must be >= 0, got {self.max_prompt_bytes}")
        if self.max_retained_prefixes < 0:
            raise ValueError(f"max_retained_prefixes must be >= 0, got {self.max_retained_prefixes}")
        if not 0.0 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0, 1], got {self.gpu_memory_utilization}")
        if self.gpu_memory_utilization and self.tensor_parallel_size > 1:
            raise ValueError("gpu_memory_utilization sizes one GPU's arena: use it with tensor_parallel_size 1")
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def admission(self) -> AdmissionLimits:
        """The bounds on one request's prompt and length that these settings make."""
        return AdmissionLimits(self.max_model_len, self.max_prompt_bytes)

    @property
    def prompt_byte_limit(self) -> int:
        """Longest text prompt in UTF-8 bytes (see admission)."""
        return self.admission.prompt_byte_limit

    @property
    def batch_limit(self) -> int:
        """How many requests the window policy admits into one batch."""
        return self.max_batch or self.max_num_seqs

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineConfig:
        """Build from string or typed values (Triton parameters, CLI); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}; known: {sorted(fields)}")
        return cls(**{name: _coerce(name, fields[name].type, value) for name, value in values.items()})


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """Turn a Triton string parameter into the field's type, naming the field on failure."""
    if not isinstance(value, str) or type_name == "str":
        return value
    try:
        if type_name == "bool":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        return {"int": int, "float": float}[type_name](value)
    except ValueError:
        raise ValueError(f"engine setting {name!r} must be a {type_name}, got {value!r}") from None
