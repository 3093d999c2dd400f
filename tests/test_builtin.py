"""The built-in checkpoints: deterministic, loadable by us and by transformers, with a lossless tokenizer."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.layers.attention import ForwardBatch
from flover_backend.execution.models.builtin import (
    MARKER_FILE,
    VOCAB_SIZE,
    builtin_checkpoint,
    builtin_config,
    export_builtin,
)
from flover_backend.execution.models.llama import Llama, LlamaConfig
from flover_backend.execution.models.loader import load_model, load_tokenizer, resolve_model_path

ENGLISH = "The quick brown fox jumps over the lazy dog, and then it sleeps in the warm afternoon sun."


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_resolves_to_session_home(tiny_checkpoint, builtin_home, tiny_model):
    assert resolve_model_path("builtin:tiny") == tiny_checkpoint == builtin_home / "builtin" / "tiny"
    c = tiny_model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (2, 4, 2, 16, VOCAB_SIZE)
    assert (c.bos_token_id, c.eos_token_id, c.max_position_embeddings) == (1, 2, 1024)
    assert tiny_model.lm_head is not None  # tiny is untied


def test_export_is_byte_identical(tiny_checkpoint, tmp_path):
    export_builtin("tiny", tmp_path)
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tiny_checkpoint / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_written_once_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOVER_HOME", str(tmp_path))
    path = builtin_checkpoint("tiny")
    assert path == tmp_path / "builtin" / "tiny"
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert builtin_checkpoint("tiny") == path and (path / "model.safetensors").stat().st_mtime_ns == written
    (path / MARKER_FILE).write_text(json.dumps({"recipe_version": -1}))  # as if an older recipe wrote it
    (path / "model.safetensors").write_bytes(b"stale")
    assert builtin_checkpoint("tiny") == path
    assert load_model(path, torch.float32, "cpu").config.num_layers == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny"]  # no temp or stale dirs left


def test_transformers_gives_the_same_logits(tiny_checkpoint, tiny_model, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(ENGLISH).ids])
    c = tiny_model.config
    kv = KVArena.for_model(c, 1, ids.shape[1])
    batch = ForwardBatch.prefill(slice(0, 1), [ids.shape[1]], torch.device("cpu"))
    with torch.no_grad():
        ours = tiny_model.compute_logits(tiny_model.forward(ids, batch, kv)[0])
        assert_close(ours, hf(ids).logits[0], atol=1e-4, rtol=1e-4)


def test_greedy_output_is_varied_and_far_from_ties(tiny_model, tokenizer):
    """Batch-composition tests compare greedy tokens, so the top-2 gap must dwarf float32 noise."""
    prompts = ["Hello, my name is", "def fib(n):", "日本語のテキスト", "a"]
    ids = [tokenizer.encode(p).ids for p in prompts]
    num_steps, c = 32, tiny_model.config
    kv = KVArena.for_model(c, len(ids), 64)
    input_ids = torch.tensor([seq + [0] * (max(map(len, ids)) - len(seq)) for seq in ids])
    batch = ForwardBatch.prefill(slice(0, len(ids)), [len(seq) for seq in ids], torch.device("cpu"))
    outputs, gaps = [], []
    with torch.no_grad():
        hidden = tiny_model.forward(input_ids, batch, kv)
        logits = tiny_model.compute_logits(hidden[torch.arange(len(ids)), batch.last_index])
        context_lens = torch.tensor([len(seq) for seq in ids])
        for _ in range(num_steps):
            top2 = logits.topk(2).values
            gaps.append(top2[:, 0] - top2[:, 1])
            outputs.append(logits.argmax(-1))
            batch = ForwardBatch.decode(slice(0, len(ids)), context_lens, int(context_lens.max()) + 1)
            logits = tiny_model.compute_logits(tiny_model.forward(outputs[-1][:, None], batch, kv)[:, 0])
            context_lens += 1
    gaps, outputs = torch.cat(gaps), torch.stack(outputs, dim=1)
    assert gaps.median() > 0.1 and (gaps < 1e-3).float().mean() < 0.02
    for row in outputs.tolist():
        assert len(set(row)) > num_steps // 2, row


def test_context_changes_the_prediction(tiny_model):
    """Changing only the first token moves the last position's argmax: attention and the cache matter."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB_SIZE, (32, 12), generator=generator)
    changed = ids.clone()
    changed[:, 0] = torch.randint(3, VOCAB_SIZE, (32,), generator=generator)
    c = tiny_model.config
    kv = KVArena.for_model(c, 32, 12)
    batch = ForwardBatch.prefill(slice(0, 32), [12] * 32, torch.device("cpu"))
    with torch.no_grad():
        a, b = (tiny_model.compute_logits(tiny_model.forward(x, batch, kv)[:, -1]).argmax(-1)
                for x in (ids, changed))
    assert (a != b).float().mean() > 0.5


def test_small_shape_on_meta():
    config = LlamaConfig.from_hf(builtin_config("small"))
    with torch.device("meta"):
        model = Llama(config)
    assert model.lm_head is None  # tied
    num_params = sum(p.numel() for p in model.parameters())
    assert 105e6 < num_params < 115e6, num_params
    assert (config.num_kv_heads, config.head_dim, config.max_position_embeddings) == (12, 64, 2048)


def test_1b_shape_on_meta():
    config = LlamaConfig.from_hf(builtin_config("1b"))
    with torch.device("meta"):
        model = Llama(config)
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.2e9
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 4, 64)


def test_tokenizer_layout(tokenizer, hf_tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer.encode(ENGLISH).ids
    assert ids[0] == 1 and len(ids) < 0.6 * len(ENGLISH.encode())


def test_every_id_decodes(tokenizer):
    texts = tokenizer.decode_batch([[i] for i in range(VOCAB_SIZE)], skip_special_tokens=False)
    assert len(texts) == VOCAB_SIZE and all(texts[3:])
    assert tokenizer.decode(list(range(VOCAB_SIZE)))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert ids[0] == 1
    assert tokenizer.decode(ids[1:], skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_transformers_tokenizer_agrees(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
