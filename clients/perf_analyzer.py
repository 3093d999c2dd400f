"""Drive perf_analyzer (shipped in the tritonclient wheel) against a streaming, decoupled model.

What perf_analyzer 2.51 needs for a decoupled model: `-i grpc --async --streaming`. Without them it
exits 99 with "Decoupled models must be run with `--async` and `--streaming` and either `-i grpc` or
`--service-kind=triton_c_api`"; HTTP is refused even with --streaming. It then reports "Detected
decoupled model, using the first response for measuring latency": latency is time to first response,
`Throughput` counts requests and `Response Throughput` counts streamed responses. By default it repeats
--measurement-interval windows until three agree within --stability-percentage (10 %) and exits 2 if
they never do in --max-trials (10), which a busy small machine hits; --request-count N instead sends
exactly N requests and measures them once. --input-data takes JSON `{"data": [{"<input>": [values]}]}`,
one entry per request, cycled.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path

from flover_backend.triton_env import pytriton_libs, work_dir

# perf_analyzer's two libraries outside glibc, by soname, and the copies nvidia-pytriton vendors for its
# own tritonserver (auditwheel renamed them). Linking to those spares apt's libb64-0d and a pip CUDA runtime.
VENDORED_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
THROUGHPUT = re.compile(r"^\s*Throughput: ([\d.]+) infer/sec", re.MULTILINE)


def perf_analyzer_path() -> Path:
    """The perf_analyzer binary that tritonclient[all] installed beside this interpreter's scripts."""
    path = Path(sysconfig.get_path("scripts")) / "perf_analyzer"
    if not path.exists():
        raise FileNotFoundError(f"no perf_analyzer at {path}: pip install 'tritonclient[all]'")
    return path


def prepare_perf_libs(dest: Path | None = None) -> Path:
    """Link the sonames perf_analyzer loads to nvidia-pytriton's vendored copies; return the folder."""
    dest = Path(dest or work_dir() / "perf_analyzer_libs")
    dest.mkdir(parents=True, exist_ok=True)
    for soname, pattern in VENDORED_LIBS.items():
        link = dest / soname
        if link.exists():
            continue
        targets = sorted(pytriton_libs().glob(pattern))
        if not targets:
            raise FileNotFoundError(f"nvidia-pytriton no longer vendors {pattern} in {pytriton_libs()}")
        link.unlink(missing_ok=True)  # a dangling link left by an older pytriton
        try:
            link.symlink_to(targets[-1])
        except FileExistsError:  # a concurrent run linked it first
            pass
    return dest


def perf_analyzer_env() -> dict[str, str]:
    """The environment perf_analyzer runs in: this one, with its libraries on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(prepare_perf_libs()), env.get("LD_LIBRARY_PATH")]))
    return env


def write_input_data(path: str | Path, requests: list[dict[str, list]]) -> Path:
    """Write perf_analyzer's --input-data JSON: one {input name: values} dict per request."""
    path = Path(path)
    path.write_text(json.dumps({"data": requests}))
    return path


def perf_analyzer_command(model: str, url: str, concurrency: int | str, input_json_path: str | Path,
                          measurement_ms: int = 5000, *, request_count: int = 0,
                          stability_percentage: float = 10.0, max_trials: int = 10,
                          extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """perf_analyzer's command line for a decoupled model streamed over gRPC at `url` (host:port).

    `concurrency` is one level or a "start:end:step" range; a non-zero `request_count` replaces the
    stability search with one measurement of exactly that many requests.
    """
    command = [
        str(perf_analyzer_path()), "-m", model, "-u", url, "-i", "grpc", "--async", "--streaming",
        f"--input-data={input_json_path}", f"--concurrency-range={concurrency}",
        f"--measurement-interval={measurement_ms}", f"--stability-percentage={stability_percentage}",
        f"--max-trials={max_trials}",
    ]
    if request_count:
        command.append(f"--request-count={request_count}")
    return [*command, *extra_args]


def parse_throughput(output: str) -> list[float]:
    """Requests per second from perf_analyzer's report, one per concurrency level measured."""
    return [float(value) for value in THROUGHPUT.findall(output)]
