"""Llama family (Llama 1-3, Mistral, Qwen2/2.5, Gemma) with HF parameter names, over the KV arena."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flover_backend.execution.layers.attention import ForwardBatch, KVLayers, arena_attention
from flover_backend.execution.layers.linear import (
    MergedColumnParallelLinear,
    PackedLinear,
    RowParallelLinear,
    can_pack,
    pack_linears,
)
from flover_backend.execution.layers.ops import UsesKernels
from flover_backend.native.elementwise import ElementwiseKernels, applies
from flover_backend.native.small_gemm import SmallGemmKernel

# Gemma's "gelu" is the tanh approximation too: transformers rewrites it so (huggingface/transformers#29402).
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig:
    """The shape of a Llama-family checkpoint, read from its HF `config.json`; Qwen2 and Gemma are flags on it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # keys this far behind a query or more are hidden, on sliding layers
    layer_types: list[str] | None = None  # one of LAYER_TYPES per layer; None, or no window: all see every key
    rms_norm_unit_offset: bool = False  # Gemma: norms scale by (1 + weight)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"hidden_act {self.hidden_act!r} (implemented: {sorted(ACTIVATIONS)})")
        layer_types = self.layer_types or []
        if not set(layer_types) <= set(LAYER_TYPES) or len(layer_types) not in (0, self.num_layers):
            raise NotImplementedError(f"layer_types {layer_types} (one of {LAYER_TYPES} per layer is implemented)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    def per_rank(self, world: int) -> LlamaConfig:
        """One of `world` tensor-parallel ranks' share: 1/world of the heads, KV heads and MLP columns."""
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) % world:
                raise ValueError(f"tensor_parallel_size {world} does not divide {name}={getattr(self, name)}")
        return dataclasses.replace(self, num_heads=self.num_heads // world, num_kv_heads=self.num_kv_heads // world,
                                   intermediate_size=self.intermediate_size // world)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Read an HF Llama/Mistral/Qwen2/Gemma config dict, refusing features this model does not implement."""
        model_type = cfg.get("model_type", "llama")
        hidden_act = cfg.get("hidden_act", "silu")
        if model_type == "gemma" and hidden_act == "gelu":
            hidden_act = "gelu_pytorch_tanh"
        # transformers >= 5 writes `rope_parameters`; older checkpoints write `rope_theta` + `rope_scaling`.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope scaling type {rope_type!r} (only unscaled RoPE is implemented)")
        if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise NotImplementedError("partial_rotary_factor != 1 is not implemented")
        num_heads, num_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        # Mistral slides every layer; Qwen2 only with use_sliding_window, and from layer max_window_layers on.
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        first_sliding = cfg.get("max_window_layers", 0) if window else num_layers
        layer_types = cfg.get("layer_types") or [LAYER_TYPES[i >= first_sliding] for i in range(num_layers)]
        attention_bias = cfg.get("attention_bias", False)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            hidden_act=hidden_act,
            qkv_bias=attention_bias or model_type == "qwen2",  # Qwen2: q/k/v biases, none on o_proj
            o_proj_bias=attention_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=window,
            layer_types=layer_types,
            rms_norm_unit_offset=model_type == "gemma",
            scale_embeddings=model_type == "gemma",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )


class RMSNorm(UsesKernels, nn.Module):
    """Root-mean-square norm, computed in float32 like HF so bf16 runs match it; Gemma's scales by (1 + weight)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.ones(dim))

    def takes(self, kernels: ElementwiseKernels) -> bool:
        """Gemma's (1 + weight) norm keeps torch's operators."""
        return not self.unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension and scale it."""
        if self.kernels is not None and applies(x, self.weight):
            return self.kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma scales before rounding to the model's dtype, Llama after
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of that): the residual add and the next norm, one kernel call where it runs.
        `x` may be updated in place."""
        if self.kernels is not None and applies(x, delta, self.weight):
            return self.kernels.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rope_tables(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, (max_position_embeddings, head_dim) each, float32 on CPU."""
    hd = config.head_dim
    # Same float32 arithmetic as HF so the tables agree bit for bit; device="cpu" keeps them real
    # even when the model is built under torch.device("meta").
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device="cpu") / hd))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device="cpu")
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, n, T, hd) by per-token angles; cos/sin are (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(UsesKernels, nn.Module):
    """Grouped-query attention with RoPE; the arena holds the keys and values. q, k and v are one matmul."""

    def __init__(self, config: LlamaConfig, layer_idx: int, rank: int, world: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads  # this rank's
        self.head_dim = config.head_dim
        sliding = config.layer_types and config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedColumnParallelLinear(config.hidden_size, [q_width, kv_width, kv_width], config.qkv_bias)
        self.o_proj = RowParallelLinear(q_width, config.hidden_size, config.o_proj_bias, rank, world)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Project, rotate, attend through the arena and project back."""
        B, T, _ = x.shape
        kv_width = self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        rotated = self.kernels is not None and applies(qkv, cos, sin)
        if rotated:  # q's and k's heads lead each token's row: rotate them in place, in one call
            self.kernels.rope_(qkv.view(B * T, -1), self.num_heads + self.num_kv_heads, self.head_dim, cos, sin)
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if not rotated:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = arena_attention(q, k, v, k_cache, v_cache, batch, self.sliding_window)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LlamaMLP(UsesKernels, nn.Module):
    """Gated feed-forward (SwiGLU; Gemma's GeGLU); gate and up are one matmul."""

    def __init__(self, config: LlamaConfig, rank: int, world: int):
        super().__init__()
        self.act, self.swiglu = ACTIVATIONS[config.hidden_act], config.hidden_act == "silu"
        bias = config.mlp_bias
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, rank, world)

    def takes(self, kernels: ElementwiseKernels) -> bool:
        """SwiGLU only: Gemma's GeGLU keeps torch's operators."""
        return self.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x))."""
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None and applies(gate_up):
            return self.down_proj(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: LlamaConfig, layer_idx: int, rank: int, world: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_unit_offset)
        self.self_attn = LlamaAttention(config, layer_idx, rank, world)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_unit_offset)
        self.mlp = LlamaMLP(config, rank, world)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Attention then MLP, each added to the residual stream."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache)
        x, normed = self.post_attention_layernorm.add_forward(x, attended)
        return x + self.mlp(normed)


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig, rank: int, world: int):
        super().__init__()
        # Left uninitialised: weights always come from a checkpoint, and Embedding's normal_ init on
        # the meta device imports torch._dynamo (seconds at startup).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, rank, world) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_unit_offset)


class Llama(nn.Module):
    """Llama causal LM: `forward` gives normed hidden states, `compute_logits` applies the LM head.

    Built as tensor-parallel rank `rank` of `world`: each rank holds its heads and MLP columns, and one
    all-reduce after attention and one after the MLP give every rank the whole hidden state; embeddings,
    norms and the LM head stay whole.
    """

    config_class: ClassVar[type] = LlamaConfig
    # Checkpoint projections served stacked: {checkpoint module: (stacked module, its part there)}.
    stacked_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: LlamaConfig, rank: int = 0, world: int = 1):
        super().__init__()
        self.config = config = config.per_rank(world)  # this rank's heads and MLP columns
        self.model = LlamaModel(config, rank, world)
        # Tied checkpoints have no lm_head.weight; the head then reads the embedding matrix directly,
        # so the loader never has to re-tie parameters it allocated.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # A buffer, so it is rounded to the served dtype as HF rounds it (sqrt(3072) is 55.5 in bf16).
        scale = torch.tensor(config.hidden_size**0.5, device="cpu") if config.scale_embeddings else None
        self.register_buffer("embed_scale", scale, persistent=False)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv: KVLayers) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden) final-normed states; writes this step's keys into `kv`."""
        # One gather per step, shared by every layer: (B, 1, T, hd) broadcasts over heads.
        cos = self.rope_cos[batch.positions].unsqueeze(1)
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, batch, *kv.layer(i))
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def prepack(self, batch_hint: int, small_gemm: SmallGemmKernel | None = None) -> None:
        """Lay every matmul weight out for fast small-batch decoding on CPU (a no-op where oneDNN can't)."""
        if self.lm_head is None and can_pack(self.model.embed_tokens.weight):
            self.lm_head = PackedLinear(self.model.embed_tokens.weight, None, batch_hint, small_gemm, tied=True)
        pack_linears(self, batch_hint, small_gemm)
