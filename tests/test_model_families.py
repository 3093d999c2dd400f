"""Every family through the engine: fused greedy tokens equal each request alone, and two ranks equal one."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from flover_backend import Engine, EngineConfig, SamplingParams
from tests.test_engine import run_staggered, static_decode, token_ids
from tests.test_models import VOCAB_SIZE, hf_model

FAMILIES = ["gpt2", "gptj", "mistral-sliding", "qwen2-tied-sliding", "gemma"]  # Llama: tests/test_engine.py
PROMPTS = ["The quick brown fox", "Once upon a time", "a", "hello hello hello", "What is the capital of France?"]
# Prompt + output run past the test configs' sliding windows (5 and 6 positions, served with max_model_len 48).
JOBS = [(prompt, SamplingParams(max_tokens=8 + 4 * (i % 3), ignore_eos=True)) for i, prompt in enumerate(PROMPTS)]


def write_checkpoint(name: str, path) -> str:
    """A tiny random checkpoint of family `name` with a one-character-per-token tokenizer, at `path`.

    Matrices get std 3 / sqrt(columns) rather than transformers' 0.02: peaked attention and logits whose
    greedy choices sit far apart, so float noise between batch shapes never flips a token.
    """
    model = hf_model(name)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 3 / math.sqrt(param.shape[1]))
    model.save_pretrained(path)
    vocab = {"<unk>": 0, **{chr(32 + i): 1 + i for i in range(VOCAB_SIZE - 1)}}  # printable ASCII
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path / "tokenizer.json"))
    return str(path)


def engine_config(model: str, **overrides) -> EngineConfig:
    return EngineConfig(**{"model": model, "max_num_seqs": 3, "max_model_len": 48, "num_threads": 1, **overrides})


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, checkpoint, each job's greedy tokens served alone) for one family."""
    checkpoint = write_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    alone = [token_ids(outputs) for outputs in run_staggered(engine_config(checkpoint, policy="solo"), JOBS, 0)]
    assert len({tuple(tokens) for tokens in alone}) == len(JOBS)  # the prompts matter: a test that could fail
    return request.param, checkpoint, alone


@pytest.mark.parametrize("static", [False, True], ids=["eager", "padded-static"])
def test_greedy_tokens_fused_equal_alone(family, static):
    """Also through the padded fixed-shape decode a CUDA graph captures (run eagerly on this CPU)."""
    _, checkpoint, alone = family
    shapes: list = []
    fused = run_staggered(engine_config(checkpoint), JOBS, prepare=static_decode(shapes) if static else None)
    assert [token_ids(outputs) for outputs in fused] == alone
    assert bool(shapes) == static


def test_two_ranks_give_the_same_greedy_tokens_as_one_or_refuse_clearly(family):
    name, checkpoint, alone = family
    if name == "gpt2":
        with pytest.raises(ValueError, match="GPT-2 cannot be split for tensor parallelism"):
            Engine(engine_config(checkpoint, tensor_parallel_size=2))
        return
    num_heads = []
    fused = run_staggered(engine_config(checkpoint, tensor_parallel_size=2), JOBS,
                          prepare=lambda engine: num_heads.append(engine.runner.model.config.num_heads))
    assert num_heads == [2]  # each test config has 4 heads: 2 per rank
    assert [token_ids(outputs) for outputs in fused] == alone

