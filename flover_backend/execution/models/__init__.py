"""Model families behind one interface, and the table that picks one from an HF `architectures` name."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from flover_backend.execution.layers.attention import ForwardBatch, KVLayers
from flover_backend.execution.models.gpt2 import GPT2
from flover_backend.execution.models.gptj import GPTJ
from flover_backend.execution.models.llama import Llama
from flover_backend.native.small_gemm import SmallGemmKernel


class ModelConfig(Protocol):
    """What the engine reads off any model's config (to size the arena and stop on eos)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int | list[int] | None
    bos_token_id: int | None


def eos_token_ids(config: ModelConfig) -> frozenset[int]:
    """The ids that end generation (unless a request ignores eos): a config gives one, several or none."""
    eos = config.eos_token_id
    return frozenset(eos if isinstance(eos, list) else [eos]) - {None}


class CausalLM(Protocol):
    """A decoder-only LM that keeps its keys and values in the arena `kv`, built in the layout it serves in.

    `Model(config, rank, world)` builds tensor-parallel rank `rank`'s share of `world` (`config` as read by
    `config_class.from_hf`; `self.config` is then this rank's share). Parameters keep the checkpoint's names,
    except the projections it serves stacked (`stacked_modules`), which the loader fills part by part.
    `kv` is the arena (`KVLayers`): layer i reads and writes the views `kv.layer(i)` (keys, values) through
    `arena_attention` only. These members are everything the loader and the runner use.
    """

    config_class: ClassVar[type]
    stacked_modules: ClassVar[dict[str, tuple[str, int]]]  # {checkpoint module: (stacked module, its part)}
    config: ModelConfig

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv: KVLayers) -> torch.Tensor:
        """(B, T) token ids at `batch.positions` -> (B, T, hidden) final-normed hidden states."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits (the LM head only)."""
        ...

    def prepack(self, batch_hint: int, small_gemm: SmallGemmKernel | None = None) -> None:
        """Lay the weights out for decoding up to `batch_hint` rows on this device, once after loading (their
        few-row matmuls through `small_gemm` where given)."""
        ...


# HF `architectures` name -> the class that serves it; the README's table of served models says the same.
MODEL_REGISTRY: dict[str, type[torch.nn.Module]] = {
    "LlamaForCausalLM": Llama,
    "MistralForCausalLM": Llama,  # sliding window supported
    "Qwen2ForCausalLM": Llama,  # q/k/v biases
    "GemmaForCausalLM": Llama,  # (1 + weight) norms, scaled embeddings, GeGLU
    "GPT2LMHeadModel": GPT2,
    "GPTJForCausalLM": GPTJ,
}

__all__ = ["GPT2", "GPTJ", "MODEL_REGISTRY", "CausalLM", "Llama", "ModelConfig", "eos_token_ids"]
