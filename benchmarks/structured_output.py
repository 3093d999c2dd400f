"""What structured output costs, in one run: `python -m benchmarks.structured_output`.

1. The grammar libraries side by side on the built-in 32000-token byte-level vocabulary: compile time of a
   five-field schema, of "any JSON object" and of a regex, and the per-token mask time along one answer; for
   xgrammar (what flover uses) and, when it is importable, outlines-core (installed size read off each package).
2. The sampling step (32 rows x 32000 logits, greedy and sampled) with 0, 1 and all 32 rows constrained, the three
   taking turns of a few calls each so that a busy machine slows all alike.
3. The engine's whole decode iteration on builtin:tiny at 32 rows with 0, 1 and 32 rows constrained, in turns.
Median ms; ratios against 0 constrained. Results: benchmarks/results/structured_output.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.execution.models.builtin import EOS_TOKEN_ID, VOCAB_SIZE, build_tokenizer
from flover_backend.native import sampling as native_sampling
from flover_backend.request import Request
from flover_backend.sampling.grammar import GrammarCompiler
from flover_backend.sampling.sampler import Sampler
from flover_backend.sampling.structured_output import guided_decoding
from flover_backend.triton_env import work_dir

NUM_ROWS = 32
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
    "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "kind", "ok"], "additionalProperties": False}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poet"], "kind": "b", "ok": True},
                    separators=(",", ":"))
REGEX = r"[0-9]{3}-[a-z]{2,8}"
# Long enough that no row completes while the step is timed: eight objects with strings, the costly masks.
LONG_SCHEMA = {"type": "array", "minItems": 8, "maxItems": 8, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                     "note": {"type": "string", "maxLength": 40}},
    "required": ["name", "note"], "additionalProperties": False}}


def median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 4)


def package_bytes(name: str) -> int | None:
    """Bytes the installed distribution's files take, or None when it is not installed."""
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return sum(path.locate().stat().st_size for path in files if path.locate().exists())


def compare_libraries() -> dict:
    """Compile and per-token mask times of xgrammar and (if importable) outlines-core on the same vocabulary."""
    tokenizer = build_tokenizer()
    ids = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    result = {"answer_tokens": len(ids)}
    import xgrammar

    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, frozenset({EOS_TOKEN_ID}))
    start = time.perf_counter()
    compiler.compile(guided_decoding(guided_choice=["x"]))  # the vocabulary is read on the first compile
    vocabulary_s = time.perf_counter() - start
    timed = {"schema": guided_decoding(guided_json=SCHEMA),
             "any_json_object": guided_decoding(guided_json={"type": "object"}),
             "regex": guided_decoding(guided_regex=REGEX)}
    compile_ms = {name: _once_ms(lambda guided=guided: compiler.compile(guided)) for name, guided in timed.items()}
    guide = compiler.compile(guided_decoding(guided_json=SCHEMA))
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB_SIZE)
    fill = []
    for token_id in ids:
        start = time.perf_counter()
        guide.fill(bitmask, 0)
        fill.append(time.perf_counter() - start)
        assert guide.accept(token_id)
    assert guide.finished
    result["xgrammar"] = {"version": importlib.metadata.version("xgrammar"),
                          "installed_bytes": package_bytes("xgrammar") + (package_bytes("apache-tvm-ffi") or 0),
                          "vocabulary_s": round(vocabulary_s, 3), "compile_ms": compile_ms,
                          "mask_per_token_ms": {"median": median_ms(fill), "max": round(max(fill) * 1e3, 4)}}
    result["outlines_core"] = _outlines_core(tokenizer, ids)
    return result


def _once_ms(build: Callable[[], object]) -> float:
    start = time.perf_counter()
    build()
    return round((time.perf_counter() - start) * 1e3, 2)


def _outlines_core(tokenizer, ids: list[int]) -> dict:
    """outlines-core's figures on the same vocabulary and schema, or why there are none."""
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return {"note": "not installed: pip install outlines-core (into a separate --target) to compare"}
    from flover_backend.execution.models.builtin import _byte_symbols

    byte_of = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab = {i: token for token, i in tokenizer.get_vocab().items()}
    by_bytes: dict[bytes, list[int]] = {}
    for token_id in range(3, VOCAB_SIZE):  # the byte tokens and merges; not <unk>, <s>, </s>
        by_bytes.setdefault(bytes(byte_of[c] for c in vocab[token_id]), []).append(token_id)
    start = time.perf_counter()
    vocabulary = Vocabulary(EOS_TOKEN_ID, by_bytes)
    vocabulary_s = time.perf_counter() - start
    schema_regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    object_regex = build_regex_from_schema('{"type":"object"}', whitespace_pattern="")
    compile_ms = {"schema": _once_ms(lambda: Index(schema_regex, vocabulary)),
                  "any_json_object": _once_ms(lambda: Index(object_regex, vocabulary)),
                  "regex": _once_ms(lambda: Index(REGEX, vocabulary))}
    guide = Guide(Index(schema_regex, vocabulary))
    mask = torch.zeros(1, (VOCAB_SIZE + 31) // 32, dtype=torch.int32)
    fill = []
    for token_id in ids:
        start = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        fill.append(time.perf_counter() - start)
        guide.advance(token_id)
    return {"version": importlib.metadata.version("outlines_core"), "installed_bytes": package_bytes("outlines_core"),
            "vocabulary_s": round(vocabulary_s, 3), "compile_ms": compile_ms,
            "mask_per_token_ms": {"median": median_ms(fill), "max": round(max(fill) * 1e3, 4)},
            "note": "regex only: any JSON object is a regex unrolled to a fixed depth, not JSON's grammar"}


def sampler_step(calls: int) -> dict:
    """The sampling step alone with 0, 1 and 32 of 32 rows constrained, greedy and sampled, in turns."""
    tokenizer = build_tokenizer()
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, frozenset({EOS_TOKEN_ID}))
    long_json = guided_decoding(guided_json=LONG_SCHEMA)
    kernel = native_sampling.load(work_dir().parent / "kernels")
    logits = torch.randn(NUM_ROWS, VOCAB_SIZE, generator=torch.Generator().manual_seed(0)) * 3
    results = {}
    for mode, base in (("greedy", SamplingParams(max_tokens=1000)),
                       ("sampled", SamplingParams(max_tokens=1000, temperature=0.8, top_p=0.9))):
        setups = {}
        for num_guided in (0, 1, NUM_ROWS):
            sampler = Sampler(eos_token_ids=frozenset({EOS_TOKEN_ID}), kernel=kernel)
            requests = [Request(f"r{i}", [1], replace(base, seed=i)) for i in range(NUM_ROWS)]
            for request in requests[:num_guided]:
                request.guide = compiler.compile(long_json)
            setups[num_guided] = (sampler, requests)
        times: dict[int, list[float]] = {k: [] for k in setups}
        for turn in range(calls // 4 + 1):
            for num_guided, (sampler, requests) in setups.items():
                for _ in range(4):
                    fresh = logits.clone()  # as each step's forward makes: the sampler masks constrained rows in it
                    start = time.perf_counter()
                    out = sampler(fresh, requests)
                    elapsed = time.perf_counter() - start
                    if turn:  # the first turn warms up
                        times[num_guided].append(elapsed)
                    for request, token_id in zip(requests, out.token_ids):
                        if request.guide is not None:  # advance, as the engine does, and start over when done
                            assert request.guide.accept(token_id)
                            if request.guide.finished:
                                request.guide = compiler.compile(long_json)
        base_ms = median_ms(times[0])
        results[mode] = {f"{k}_constrained": {"median_ms": median_ms(v), "ratio": round(median_ms(v) / base_ms, 3)}
                         for k, v in times.items()}
    return results


def engine_step(steps: int, rounds: int) -> dict:
    """The whole decode iteration on builtin:tiny with 32 rows, 0, 1 or 32 of them constrained, in turns."""
    config = EngineConfig(model="builtin:tiny", max_num_seqs=NUM_ROWS, max_model_len=512, num_threads=1)
    times: dict[int, list[float]] = {0: [], 1: [], NUM_ROWS: []}
    with_engine = Engine(config)
    try:
        for _ in range(rounds):
            for num_guided, timed in times.items():
                ids = []
                for i in range(NUM_ROWS):
                    params = SamplingParams(max_tokens=steps + 8, temperature=0.8, seed=i, ignore_eos=True,
                                            guided_json=LONG_SCHEMA if i < num_guided else None)
                    ids.append(with_engine.add_request(f"Row {i}:", params, on_output=lambda output: None))
                for _ in range(4):  # admit and prefill every row, then a few warm decode steps
                    with_engine.step()
                for _ in range(steps):
                    start = time.perf_counter()
                    with_engine.step()
                    timed.append(time.perf_counter() - start)
                for req_id in ids:
                    with_engine.abort(req_id)
                with_engine.run_until_idle()
    finally:
        with_engine.stop()
    base_ms = median_ms(times[0])
    return {f"{k}_constrained": {"median_ms": median_ms(v), "ratio": round(median_ms(v) / base_ms, 3)}
            for k, v in times.items()}


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="timed sampler calls per setting")
    parser.add_argument("--steps", type=int, default=20, help="timed engine iterations per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured_output.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"cpu": cpu_name(), "torch_threads": 1,
              "note": "shared machine (other jobs running): timings are noisy; compare the ratios of one run",
              "libraries": compare_libraries(), "sampler_step": sampler_step(args.calls),
              "engine_step": engine_step(args.steps, args.rounds)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sampled, engine = result["sampler_step"]["sampled"], result["engine_step"]
    print(f"[{result['cpu']}] sampling step, 32 rows sampled: 1 constrained x{sampled['1_constrained']['ratio']}, "
          f"32 constrained x{sampled['32_constrained']['ratio']}; engine iteration (builtin:tiny): "
          f"x{engine['1_constrained']['ratio']} and x{engine['32_constrained']['ratio']} of unconstrained")


if __name__ == "__main__":
    main()
