"""Greedy tokens with CUDA graphs against eager ones on the GPU issue's case: mixed prompt lengths that cross the
first key bucket, joining every few iterations while others decode. `gpu_check` runs it every time, and the
`gpu` tests assert it; a mismatch there is a wrong answer, not a slow one.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.execution.models.builtin import build_tokenizer, builtin_config, random_weights

# The issue's random Llama: 4 layers, hidden 384, 8 heads, 2 KV heads, vocab 700; the built-in recipe scales the
# head so greedy top-2 gaps sit far above float noise.
SHAPE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 48, "vocab_size": 700, "max_position_embeddings": 1024}


def write_checkpoint(dest: Path) -> Path:
    """The issue's random Llama as an HF checkpoint directory at `dest` (float32; served in any dtype)."""
    config = {**builtin_config("tiny"), **SHAPE}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config))
    save_file(random_weights(config), str(dest / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save(str(dest / "tokenizer.json"))
    return dest


def issue_prompts(count: int, longest: int, seed: int = 21) -> list[list[int]]:
    """`count` prompts of 1..`longest` random tokens (ids 3..699: no specials)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, SHAPE["vocab_size"]) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def staggered(config: EngineConfig, prompts: list[list[int]], new_tokens: int, steps_between: int) -> list[list[int]]:
    """Each prompt's greedy tokens (ignore_eos), a prompt joining every `steps_between` iterations of an engine
    driven on this thread, so the overlap never depends on the machine's speed."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    engine = Engine(config)
    try:
        ids = []
        for prompt in prompts:
            ids.append(engine.add_request(prompt_token_ids=prompt, params=params,
                                          on_output=lambda o: tokens.setdefault(o.req_id, []).extend(o.new_token_ids)))
            for _ in range(steps_between):
                engine.step()
        engine.run_until_idle()
        graphs = engine.runner.decode_graphs
        if config.cuda_graphs and config.device == "cuda" and (graphs is None or not graphs.capture):
            raise RuntimeError("a CUDA graph capture failed and the engine decoded eagerly (see the log)")
    finally:
        engine.stop()
    return [tokens[req_id] for req_id in ids]


def compare(checkpoint: Path, device: str, count: int = 16, longest: int = 300, new_tokens: int = 48,
            max_num_seqs: int = 16, max_model_len: int = 512, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict:
    """How many streams equal the same prompt served alone and eagerly, per run (float32 and bfloat16, graphs
    and eager, all at once and staggered); `ok` is whether every graphs run matched every stream."""
    prompts = issue_prompts(count, longest)
    base = EngineConfig(model=str(checkpoint), device=device, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    results: dict = {"prompts": count, "prompt_lens": [len(p) for p in prompts], "new_tokens": new_tokens, "runs": {}}
    ok = True
    for dtype in dtypes:
        config = dataclasses.replace(base, dtype=dtype)
        alone = staggered(dataclasses.replace(config, policy="solo", cuda_graphs=False), prompts, new_tokens, 0)
        if len({tuple(t) for t in alone}) < count // 2:
            raise RuntimeError(f"{dtype}: most prompts give the same tokens: a comparison that cannot fail")
        for graphs in (False, True):
            for steps_between in (0, 3):
                got = staggered(dataclasses.replace(config, cuda_graphs=graphs), prompts, new_tokens, steps_between)
                same = sum(g == a for g, a in zip(got, alone))
                name = f"{dtype} {'graphs' if graphs else 'eager'} {'staggered' if steps_between else 'all at once'}"
                results["runs"][name] = {"identical": same, "of": count,
                                         "first_diff": [next((i for i, (x, y) in enumerate(zip(g, a)) if x != y),
                                                             None) for g, a in zip(got, alone)]}
                print(f"{name:<34} {same:>2} / {count} streams identical to alone", flush=True)
                ok &= same == count or not graphs
    results["ok"] = ok
    return results


def main() -> int:
    """Write the checkpoint under $TMPDIR and compare on CUDA if present; exit 1 on any graphs mismatch."""
    import tempfile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        results = compare(write_checkpoint(Path(tmp) / "issue21"), device)
    if not results["ok"]:
        print("MISMATCH: CUDA graphs give other tokens than eager decoding", flush=True)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
