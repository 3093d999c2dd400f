"""The GPU path (marked `gpu`): skipped on machines without CUDA, run on a lent GPU with `pytest -m gpu`."""

import queue

import pytest
import torch

from benchmarks.graphs_vs_eager import compare, write_checkpoint
from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.execution.decode_graphs import KEY_BLOCK
from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.layers.attention import ForwardBatch
from flover_backend.execution.models.loader import load_model, resolve_model_path

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
JOBS = [(prompt, SamplingParams(max_tokens=4 + 5 * (i % 3), ignore_eos=True))
        for i, prompt in enumerate(["The quick brown fox", "Once upon a time", "a", "hello hello", "Zebras", "0123"])]


def gpu_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "device": "cuda", "max_num_seqs": 3, "max_model_len": 96,
                           **overrides})


def run_all_at_once(config: EngineConfig) -> tuple[list[list[int]], Engine]:
    """Submit every job before the first iteration; return each job's tokens and the stopped engine."""
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    with Engine(config) as engine:
        ids = [engine.add_request(prompt, params, on_output=outputs.put) for prompt, params in JOBS]
        tokens: dict[str, list[int]] = {req_id: [] for req_id in ids}
        finished = 0
        while finished < len(ids):
            output = outputs.get(timeout=120)
            tokens[output.req_id].extend(output.new_token_ids)
            finished += output.finished
    return [tokens[req_id] for req_id in ids], engine


def test_logits_match_transformers_on_gpu():
    transformers = pytest.importorskip("transformers")
    path = resolve_model_path("builtin:tiny")
    ours = load_model(path, torch.float32, torch.device("cuda"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]], device="cuda")
    cfg = ours.config
    kv = KVArena.for_model(cfg, 1, 32, device="cuda")
    with torch.inference_mode():
        hidden = ours(ids, ForwardBatch.prefill(slice(0, 1), [ids.shape[1]], ids.device), kv)
        torch.testing.assert_close(ours.compute_logits(hidden[0, -1:]), theirs(ids).logits[0, -1:].float(),
                                   atol=1e-3, rtol=1e-3)


def test_arena_is_cupy_on_gpu():
    with Engine(gpu_config()) as engine:
        assert type(engine.runner.arena.array).__module__.startswith("cupy")
        assert engine.runner.arena.copier == "cupy", "CuPy could not compile its copy kernels (see the log)"
        assert engine.runner.arena.tensor.is_cuda


def test_fused_with_compaction_equals_alone_and_equals_no_compaction():
    fused, engine = run_all_at_once(gpu_config())
    alone, _ = run_all_at_once(gpu_config(policy="solo"))
    holes, _ = run_all_at_once(gpu_config(compaction=False))
    assert engine.stats.compaction_bytes > 0  # 6 jobs of different lengths through 3 rows: rows were compacted
    assert fused == alone == holes
    assert [len(t) for t in fused] == [p.max_tokens for _, p in JOBS]


def test_cuda_graph_replays_equal_eager_decode():
    graphed, engine = run_all_at_once(gpu_config())
    eager, eager_engine = run_all_at_once(gpu_config(cuda_graphs=False))
    graphs = engine.runner.decode_graphs
    assert eager_engine.runner.decode_graphs is None
    assert graphs.capture, "a capture failed and the engine fell back to eager decoding (see the log)"
    assert graphs.num_replays > 0 and (3, 96) in graphs.graphs  # 3 rows, 96 keys: the whole arena
    prefill = engine.runner.prefill_graphs
    assert prefill.capture, "a prefill capture failed and prompts ran eagerly (see the log)"
    assert prefill.num_replays > 0 and set(prefill.graphs) == {16, 32, 64, 96}
    assert graphed == eager


def test_cuda_graphs_across_key_buckets_in_bfloat16():
    """A row growing past 256 keys is captured again; bf16 runs through the CuPy uint16 arena."""
    config = gpu_config(dtype="bfloat16", max_model_len=600)
    long_prompt = [3 + (i * 7919) % 500 for i in range(250)]
    with Engine(config) as engine:
        stream = engine.generate(prompt_token_ids=long_prompt, params=SamplingParams(max_tokens=12, ignore_eos=True))
        tokens = [t for output in stream for t in output.new_token_ids]
        shapes = set(engine.runner.decode_graphs.graphs)
    assert len(tokens) == 12
    assert {(1, 256), (1, 512)} <= shapes


def test_cuda_graphs_token_exact_on_mixed_lengths_joining_while_others_decode(tmp_path):
    """The GPU issue's case: 16 prompts of 1-300 tokens (contexts cross the first key bucket, so decode shapes
    are captured under load, after the prefill widths), joining every 3 iterations while others decode, 48
    greedy tokens each: with graphs, float32 and bfloat16, every stream equals eager decoding alone."""
    results = compare(write_checkpoint(tmp_path / "issue21"), "cuda")
    assert max(results["prompt_lens"]) + results["new_tokens"] > KEY_BLOCK
    for name, run in results["runs"].items():
        if "graphs" in name or name.startswith("float32"):
            assert run["identical"] == run["of"], (name, run["first_diff"])
