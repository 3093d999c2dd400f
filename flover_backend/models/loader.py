"""Load an HF-format checkpoint directory (config.json + safetensors + tokenizer.json) from local disk."""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from flover_backend.models import MODEL_REGISTRY, CausalLM
from flover_backend.models.builtin import BUILTIN_PREFIX, builtin_checkpoint
from flover_backend.models.llama import Llama
from flover_backend.tensor_parallel import shard_llama

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
    """Build the model named by `config.json` and fill it from the directory's safetensors files.

    With `world` > 1 the model is tensor-parallel rank `rank`'s share, and only that share is read.
    """
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    architecture = (hf_config.get("architectures") or ["<missing>"])[0]
    if architecture not in MODEL_REGISTRY:
        raise NotImplementedError(f"architecture {architecture!r} ({path}); we have {sorted(MODEL_REGISTRY)}")
    model_class = MODEL_REGISTRY[architecture]
    config = model_class.config_class.from_hf(hf_config)
    # Meta parameters cost nothing; load_state_dict(assign=True) then swaps in the loaded tensors.
    with torch.device("meta"):
        model = model_class(config)
    if world > 1:
        if model_class is not Llama:
            raise ValueError(f"tensor parallelism splits Llama-family models only, not {architecture}")
        shard_llama(model, rank, world)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    state = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt", device=str(device)) as checkpoint:
            for key in checkpoint.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _match_key(key, shapes.keys())
                if name is not None:
                    tensor = _read_share(checkpoint, key, shapes.get(name), rank, world)
                    state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {architecture}: "
                         f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(state, assign=True)
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()
    model.to(device=device, dtype=dtype)  # the derived buffers (RoPE tables) were built on the CPU
    return model.eval().requires_grad_(False)


def _read_share(checkpoint, key: str, shape: torch.Size | None, rank: int, world: int) -> torch.Tensor:
    """The whole tensor, or where the model holds 1/world of it along one dimension, only rank's block."""
    if shape is None or world == 1:
        return checkpoint.get_tensor(key)
    view = checkpoint.get_slice(key)
    full = tuple(view.get_shape())
    if full == tuple(shape):
        return checkpoint.get_tensor(key)
    split = [dim for dim, (whole, part) in enumerate(zip(full, shape)) if whole != part]
    if len(full) != len(shape) or len(split) != 1 or full[split[0]] != shape[split[0]] * world:
        raise ValueError(f"{key}: the checkpoint's shape {full} is not {world} x the model's {tuple(shape)} "
                         f"along one dimension")
    size = shape[split[0]]
    return view[tuple(slice(rank * size, (rank + 1) * size) if dim == split[0] else slice(None)
                      for dim in range(len(full)))]


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
