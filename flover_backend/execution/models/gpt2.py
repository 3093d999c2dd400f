"""GPT-2 with HF `GPT2LMHeadModel` parameter names, over the KV arena."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flover_backend.execution.layers.attention import ForwardBatch, KVLayers, arena_attention
from flover_backend.native.small_gemm import SmallGemmKernel


@dataclass
class GPT2Config:
    """The shape of a GPT-2 checkpoint, read from its HF `config.json`."""

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of n_head={self.num_heads}")

    @property
    def num_kv_heads(self) -> int:
        """GPT-2 caches one key/value head per query head."""
        return self.num_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GPT2Config:
        """Read an HF GPT-2 config dict, refusing features this model does not implement."""
        if cfg.get("activation_function", "gelu_new") != "gelu_new":
            raise NotImplementedError(f"activation_function {cfg['activation_function']!r} (only gelu_new)")
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
            raise NotImplementedError("only the standard 1/sqrt(head_dim) attention scale is implemented")
        if cfg.get("add_cross_attention", False):
            raise NotImplementedError("cross-attention is not implemented")
        # reorder_and_upcast_attn only changes float precision inside attention; SDPA's is good enough.
        hidden = cfg.get("n_embd", 768)
        return cls(
            vocab_size=cfg.get("vocab_size", 50257),
            hidden_size=hidden,
            num_layers=cfg.get("n_layer", 12),
            num_heads=cfg.get("n_head", 12),
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            max_position_embeddings=cfg.get("n_positions", 1024),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            bos_token_id=cfg.get("bos_token_id", 50256),
            eos_token_id=cfg.get("eos_token_id", 50256),
        )


class Conv1D(nn.Module):
    """HF's Conv1D: a linear layer whose weight is stored (in, out).

    Keeping HF's layout (instead of transposing into nn.Linear at load time) lets checkpoints load
    and save byte for byte with no special cases; x @ W costs the same as x @ W.T in a GEMM.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))  # filled from the checkpoint
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W + b over the last dimension."""
        out_shape = (*x.shape[:-1], self.weight.shape[1])
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(out_shape)


class GPT2Attention(nn.Module):
    """Multi-head attention with a fused q/k/v projection."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.c_attn = Conv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Project, attend through the arena and project back."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        y = arena_attention(q, k, v, k_cache, v_cache, batch)  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    """Feed-forward with the tanh-approximated GELU (HF's gelu_new)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """c_proj(gelu(c_fc(x)))."""
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Attention then MLP, each added to the residual stream."""
        x = x + self.attn(self.ln_1(x), batch, k_cache, v_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    """Token and position embeddings, blocks and final norm (HF's `transformer.` prefix)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        # Left uninitialised: weights always come from a checkpoint, and Embedding's normal_ init on
        # the meta device imports torch._dynamo (seconds at startup).
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size,
                                _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                _weight=torch.empty(config.max_position_embeddings, config.hidden_size))
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class GPT2(nn.Module):
    """GPT-2 causal LM: `forward` gives normed hidden states, `compute_logits` applies the LM head."""

    config_class: ClassVar[type] = GPT2Config
    stacked_modules: ClassVar[dict[str, tuple[str, int]]] = {}  # the checkpoint's c_attn is q/k/v stacked already

    def __init__(self, config: GPT2Config, rank: int = 0, world: int = 1):
        super().__init__()
        if world > 1:
            raise ValueError("GPT-2 cannot be split for tensor parallelism (its Conv1D weights have no parallel "
                             "layout here); serve it with tensor_parallel_size 1")
        self.config = config
        self.transformer = GPT2Transformer(config)
        # Tied (the usual case): no lm_head.weight of our own, the head reads wte directly.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv: KVLayers) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden) final-normed states; writes this step's keys into `kv`."""
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(batch.positions)  # (B, T, hidden)
        for i, block in enumerate(t.h):
            x = block(x, batch, *kv.layer(i))
        return t.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def prepack(self, batch_hint: int, small_gemm: SmallGemmKernel | None = None) -> None:
        """Nothing to lay out: Conv1D keeps HF's (in, out) weights, which oneDNN's linear packing does not take."""
