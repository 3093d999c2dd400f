"""The flover models served by a real tritonserver: streaming, errors, cancellation, metrics, baselines."""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.loadgen import replay, triton_http_sender, triton_sender
from clients.perf_analyzer import parse_throughput, perf_analyzer_command, perf_analyzer_env, write_input_data
from clients.triton_stream import (
    GrpcStream,
    ServerError,
    generate_http,
    grpc_inputs,
    stream_grpc,
    stream_http,
)
from clients.workload import make_trace
from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.frontends.triton.metrics import METRICS
from flover_backend.frontends.triton.schema import INPUTS, OUTPUTS
from flover_backend.ports import server_ports
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer
from tests.waiting import wait_for

pytestmark = pytest.mark.triton
SETTINGS = {"model": "builtin:tiny", "max_num_seqs": 16, "max_model_len": 256, "num_threads": 1}
PROMPT = "Temporal fusion on Triton"


@pytest.fixture(scope="module")
def server(tmp_path_factory, builtin_home):
    repo = derive_repository(tmp_path_factory.mktemp("triton") / "repo", settings=SETTINGS,
                             instance_counts={"flover_instances": 2},
                             variants={"flover_tp2": ("flover", {"tensor_parallel_size": 2, "max_model_len": 1024}),
                                       "flover_busy": ("flover", {"policy": "window", "window_ms": 600_000,
                                                                 "max_num_waiting": 2, "log_level": "warning"}),
                                       # The tiny model's whole context: a request of ~1000 tokens outlives the
                                       # 0.1 s ticks of cancel polls and metric updates many times over.
                                       "flover_long": ("flover", {"max_model_len": 1024}),
                                       # Admits two requests together, in arrival order, whenever two wait.
                                       "flover_pair": ("flover", {"policy": "window", "window_ms": 600_000,
                                                                 "max_batch": 2})})
    ports = server_ports()
    with TritonServer(repo, **ports, log_path=repo.parent / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def reference():
    """The in-process engine's greedy answer to PROMPT (what every protocol must return) and PROMPT's length."""
    config = EngineConfig(**SETTINGS)
    with Engine(config) as engine:
        outputs = list(engine.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True)))
    return [t for o in outputs for t in o.new_token_ids], "".join(o.new_text for o in outputs), outputs[-1].num_prompt_tokens


def metrics_page(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def metric(server, name: str, model: str = "flover", page: str | None = None, **labels: str) -> float:
    """The sum of `name`'s series for `model` whose labels include `labels` (read now, or from `page`)."""
    wanted = {"model": model, **labels}
    found = re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", page or metrics_page(server), re.MULTILINE)
    values = [float(value) for series, value in found
              if wanted.items() <= dict(re.findall(r'(\w+)="([^"]*)"', series)).items()]
    assert values, f"{name} {wanted} not on the metrics page"
    return sum(values)


@pytest.mark.parametrize("model", ["flover", "flover_window", "flover_instances", "flover_tp2"])
def test_grpc_stream_equals_in_process_engine(server, reference, model):
    chunks = list(stream_grpc(server.grpc_url, model, text_input=PROMPT, max_tokens=24, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == reference[0]
    assert "".join(c.text for c in chunks) == reference[1]
    assert len(chunks) > 1 and chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 24


def test_http_generate_stream_and_non_streaming_equal_engine(server, reference):
    chunks = list(stream_http(server.http_url, "flover", text_input=PROMPT, max_tokens=24, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == reference[0]
    assert chunks[-1].finish_reason == "length"
    whole = generate_http(server.http_url, "flover", text_input=PROMPT, max_tokens=24, ignore_eos=True,
                          exclude_input_in_output=True)
    assert whole.text == reference[1] and whole.token_ids == reference[0] and whole.finish_reason == "length"
    with_prompt = generate_http(server.http_url, "flover", text_input=PROMPT, max_tokens=24, ignore_eos=True)
    assert with_prompt.text == PROMPT + reference[1]


def test_logprobs_and_penalties_equal_the_in_process_engine(server):
    """As a vLLM-backend client asks: N in sampling_parameters, the outputs by flags; streamed and whole."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3, repetition_penalty=1.3, presence_penalty=0.5)
    with Engine(EngineConfig(**SETTINGS)) as engine:
        outputs = list(engine.generate(PROMPT, params))
        decoded = {t: engine.tokenizer.decode([t], skip_special_tokens=False)
                   for o in outputs for entry in o.logprobs for t in [entry.token_id, *entry.top_token_ids]}
    want = [entry for o in outputs for entry in o.logprobs]
    fields = {"text_input": PROMPT, "max_tokens": 12, "ignore_eos": True, "repetition_penalty": 1.3,
              "presence_penalty": 0.5, "return_logprobs": True, "return_cumulative_logprob": True,
              "sampling_parameters": json.dumps({"logprobs": "3"})}
    chunks = list(stream_grpc(server.grpc_url, "flover", **fields))
    assert [t for c in chunks for t in c.token_ids] == [entry.token_id for entry in want]
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in chunks)
    whole = generate_http(server.http_url, "flover", **fields)
    for got in ([step for c in chunks for step in c.logprobs], whole.logprobs):
        assert len(got) == len(want) == 12
        for step, entry in zip(got, want):
            expected = {entry.token_id: (entry.logprob, entry.rank)}  # the chosen token first, then the top 3
            for rank, (token_id, logprob) in enumerate(zip(entry.top_token_ids, entry.top_logprobs), start=1):
                expected.setdefault(token_id, (logprob, rank))
            assert list(step) == [str(t) for t in expected]
            assert step == {str(t): {"logprob": pytest.approx(lp, abs=1e-5), "rank": rank, "decoded_token": decoded[t]}
                            for t, (lp, rank) in expected.items()}
    assert chunks[-1].cumulative_logprob == pytest.approx(outputs[-1].cumulative_logprob, abs=1e-4)
    assert whole.cumulative_logprob == pytest.approx(outputs[-1].cumulative_logprob, abs=1e-4)


def test_64_concurrent_streams_over_16_rows_all_complete(server):
    counts, errors = {}, []

    def one(i: int) -> None:
        try:
            chunks = list(stream_grpc(server.grpc_url, "flover", text_input=f"stream {i}", max_tokens=12 + i % 5,
                                      ignore_eos=True))
            counts[i] = (sum(len(c.token_ids) for c in chunks), chunks[-1].finish_reason)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors
    assert counts == {i: (12 + i % 5, "length") for i in range(64)}


def http_status(server, path: str) -> int:
    """The HTTP status tritonserver answers a GET of `path` with."""
    try:
        return urllib.request.urlopen(server.http_url + path, timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code




def test_cancel_frees_row_and_others_finish(server):
    """A cancelled request's row is freed while another runs on, and that one still gets every token.

    The victim is cancelled as soon as both streams have a token, so the row is freed within a few 0.1 s
    ticks of cancel polls and metric updates, while the keeper has most of its 1000 tokens still to go.
    """
    model, max_tokens = "flover_long", 1000
    keeper_chunks = []

    keeper = threading.Thread(target=lambda: keeper_chunks.extend(GrpcStream(  # appends each chunk as it comes
        server.grpc_url, model, {"text_input": "keep going", "max_tokens": max_tokens, "ignore_eos": True})))
    keeper.start()
    assert wait_for(lambda: keeper_chunks)
    victim = GrpcStream(server.grpc_url, model, {"text_input": "cancel me", "max_tokens": max_tokens, "ignore_eos": True})
    next(iter(victim))
    victim.cancel()

    def keeper_alone_holds_a_row() -> bool:
        page = metrics_page(server)
        return (metric(server, "flover_requests_running", model, page=page) == 1
                and metric(server, "flover_arena_rows_in_use", model, page=page) == 1
                and metric(server, "flover_kv_cache_bytes_in_use", model, page=page) > 0)

    assert wait_for(keeper_alone_holds_a_row)
    assert keeper_chunks[-1].finish_reason is None  # the keeper was still running
    keeper.join(timeout=120)
    assert sum(len(c.token_ids) for c in keeper_chunks) == max_tokens and keeper_chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("fields, field", [
    ({"max_tokens": 4}, "prompt"),
    ({"text_input": "x", "input_ids": [1, 2]}, "prompt"),
    ({"text_input": "x" * (32 * 256 + 1)}, "text_input"),
    ({"input_ids": [-5, 3]}, "input_ids"),
    ({"text_input": "x", "stop": ["s" * 257]}, "stop"),
    ({"text_input": "x", "stop_token_ids": list(range(257))}, "stop_token_ids"),
    ({"text_input": "x", "sampling_parameters": "[" * 50_000}, "sampling_parameters"),
    ({"text_input": "x", "max_tokens": -3}, "max_tokens"),
    ({"text_input": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"text_input": "x", "top_p": 1.5}, "top_p"),
    ({"text_input": "x", "top_p": 0.0}, "top_p"),
    ({"text_input": "x", "presence_penalty": 3.0}, "presence_penalty"),
    ({"text_input": "x", "sampling_parameters": '{"logprobs": 50}'}, "logprobs"),
    ({"text_input": "word " * 400, "max_tokens": 4}, "prompt"),
    ({"text_input": "x", "sampling_parameters": "{oops"}, "sampling_parameters"),
    ({"text_input": b"\xff\xfe bad utf-8"}, "text_input"),
])
def test_bad_input_gets_error_naming_field_and_server_goes_on(server, fields, field):
    with pytest.raises(ServerError, match=field):
        list(stream_grpc(server.grpc_url, "flover", **fields))
    chunks = list(stream_grpc(server.grpc_url, "flover", text_input="still alive", max_tokens=3, ignore_eos=True))
    assert sum(len(c.token_ids) for c in chunks) == 3


def test_huge_prompt_is_refused_before_tokenizing_while_others_stream(server):
    keeper = iter(GrpcStream(server.grpc_url, "flover", {"text_input": "keep", "max_tokens": 200, "ignore_eos": True}))
    next(keeper)
    with pytest.raises(ServerError, match="text_input: longer than"):
        list(stream_grpc(server.grpc_url, "flover", text_input="x" * 10_000_000, max_tokens=4))
    rest = list(keeper)
    assert rest[-1].finish_reason == "length" and rest[-1].num_output_tokens == 200


def test_full_queue_answers_busy_at_once_and_takes_requests_again_once_it_drains(server):
    """flover_busy's window never closes by itself: its requests wait until cancelled, whatever the speed."""
    params = {"text_input": "wait", "max_tokens": 4}
    waiting = [GrpcStream(server.grpc_url, "flover_busy", params) for _ in range(2)]
    assert wait_for(lambda: metric(server, "flover_requests_waiting", "flover_busy") == 2)
    refused = metric(server, "flover_request_refused_total", "flover_busy", reason="busy")
    with pytest.raises(ServerError, match="busy"):
        list(stream_grpc(server.grpc_url, "flover_busy", text_input="refused", max_tokens=2))
    assert wait_for(lambda: metric(server, "flover_request_refused_total", "flover_busy", reason="busy") == refused + 1)
    for stream in waiting:
        stream.cancel()
    assert wait_for(lambda: metric(server, "flover_requests_waiting", "flover_busy") == 0)
    again = GrpcStream(server.grpc_url, "flover_busy", params)
    assert wait_for(lambda: metric(server, "flover_requests_waiting", "flover_busy") == 1)
    again.cancel()


@pytest.mark.parametrize("model", ["flover", "flover_window", "flover_instances"])
def test_the_model_declares_the_schemas_inputs_and_outputs(server, model):
    """config.pbtxt lists none: the model declares them (auto_complete_config, from the parameter table)."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    for section, specs, optional in (("input", INPUTS, True), ("output", OUTPUTS, False)):
        declared = {(t["name"], t["data_type"], tuple(int(d) for d in t["dims"]), bool(t.get("optional")))
                    for t in config[section]}
        assert declared == {(s.name, s.data_type, s.dims, optional) for s in specs}


def post_generate(server, fields: dict) -> dict:
    """A plain HTTP /generate, as Triton's tooling sends it (no `stream` input)."""
    request = urllib.request.Request(f"{server.http_url}/v2/models/flover/generate", data=json.dumps(fields).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_generate_without_stream_is_one_response_with_reason_and_counts(server, reference):
    """As vllm_backend: no `stream` means false; the return_* flags add the outputs of their names."""
    ids, text, num_prompt_tokens = reference
    plain = post_generate(server, {"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True})
    assert plain["output_ids"] == ids[:8] and plain["text_output"].startswith(PROMPT)
    flagged = post_generate(server, {"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True,
                                     "exclude_input_in_output": True, "return_finish_reason": True,
                                     "return_num_input_tokens": True, "return_num_output_tokens": True})
    assert flagged["output_ids"] == ids[:8] and text.startswith(flagged["text_output"])
    assert (flagged["finish_reason"], flagged["num_input_tokens"], flagged["num_output_tokens"]) == (
        "length", num_prompt_tokens, 8)


@pytest.mark.parametrize("flag", [True, False])
def test_return_flags_follow_vllm_backend_on_every_streamed_response(server, reference, flag):
    """Set: on every response, finish_reason "None" until the last, num_output_tokens that response's tokens.
    False: never (unset, the final response carries the reason and the totals, as tests above check)."""
    flags = dict.fromkeys(("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"), flag)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("flover", grpc_inputs({"text_input": PROMPT, "max_tokens": 10, "ignore_eos": True,
                                                     "stream": True, **flags}))
    responses = []
    try:
        while not responses or responses[-1].as_numpy("finish_reason") is None or (
                responses[-1].as_numpy("finish_reason")[0] == b"None"):
            result, error = results.get(timeout=120)
            assert error is None, error
            responses.append(result)
            if not flag and sum(len(r.as_numpy("output_ids")) for r in responses) == 10:
                break
    finally:
        client.stop_stream()
        client.close()
    outputs = {name: [r.as_numpy(name) for r in responses]
               for name in ("finish_reason", "num_input_tokens", "num_output_tokens")}
    if not flag:
        assert all(value is None for values in outputs.values() for value in values)
        return
    assert len(responses) > 1
    assert [r[0].decode() for r in outputs["finish_reason"]] == ["None"] * (len(responses) - 1) + ["length"]
    assert {int(n[0]) for n in outputs["num_input_tokens"]} == {reference[2]}
    assert [int(n[0]) for n in outputs["num_output_tokens"]] == [len(r.as_numpy("output_ids")) for r in responses]
    assert sum(int(n[0]) for n in outputs["num_output_tokens"]) == 10


def test_vllm_sampling_parameters_are_honoured_and_the_rest_refused_by_name(server, reference):
    ids, text, _ = reference
    stop = text[6:9]  # the reference text's own characters: greedy output reaches them
    assert stop and text.find(stop) == 6
    keys = {"n": 1, "best_of": 1, "skip_special_tokens": True, "spaces_between_special_tokens": True,
            "detokenize": True, "include_stop_str_in_output": True, "stop": [stop], "max_tokens": 24,
            "ignore_eos": "true"}
    whole = post_generate(server, {"text_input": PROMPT, "exclude_input_in_output": True,
                                   "sampling_parameters": json.dumps(keys)})
    assert whole["text_output"] == text[:9] and whole["finish_reason"] == "stop"
    without = post_generate(server, {"text_input": PROMPT, "exclude_input_in_output": True,
                                     "sampling_parameters": json.dumps(keys | {"include_stop_str_in_output": False})})
    assert without["text_output"] == text[:6]
    ids_only = post_generate(server, {"text_input": PROMPT, "exclude_input_in_output": True, "max_tokens": 5,
                                      "ignore_eos": True, "sampling_parameters": json.dumps({"detokenize": False})})
    assert ids_only["text_output"] == "" and ids_only["output_ids"] == ids[:5]
    for refused, field in (({"min_p": 0.1}, "min_p"), ({"n": 2}, "n"), ({"best_of": 3}, "best_of")):
        with pytest.raises(ServerError, match=field):
            generate_http(server.http_url, "flover", text_input=PROMPT, sampling_parameters=json.dumps(refused))


def test_request_parameters_set_the_sampling_as_vllm_backend_takes_them(server, reference):
    """A vllm_backend client's `parameters=` (numbers as strings), beside Triton's own empty-final flag."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("flover", grpc_inputs({"text_input": PROMPT, "stream": True,
                                                     "exclude_input_in_output": True}),
                              parameters={"max_tokens": "5", "ignore_eos": True}, enable_empty_final_response=True)
    token_ids = []
    try:
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            if result.as_numpy("output_ids") is not None:
                token_ids += result.as_numpy("output_ids").tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert token_ids == reference[0][:5]


def test_wrong_dtype_and_shape_rejected_naming_the_input(server):
    inputs = grpc_inputs({"text_input": "x"})
    wrong_dtype = grpcclient.InferInput("max_tokens", [1], "FP32")
    wrong_dtype.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    errors = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: errors.put(error))
    client.async_stream_infer("flover", inputs + [wrong_dtype])
    assert "max_tokens" in str(errors.get(timeout=30))
    client.stop_stream()
    client.close()
    with pytest.raises(ServerError, match="text_input"):
        list(stream_http(server.http_url, "flover", text_input=["a", "b"], max_tokens=2))
    with pytest.raises(ServerError):  # Triton's own JSON parser refuses it before the model sees it
        list(stream_http(server.http_url, "flover", text_input="x", max_tokens="four"))


def test_metrics_count_iterations_tokens_and_ttft(server):
    names = ("flover_iterations_total", "flover_generated_tokens_total", "flover_time_to_first_token_seconds_count",
             "flover_iteration_seconds_count")
    before = {name: metric(server, name) for name in names}
    list(stream_grpc(server.grpc_url, "flover", text_input="count me", max_tokens=5, ignore_eos=True))
    # Alone on the model: one iteration writes the prompt and gives the first token, four more decode.
    expected = {name: 1 if "first_token" in name else 5 for name in names}
    # The response thread publishes metrics every few tens of milliseconds.
    assert wait_for(lambda: {name: metric(server, name) - before[name] for name in names} == expected)
    assert metric(server, "flover_requests_waiting") == 0


def test_every_declared_metric_is_on_the_metrics_page(server):
    exported = set(re.findall(r"^# TYPE (\S+) (\w+)$", metrics_page(server), re.MULTILINE))
    assert {(spec.name, spec.kind) for spec in METRICS} <= exported


REQUEST_HISTOGRAMS = ("flover_request_prompt_tokens", "flover_request_generation_tokens",
                      "flover_e2e_request_latency_seconds", "flover_request_queue_time_seconds",
                      "flover_time_to_first_token_seconds", "flover_time_per_output_token_seconds")


def test_request_metrics_move_by_exactly_what_was_served(server, reference):
    """Requests of known sizes, one after another: every per-request histogram and token count moves by them."""
    assert wait_for(lambda: metric(server, "flover_requests_running") == 0)
    names = [f"{name}_count" for name in REQUEST_HISTOGRAMS] + [
        "flover_request_prompt_tokens_sum", "flover_request_generation_tokens_sum", "flover_prompt_tokens_total",
        "flover_generated_tokens_total"]
    reasons = ("length", "stop")

    def snapshot() -> dict:
        page = metrics_page(server)
        return ({name: metric(server, name, page=page) for name in names}
                | {reason: metric(server, "flover_request_success_total", page=page, finished_reason=reason)
                   for reason in reasons})

    before = snapshot()
    sizes = [(3, 4), (5, 6), (8, 7)]  # (prompt ids, max_tokens): each ends by length
    finals = [list(stream_grpc(server.grpc_url, "flover", input_ids=list(range(10, 10 + num_ids)),
                               max_tokens=max_tokens, ignore_eos=True))[-1] for num_ids, max_tokens in sizes]
    greedy, _, num_prompt_tokens = reference
    stop_at = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])  # ends at its first sight
    finals.append(list(stream_grpc(server.grpc_url, "flover", text_input=PROMPT, max_tokens=24, ignore_eos=True,
                                   stop_token_ids=[greedy[stop_at]]))[-1])
    assert [(f.finish_reason, f.num_output_tokens) for f in finals] == [("length", m) for _, m in sizes] + [
        ("stop", stop_at + 1)]
    prompt_tokens = sum(n for n, _ in sizes) + num_prompt_tokens
    generated = sum(m for _, m in sizes) + stop_at + 1
    assert wait_for(lambda: metric(server, "flover_request_generation_tokens_count")
                    == before["flover_request_generation_tokens_count"] + 4)
    after = snapshot()
    grown = {key: after[key] - before[key] for key in before}
    assert grown == {**{f"{name}_count": 4 for name in REQUEST_HISTOGRAMS},
                     "flover_request_prompt_tokens_sum": prompt_tokens, "flover_prompt_tokens_total": prompt_tokens,
                     "flover_request_generation_tokens_sum": generated, "flover_generated_tokens_total": generated,
                     "length": 3, "stop": 1}


def test_refused_requests_are_counted_by_cause(server):
    def refused(reason: str) -> float:
        return metric(server, "flover_request_refused_total", reason=reason)

    before = {reason: refused(reason) for reason in ("invalid", "busy", "unavailable", "internal")}
    for fields in ({"text_input": "x", "max_tokens": -3}, {"input_ids": [-5, 3]}):
        with pytest.raises(ServerError):
            list(stream_grpc(server.grpc_url, "flover", **fields))
    assert wait_for(lambda: refused("invalid") == before["invalid"] + 2)
    assert {reason: refused(reason) for reason in ("busy", "unavailable", "internal")} == {
        reason: before[reason] for reason in ("busy", "unavailable", "internal")}


def test_arena_gauges_and_compaction_follow_the_rows(server):
    """flover_pair admits a short and a long request together: the short one ends first, from row 0, so the long
    one's row moves down once, carrying exactly its cached positions."""
    model = "flover_pair"
    page = metrics_page(server)
    num_rows = metric(server, "flover_arena_rows", model, page=page)
    allocated = metric(server, "flover_kv_cache_bytes_allocated", model, page=page)
    assert num_rows == SETTINGS["max_num_seqs"] and allocated > 0
    bytes_per_position = allocated / (num_rows * SETTINGS["max_model_len"])
    compactions = metric(server, "flover_compaction_seconds_count", model, page=page)
    moved = metric(server, "flover_compaction_bytes_total", model, page=page)
    short = GrpcStream(server.grpc_url, model, {"input_ids": [1, 2, 3], "max_tokens": 5, "ignore_eos": True})
    assert wait_for(lambda: metric(server, "flover_requests_waiting", model) == 1)  # row 0 is the short one's
    long_ids = list(range(20, 27))
    long = GrpcStream(server.grpc_url, model, {"input_ids": long_ids, "max_tokens": 20, "ignore_eos": True})
    assert sum(len(chunk.token_ids) for chunk in short) == 5
    assert sum(len(chunk.token_ids) for chunk in long) == 20

    def settled() -> str | None:
        """The metrics page once every figure the test reads has been published (one update is many round trips
        to the server, so a scrape can land inside one)."""
        page = metrics_page(server)
        published = (metric(server, "flover_arena_rows_in_use", model, page=page) == 0
                     and metric(server, "flover_compaction_seconds_count", model, page=page) == compactions + 1
                     and metric(server, "flover_compaction_bytes_total", model, page=page) != moved
                     and metric(server, "flover_kv_cache_bytes_in_use", model, page=page) == 0
                     and metric(server, "flover_kv_cache_usage_perc", model, page=page) == 0)
        return page if published else None

    # Every gauge reaches its idle value (the arena empty, the compaction counted)...
    page = wait_for(settled)
    assert page
    # ...and when the short one left, its row was kept for prefix reuse and moved out of the live span first (its
    # 3 prompt tokens and 4 of its 5 tokens), then the long one moved down, holding its prompt and 4 tokens so far.
    assert metric(server, "flover_compaction_bytes_total", model, page=page) - moved == (
        (3 + 4 + len(long_ids) + 4) * bytes_per_position)


def test_finished_requests_are_logged_without_their_prompts(server):
    probe = "a prompt that must stay out of the log"
    list(stream_grpc(server.grpc_url, "flover", text_input=probe, max_tokens=19, ignore_eos=True))
    line = re.compile(r" INFO flover_\S+ flover_backend\.engine\.engine: finished flover_\S+: finish_reason=length "
                      r"prompt_tokens=\d+ output_tokens=19 cached_tokens=\d+ queue_time=")
    assert wait_for(lambda: line.search(server.log_path.read_text(errors="replace")))
    log = server.log_path.read_text(errors="replace")
    assert probe not in log
    # flover_busy logs at warning: its cancelled requests (test_full_queue_...) left no INFO line.
    assert " INFO flover_busy_" not in log and re.search(r" INFO flover_0\S* flover_backend\.engine\.engine: finished", log)


def test_perf_analyzer_streams_against_flover(server, tmp_path):
    data = write_input_data(tmp_path / "input.json",
                            [{"text_input": ["perf"], "max_tokens": [8], "ignore_eos": [True], "stream": [True]}])
    command = perf_analyzer_command("flover", server.grpc_url, 4, data, 5000, request_count=16)
    done = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (throughput,) = parse_throughput(done.stdout)
    assert throughput > 0


def test_dropped_http_connection_cancels_generation(server):
    model, max_tokens = "flover_long", 1000
    before = metric(server, "flover_generated_tokens_total", model)
    body = json.dumps({"text_input": "drop me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/%s/generate_stream HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (model.encode(), len(body), body))
        received = b""
        while b"text_output" not in received:  # until the first token arrives: generation is under way
            chunk = sock.recv(65536)
            assert chunk, "the server closed the stream before the first token"
            received += chunk
    assert wait_for(lambda: metric(server, "flover_requests_running", model) == 0)
    time.sleep(0.3)
    assert metric(server, "flover_generated_tokens_total", model) - before < max_tokens  # stopped early, row freed


def parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def test_lost_tensor_parallel_worker_fails_requests_clearly_and_unloads_the_model(server):
    """Runs last: flover_tp2 is gone afterwards, and the server reports not ready."""
    # 1000 tokens: the request is still running when the worker dies, however fast the machine.
    stream = iter(GrpcStream(server.grpc_url, "flover_tp2", {"text_input": "x", "max_tokens": 1000, "ignore_eos": True}))
    next(stream)
    found = subprocess.run(["pgrep", "-f", "flover_backend.execution.worker_main"], capture_output=True, text=True,
                           check=True)
    (worker,) = [pid for pid in map(int, found.stdout.split()) if parent(parent(pid)) == server.process.pid]
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(ServerError, match="rank 1 exited"):
        list(stream)
    assert wait_for(lambda: http_status(server, "/v2/models/flover_tp2/ready") != 200)  # unloaded itself
    with pytest.raises(ServerError, match="flover_tp2"):
        list(stream_grpc(server.grpc_url, "flover_tp2", text_input="after", max_tokens=2))
    chunks = list(stream_grpc(server.grpc_url, "flover", text_input="others unaffected", max_tokens=3))
    assert sum(len(c.token_ids) for c in chunks) == 3
    assert http_status(server, "/v2/models/flover/ready") == 200
    assert http_status(server, "/v2/health/ready") == 400  # strict readiness: a probe takes this replica out


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_generator_replays_a_trace_and_stamps_every_token(server, protocol):
    trace = make_trace(3, interval_s=0.0, gen_len=(3, 7), seed=2)
    sender = (triton_sender(server.grpc_url, "flover", sampled=True) if protocol == "grpc"
              else triton_http_sender(server.http_url, "flover", sampled=True))
    timings = replay(trace, sender, show_progress=False)
    assert [t.num_tokens for t in timings] == [item.max_tokens for item in trace]
    for timing in timings:
        assert timing.arrival <= timing.token_times[0] and timing.token_times == sorted(timing.token_times)
        assert timing.finish_reason == "length" and timing.end >= timing.token_times[-1]
