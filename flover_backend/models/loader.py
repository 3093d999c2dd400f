"""Load an HF-format checkpoint directory (config.json + safetensors + tokenizer.json) from local disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from flover_backend.models import MODEL_REGISTRY, CausalLM
from flover_backend.models.builtin import BUILTIN_PREFIX, builtin_checkpoint

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


def load_model(path: str | Path, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    """Build the model named by `config.json` and fill it from the directory's safetensors files."""
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
    expected = set(model.state_dict())
    state = {}
    for file in _weight_files(path):
        for key, tensor in load_file(file, device=str(device)).items():
            key = _match_key(key, expected)
            if key is not None:
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {architecture}: "
                         f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(state, assign=True)
    model.to(device=device, dtype=dtype)  # the derived buffers (RoPE tables) were built on the CPU
    return model.eval().requires_grad_(False)


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


def _match_key(key: str, expected: set[str]) -> str | None:
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
