"""Load an HF-format checkpoint directory (config.json + safetensors + tokenizer.json) from local disk."""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import nn

from flover_backend.execution.models import MODEL_REGISTRY, CausalLM
from flover_backend.execution.models.builtin import builtin_checkpoint
from flover_backend.execution.models.checkpoint import Placement, checkpoint_placements
from flover_backend.paths import BUILTIN_PREFIX

# Buffers some exporters save next to the weights; we derive them (causal mask, RoPE tables) instead.
IGNORED_KEY_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# Checkpoints that drop the outer module name, e.g. OpenAI's GPT-2 ("h.0.attn..." for "transformer.h.0...").
KEY_PREFIXES = ("transformer.", "model.")


def resolve_model_path(spec: str) -> Path:
    """`builtin:<name>` -> the built-in checkpoint (written on first use); else an existing local dir."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_checkpoint(spec[len(BUILTIN_PREFIX):])
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {spec!r} is not a local checkpoint directory with a config.json; give one "
            f"(downloads are not supported) or use {BUILTIN_PREFIX}tiny / {BUILTIN_PREFIX}small"
        )
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The checkpoint's `tokenizer.json`."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (only fast tokenizers in tokenizer.json are supported)")
    return Tokenizer.from_file(str(file))


def load_model(path: str | Path, dtype: torch.dtype, device: str | torch.device, rank: int = 0,
               world: int = 1) -> CausalLM:
    """Build the model named by `config.json` as it serves and fill it from the directory's safetensors files.

    With `world` > 1 the model is tensor-parallel rank `rank`'s share, and only that share is read.
    """
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    architecture = (hf_config.get("architectures") or ["<missing>"])[0]
    if architecture not in MODEL_REGISTRY:
        raise NotImplementedError(f"architecture {architecture!r} of {path} is not supported; supported "
                                  f"architectures: {', '.join(sorted(MODEL_REGISTRY))}")
    model_class = MODEL_REGISTRY[architecture]
    config = model_class.config_class.from_hf(hf_config)
    # Meta parameters cost nothing; each is replaced by the tensor read for it, or for a stacked one, by
    # storage its parts are copied into.
    with torch.device("meta"):
        model = model_class(config, rank, world)
    placements = checkpoint_placements(model)
    found = set()
    for file in _weight_files(path):
        with safe_open(file, framework="pt", device=str(device)) as checkpoint:
            for key in checkpoint.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _match_key(key, placements.keys())
                if name in placements:
                    _fill(placements[name], _read_share(checkpoint, key, placements[name], rank, world), dtype)
                if name is not None:
                    found.add(name)
    missing, unexpected = sorted(placements.keys() - found), sorted(found - placements.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {architecture}: "
                         f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    model.to(device=device, dtype=dtype)  # the derived buffers (RoPE tables) were built on the CPU
    return model.eval().requires_grad_(False)


def _read_share(checkpoint, key: str, placement: Placement, rank: int, world: int) -> torch.Tensor:
    """Checkpoint tensor `key` whole, or where ranks split it, only rank's block."""
    view = checkpoint.get_slice(key)  # the shape only: nothing is read yet
    full = tuple(view.get_shape())
    split_dim = placement.split_dim
    expected = tuple(size * world if dim == split_dim else size for dim, size in enumerate(placement.shape))
    if full != expected:
        raise ValueError(f"{key}: the checkpoint's shape {full} is not the {expected} the model needs")
    if split_dim is None or world == 1:
        return checkpoint.get_tensor(key)
    size = placement.shape[split_dim]
    return view[tuple(slice(rank * size, (rank + 1) * size) if dim == split_dim else slice(None)
                      for dim in range(len(full)))]


def _fill(placement: Placement, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Make `tensor` the parameter, or copy it into its rows of a stacked parameter (allocated on first use)."""
    module, name, rows, _ = placement
    if rows is None:
        setattr(module, name, nn.Parameter(tensor.to(dtype), requires_grad=False))
        return
    param = getattr(module, name)
    if param.is_meta:
        param = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=tensor.device), requires_grad=False)
        setattr(module, name, param)
    param[rows].copy_(tensor)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors shards named by the index if there is one, else every `*.safetensors`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path} (other formats are not supported)")
    return files


def _match_key(key: str, expected: Container[str]) -> str | None:
    """The model's name for a checkpoint key; None for keys we deliberately drop."""
    if key in expected:
        return key
    if key.endswith(IGNORED_KEY_SUFFIXES):
        return None
    for prefix in KEY_PREFIXES:
        if prefix + key in expected:
            return prefix + key
    if key == "lm_head.weight" and "lm_head.weight" not in expected:
        return None  # tied embeddings: the head reads the embedding matrix
    return key
