"""Soak: Poisson arrivals of random requests (sampled and greedy, a quarter cancelled) through both protocols.

Reports how many requests came back exact, cancelled, failed or wrong, and the RSS of tritonserver and of
the model's backend process every 15 s; the goal is nothing lost or wrong and backend RSS growth after
the first minute under 5%. Writes benchmarks/results/soak.{json,md}.

    python -m benchmarks.soak --duration 600            (make soak)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from clients.triton_stream import GrpcStream, stream_http
from flover_backend.ports import server_ports
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer
from flover_backend.server.watchdog import find_stubs

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_EVERY_S = 15.0
WARM_UP_S = 60.0  # RSS growth is measured from here: the first minute fills caches and allocator pools


@dataclass
class Job:
    """One soak request: what to send, over which protocol, and after how many tokens to cancel (0: never)."""

    prompt_ids: list[int]
    max_tokens: int
    sampled: bool
    protocol: str
    cancel_after: int

    def fields(self, seed: int) -> dict:
        """The request's inputs, as the flover model takes them."""
        fields = {"input_ids": self.prompt_ids, "max_tokens": self.max_tokens, "ignore_eos": True}
        if self.sampled:
            fields |= {"temperature": 0.8, "top_p": 0.9, "seed": seed}
        return fields


def make_job(rng: random.Random, vocab: int) -> Job:
    """A random request: prompt 4-64 tokens, 8-128 new ones, half sampled, either protocol, 25% cancelled."""
    max_tokens = rng.randint(8, 128)
    return Job(prompt_ids=[rng.randrange(3, vocab) for _ in range(rng.randint(4, 64))], max_tokens=max_tokens,
               sampled=rng.random() < 0.5, protocol=rng.choice(["grpc", "http"]),
               cancel_after=rng.randint(1, max_tokens - 1) if rng.random() < 0.25 else 0)


def run_job(server: TritonServer, job: Job, seed: int) -> tuple[int, str | None]:
    """Tokens received and the finish reason; stops reading after job.cancel_after tokens, which cancels it
    (gRPC: the stream is cancelled; HTTP: the connection is closed)."""
    if job.protocol == "grpc":
        chunks = iter(GrpcStream(server.grpc_url, "flover", job.fields(seed)))
    else:
        chunks = stream_http(server.http_url, "flover", **job.fields(seed))
    received, reason = 0, None
    with contextlib.closing(chunks):
        for chunk in chunks:
            received += len(chunk.token_ids)
            reason = chunk.finish_reason or reason
            if job.cancel_after and received >= job.cancel_after:
                break
    return received, reason


def outcome(job: Job, received: int, reason: str | None) -> str:
    """exact, cancelled or wrong: a request not cancelled must end by length with all its tokens."""
    if job.cancel_after:
        return "cancelled" if received >= job.cancel_after else "wrong"
    return "exact" if (received, reason) == (job.max_tokens, "length") else "wrong"


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(server: TritonServer, duration_s: float, mean_gap_s: float, vocab: int, seed: int,
         max_in_flight: int) -> dict:
    """Send requests for duration_s, sampling RSS; the counts of each outcome and the RSS samples."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    slots = threading.Semaphore(max_in_flight)
    samples = []
    threads = []

    def one(job: Job, job_seed: int) -> None:
        try:
            received, reason = run_job(server, job, job_seed)
            result = outcome(job, received, reason)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            result = "error"
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            slots.release()
        with lock:
            counts[result] += 1

    start = time.monotonic()
    next_sample = start
    while (now := time.monotonic()) - start < duration_s:
        if now >= next_sample:
            (stub,) = [s for s in find_stubs(server.process.pid) if s.model == "flover"]
            samples.append({"t_s": round(now - start, 1), "server_rss_kib": rss_kib(server.process.pid),
                            "backend_rss_kib": rss_kib(stub.pid), "finished": sum(counts.values())})
            print(f"[{samples[-1]['t_s']:6.0f} s] finished {samples[-1]['finished']:5d}  "
                  f"server {samples[-1]['server_rss_kib'] / 1024:7.1f} MiB  "
                  f"backend {samples[-1]['backend_rss_kib'] / 1024:7.1f} MiB  {dict(counts)}", flush=True)
            next_sample += SAMPLE_EVERY_S
        slots.acquire()
        thread = threading.Thread(target=one, args=(make_job(rng, vocab), rng.randrange(2**31)), daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(rng.expovariate(1.0 / mean_gap_s))
    for thread in threads:
        thread.join(timeout=600)
    return {"counts": dict(counts), "errors": errors[:20], "samples": samples, "sent": len(threads)}


def rss_growth(samples: list[dict], key: str) -> float | None:
    """Relative growth of `key` from the first sample after the warm-up to the last sample."""
    after = [s for s in samples if s["t_s"] >= WARM_UP_S]
    if len(after) < 2:
        return None
    return after[-1][key] / after[0][key] - 1.0


def write_results(result: dict, settings: dict) -> None:
    """soak.json with everything, soak.md with the verdict and the RSS table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    growth = {key: rss_growth(result["samples"], key) for key in ("server_rss_kib", "backend_rss_kib")}
    (RESULTS / "soak.json").write_text(json.dumps({"settings": settings, **result, "growth_after_warm_up": growth},
                                                  indent=1))
    counts = result["counts"]
    lines = [(f"# Soak: {settings['duration_s']:.0f} s of Poisson arrivals (mean gap {settings['mean_gap_s']} s), "
              f"{settings['model']}"),
             "", f"sent {result['sent']}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             "", "| after warm-up | growth |", "|---|---|"]
    lines += [f"| {key} | {value:+.1%} |" if value is not None else f"| {key} | (run too short) |"
              for key, value in growth.items()]
    lines += ["", "| t (s) | finished | server RSS (MiB) | backend RSS (MiB) |", "|---|---|---|---|"]
    lines += [f"| {s['t_s']:.0f} | {s['finished']} | {s['server_rss_kib'] / 1024:.1f} | "
              f"{s['backend_rss_kib'] / 1024:.1f} |" for s in result["samples"]]
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    lost = result["sent"] - sum(counts.values())
    print(f"soak: sent {result['sent']}, {dict(counts)}, lost {lost}; backend RSS after warm-up "
          + (f"{growth['backend_rss_kib']:+.1%}" if growth["backend_rss_kib"] is not None else "n/a"))


def main(argv: list[str] | None = None) -> int:
    """Start a server on the chosen model, soak it, write the results; non-zero if anything was lost or wrong."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    parser.add_argument("--mean-gap", type=float, default=0.05, help="mean seconds between arrivals")
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--max-in-flight", type=int, default=64, help="client threads at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = {"model": args.model, "max_num_seqs": 16, "max_model_len": 256, "num_threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        repo = derive_repository(Path(tmp) / "repo", ["flover"], settings)
        ports = server_ports()
        with TritonServer(repo, **ports, log_path=Path(tmp) / "server.log") as server:
            vocab = 32000
            result = soak(server, args.duration, args.mean_gap, vocab, args.seed, args.max_in_flight)
    write_results(result, {"duration_s": args.duration, "mean_gap_s": args.mean_gap, **settings})
    bad = result["counts"].get("error", 0) + result["counts"].get("wrong", 0)
    return int(bad > 0 or sum(result["counts"].values()) != result["sent"])


if __name__ == "__main__":
    raise SystemExit(main())
