"""The built-in models: random-weight Llamas written once as ordinary HF checkpoint directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from flover_backend.execution.models.checkpoint import checkpoint_placements
from flover_backend.execution.models.llama import Llama, LlamaConfig
from flover_backend.paths import builtin_dir

# Bump whenever the weights or tokenizer recipe changes: caches written by another version are rebuilt.
RECIPE_VERSION = 4  # 4: tokenizer_config.json has a chat template
MARKER_FILE = "flover_builtin.json"
SEED = 20240607
VOCAB_SIZE = 32000
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2
# ChatML, after <s> as every encoded text starts: what /v1/chat/completions renders messages with. The markers
# are plain text to this tokenizer (not special tokens), so the ids, weights and vocabulary stay as they were.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
             "max_position_embeddings": 1024},
    "small": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "tie_word_embeddings": True,
              "max_position_embeddings": 2048},
    # TinyLlama-1.1B's shape, for GPU benchmarks (benchmarks/gpu_check.sh). Stored in bfloat16, the dtype
    # it is served in: 2.2 GB to write and to load each time, not 4.4.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False,
           "max_position_embeddings": 2048, "torch_dtype": "bfloat16"},
}
# Weight std = gain / sqrt(fan_in), so every size gets the same activation scales. Plain 0.02 gives flat
# attention and a residual stream that stays close to the input token's embedding: greedy decoding then
# ignores the context and (tied) repeats the input token forever. These gains give peaked, random
# attention, so every token of the context moves the next-token choice.
GAINS = {"q_proj": 2.0, "k_proj": 2.0, "v_proj": 2.0, "o_proj": 1.0, "gate_proj": 1.0, "up_proj": 1.0,
         "down_proj": 2.0}
# The normed final state has norm sqrt(hidden), so a head row with std s gives logits with std
# s * sqrt(hidden); about 3 keeps greedy top-2 gaps far above float32 noise. The embedding (the
# head itself when tied) uses the same std.
LOGIT_STD = 3.0


def builtin_config(name: str) -> dict[str, Any]:
    """The `config.json` contents of built-in model `name` ('tiny', 'small' or '1b')."""
    if name not in _SHAPES:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(_SHAPES)}")
    shape = _SHAPES[name]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "use_cache": True,
        "torch_dtype": "float32",
        **shape,
    }


def builtin_checkpoint(name: str) -> Path:
    """`<flover_home()>/builtin/<name>`, written on first use."""
    builtin_config(name)  # reject unknown names before touching the disk
    final = builtin_dir(name)
    if _is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: the rename is atomic, so a racing process either wins
    # (and we use its copy) or loses, and nobody ever sees a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        export_builtin(name, tmp)
        if final.exists() and not _is_current(final):
            _discard(final)
        os.rename(tmp, final)
    except OSError:
        if not _is_current(final):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def export_builtin(name: str, dest: str | Path) -> Path:
    """Write built-in model `name` as an HF checkpoint directory at `dest`; returns `dest`."""
    config = builtin_config(name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "config.json", config)
    _write_json(dest / "generation_config.json", {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID})
    dtype = getattr(torch, config["torch_dtype"])
    weights = {key: tensor.to(dtype) for key, tensor in random_weights(config).items()}
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save(str(dest / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(dest / "special_tokens_map.json", specials)
    _write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,  # HF's cleanup would rewrite " ." and break round trips
        "chat_template": CHAT_TEMPLATE,
    })
    # Last: its presence marks the directory complete.
    _write_json(dest / MARKER_FILE, {"name": name, "recipe_version": RECIPE_VERSION})
    return dest


def random_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for an HF Llama config: norms 1, matrices N(0, gain^2 / fan_in)."""
    llama_config = LlamaConfig.from_hf(config)
    with torch.device("meta"):
        shapes = {key: place.shape for key, place in checkpoint_placements(Llama(llama_config)).items()}
    head_std = LOGIT_STD / llama_config.hidden_size ** 0.5
    generator = torch.Generator().manual_seed(SEED)
    weights = {}
    for key in sorted(shapes):  # a fixed order, so each tensor always draws the same numbers
        shape = shapes[key]
        if key.endswith("norm.weight"):
            weights[key] = torch.ones(shape)
            continue
        module = key.split(".")[-2]
        std = GAINS[module] / shape[1] ** 0.5 if module in GAINS else head_std
        weights[key] = torch.randn(shape, generator=generator) * std
    return weights


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE: 3 specials, 256 bytes, then two-byte merges (common text first) up to 32000."""
    symbols = _byte_symbols()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update((symbols[b], len(SPECIAL_TOKENS) + b) for b in range(256))
    pairs = sorted(((a, b) for a in range(256) for b in range(256)), key=_pair_rank)
    merges = [(symbols[a], symbols[b]) for a, b in pairs[:VOCAB_SIZE - len(vocab)]]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Llama-style: every encoded text starts with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_TOKEN_ID)])
    return tokenizer


def _byte_tier(byte: int) -> int:
    """How common a byte is in text: 0 lowercase/space, 1 upper/digit, 2 other ASCII, 3 UTF-8, 4 control."""
    char = chr(byte)
    if char == " " or "a" <= char <= "z":
        return 0
    if char.isascii() and char.isalnum():
        return 1
    if char.isascii() and (char.isprintable() or char in "\n\t"):
        return 2
    return 3 if byte >= 0x80 else 4


def _pair_rank(pair: tuple[int, int]) -> tuple[int, int, int, int]:
    """Merge order: ASCII pairs by tier, then UTF-8 byte pairs, then UTF-8 next to text, then the rest."""
    tiers = sorted(map(_byte_tier, pair))
    if tiers[1] <= 2:
        group = tiers[1]
    elif tiers == [3, 3]:
        group = 3
    else:
        group = 4 if tiers[0] <= 2 and tiers[1] == 3 else 5
    return group, tiers[0] + tiers[1], pair[0], pair[1]


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenization emits)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _is_current(path: Path) -> bool:
    """Whether `path` holds a complete checkpoint written by this recipe version."""
    try:
        return json.loads((path / MARKER_FILE).read_text())["recipe_version"] == RECIPE_VERSION
    except (OSError, ValueError, KeyError):
        return False


def _discard(path: Path) -> None:
    """Move a stale checkpoint aside (atomically, so the name is free at once) and delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".stale-{path.name}-", dir=path.parent))
    with contextlib.suppress(FileNotFoundError):  # another process already moved it
        os.rename(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    """Pretty, stable JSON (sorted keys) so two exports are byte-identical."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
