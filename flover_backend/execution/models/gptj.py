"""GPT-J with HF `GPTJForCausalLM` parameter names, over the KV arena."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flover_backend.execution.layers.attention import ForwardBatch, KVLayers, arena_attention
from flover_backend.execution.layers.linear import MergedColumnParallelLinear, RowParallelLinear, pack_linears
from flover_backend.native.small_gemm import SmallGemmKernel


@dataclass
class GPTJConfig:
    """The shape of a GPT-J checkpoint, read from its HF `config.json`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    rotary_dim: int  # the first rotary_dim features of each head are rotated, the rest pass through
    max_position_embeddings: int
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")

    @property
    def num_kv_heads(self) -> int:
        """GPT-J caches one key/value head per query head."""
        return self.num_heads

    def per_rank(self, world: int) -> GPTJConfig:
        """One of `world` tensor-parallel ranks' share: 1/world of the heads and MLP columns."""
        for name in ("num_heads", "intermediate_size"):
            if getattr(self, name) % world:
                raise ValueError(f"tensor_parallel_size {world} does not divide {name}={getattr(self, name)}")
        return dataclasses.replace(self, num_heads=self.num_heads // world,
                                   intermediate_size=self.intermediate_size // world)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GPTJConfig:
        """Read an HF GPT-J config dict, refusing features this model does not implement."""
        if cfg.get("activation_function", "gelu_new") != "gelu_new":
            raise NotImplementedError(f"activation_function {cfg['activation_function']!r} (only gelu_new)")
        if cfg.get("tie_word_embeddings", False):
            raise NotImplementedError("tied word embeddings (GPT-J's lm_head has its own weight and bias)")
        hidden, num_heads = cfg.get("n_embd", 4096), cfg.get("n_head", 16)
        if hidden % num_heads:
            raise ValueError(f"n_embd={hidden} is not a multiple of n_head={num_heads}")
        return cls(
            vocab_size=cfg.get("vocab_size", 50400),
            hidden_size=hidden,
            num_layers=cfg.get("n_layer", 28),
            num_heads=num_heads,
            head_dim=hidden // num_heads,
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            rotary_dim=cfg.get("rotary_dim") or hidden // num_heads,  # None: all of each head rotates
            max_position_embeddings=cfg.get("n_positions", 2048),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            bos_token_id=cfg.get("bos_token_id", 50256),
            eos_token_id=cfg.get("eos_token_id", 50256),
        )


def rotary_tables(config: GPTJConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, (max_position_embeddings, rotary_dim) each, float32 on CPU.

    Each angle is repeated for the two features of its pair, as GPT-J rotates (0, 1), (2, 3), ...; the
    arithmetic is HF's, so the tables agree bit for bit.
    """
    dim = config.rotary_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu") / dim))
    angles = torch.arange(config.max_position_embeddings, device="cpu").float()[:, None] * inv_freq
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def rotate_every_two(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of (B, n, T, hd) in adjacent pairs; cos/sin are (B, 1, T, rotary_dim)."""
    rot, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    pairs = rot.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class GPTJAttention(nn.Module):
    """Multi-head attention with partial rotary positions; q, k and v (no biases) are one matmul."""

    def __init__(self, config: GPTJConfig, rank: int, world: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim  # this rank's heads
        width = self.num_heads * self.head_dim
        self.qkv_proj = MergedColumnParallelLinear(config.hidden_size, [width] * 3, bias=False)
        # Not reduced here: the block sums attention and MLP first and all-reduces once.
        self.out_proj = RowParallelLinear(width, config.hidden_size, False, rank, world, reduce_results=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Project, rotate, attend through the arena and project back (this rank's partial sum)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q, k = rotate_every_two(q, cos, sin), rotate_every_two(k, cos, sin)
        y = arena_attention(q, k, v, k_cache, v_cache, batch)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class GPTJMLP(nn.Module):
    """Feed-forward with the tanh-approximated GELU (HF's gelu_new)."""

    def __init__(self, config: GPTJConfig, rank: int, world: int):
        super().__init__()
        self.fc_in = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size], bias=True)
        self.fc_out = RowParallelLinear(config.intermediate_size, config.hidden_size, True, rank, world,
                                        reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc_out(gelu(fc_in(x))) (this rank's partial sum)."""
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class GPTJBlock(nn.Module):
    """Parallel block: attention and MLP both read ln_1(x), and both add to the residual stream."""

    def __init__(self, config: GPTJConfig, rank: int, world: int):
        super().__init__()
        self.world = world
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTJAttention(config, rank, world)
        self.mlp = GPTJMLP(config, rank, world)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x + attn(ln_1(x)) + mlp(ln_1(x)), with one all-reduce across ranks for both."""
        h = self.ln_1(x)
        y = self.attn(h, cos, sin, batch, k_cache, v_cache) + self.mlp(h)
        if self.world > 1:
            dist.all_reduce(y)
        return x + y


class GPTJTransformer(nn.Module):
    """Token embeddings, blocks and final norm (HF's `transformer.` prefix)."""

    def __init__(self, config: GPTJConfig, rank: int, world: int):
        super().__init__()
        hidden = config.hidden_size
        # Left uninitialised: weights always come from a checkpoint, and Embedding's normal_ init on
        # the meta device imports torch._dynamo (seconds at startup).
        self.wte = nn.Embedding(config.vocab_size, hidden, _weight=torch.empty(config.vocab_size, hidden))
        self.h = nn.ModuleList(GPTJBlock(config, rank, world) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)


class GPTJ(nn.Module):
    """GPT-J causal LM: `forward` gives normed hidden states, `compute_logits` applies the LM head (with bias).

    Built as tensor-parallel rank `rank` of `world`: each rank holds its heads and MLP columns; one
    all-reduce per block sums the ranks' attention and MLP outputs together. Embeddings, norms and the
    LM head stay whole.
    """

    config_class: ClassVar[type] = GPTJConfig
    stacked_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    }

    def __init__(self, config: GPTJConfig, rank: int = 0, world: int = 1):
        super().__init__()
        self.config = config = config.per_rank(world)  # this rank's heads and MLP columns
        self.transformer = GPTJTransformer(config, rank, world)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        cos, sin = rotary_tables(config)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv: KVLayers) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden) final-normed states; writes this step's keys into `kv`."""
        # One gather per step, shared by every layer: (B, 1, T, rotary_dim) broadcasts over heads.
        cos = self.rotary_cos[batch.positions].unsqueeze(1)
        sin = self.rotary_sin[batch.positions].unsqueeze(1)
        x = self.transformer.wte(input_ids)  # (B, T, hidden)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, batch, *kv.layer(i))
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()

    def prepack(self, batch_hint: int, small_gemm: SmallGemmKernel | None = None) -> None:
        """Lay every matmul weight out for fast small-batch decoding on CPU (a no-op where oneDNN can't)."""
        pack_linears(self, batch_hint, small_gemm)
