"""Structured output through a real tritonserver: OpenAI's response_format with the official `openai` client,
and vLLM's guided_* keys in Triton's sampling_parameters, on the built-in random model."""

import json
import re

import httpx
import jsonschema
import pytest

from clients.triton_stream import ServerError, stream_grpc
from flover_backend.ports import server_ports
from flover_backend.sampling.structured_output import MAX_SCHEMA_BYTES
from flover_backend.server.repository import derive_repository
from flover_backend.server.serve import TritonServer
from tests.test_structured_output import MAX_PERSON_TOKENS, PERSON

pytestmark = pytest.mark.triton
SETTINGS = {"model": "builtin:tiny", "max_num_seqs": 8, "max_model_len": 512, "num_threads": 1}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, builtin_home):
    repo = derive_repository(tmp_path_factory.mktemp("triton") / "repo", ["flover"], settings=SETTINGS)
    ports = server_ports()
    with TritonServer(repo, **ports, log_path=repo.parent / "server.log") as running:
        yield running


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "sampled"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_parses_validates_and_stops(client, sampling, stream):
    args = {"model": "flover", "messages": MESSAGES, "max_tokens": MAX_PERSON_TOKENS, "response_format": PERSON_FORMAT,
            **sampling}
    if stream:
        chunks = list(client.chat.completions.create(**args, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**args).choices[0]
        content, finish_reason = choice.message.content, choice.finish_reason
    jsonschema.validate(json.loads(content), PERSON)
    assert finish_reason == "stop"


def test_completions_json_schema_and_json_object(client):
    completion = client.completions.create(model="flover", prompt="A pet:", max_tokens=MAX_PERSON_TOKENS,
                                           temperature=1.0, seed=5, extra_body={"response_format": PERSON_FORMAT})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    assert completion.choices[0].finish_reason == "stop"
    # Any JSON object: keys and strings are unbounded, so a random model may run to max_tokens inside one.
    choice = client.chat.completions.create(model="flover", messages=MESSAGES, max_tokens=40, temperature=1.0,
                                            seed=1, response_format={"type": "json_object"}).choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"
    text = client.chat.completions.create(model="flover", messages=MESSAGES, max_tokens=8, temperature=0,
                                          response_format={"type": "text"}).choices[0]
    assert text.finish_reason in ("length", "stop")


def _error(front, body: dict) -> tuple[int, dict]:
    reply = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=120)
    return reply.status_code, reply.json().get("error", {})


@pytest.mark.parametrize(("response_format", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}}, "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"properties": {"a": {"$ref": "#/no"}}}}},
     "cannot be compiled"),
    ({"type": "json_schema"}, "needs a json_schema"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "only allowed with type json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "big", "schema": {"description": "x" * MAX_SCHEMA_BYTES}}},
     f"at most {MAX_SCHEMA_BYTES}"),
    ({"type": "xml"}, "'text', 'json_object' or 'json_schema'"),
])
def test_a_bad_response_format_is_a_400_naming_it(front, client, response_format, words):
    status, error = _error(front, {"model": "flover", "messages": MESSAGES, "max_tokens": 8,
                                   "response_format": response_format})
    assert status == 400 and error["param"].startswith("response_format") and words in error["message"], error
    assert error["message"].startswith("response_format")
    answer = client.chat.completions.create(model="flover", messages=MESSAGES, max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens >= 1  # the server goes on


def test_triton_sampling_parameters_guided_choice_and_regex(server):
    choices = ["red", "green", "blue"]
    chunks = list(stream_grpc(server.grpc_url, "flover", text_input="A colour:", max_tokens=20, temperature=1.0,
                              seed=2, sampling_parameters=json.dumps({"guided_choice": choices})))
    assert "".join(c.text for c in chunks) in choices and chunks[-1].finish_reason == "stop"
    chunks = list(stream_grpc(server.grpc_url, "flover", text_input="A code:", max_tokens=20,
                              sampling_parameters=json.dumps({"guided_regex": r"[A-Z]{2}-[0-9]{4}"})))
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", "".join(c.text for c in chunks)) and chunks[-1].finish_reason == "stop"
    chunks = list(stream_grpc(server.grpc_url, "flover", text_input="A pet:", max_tokens=MAX_PERSON_TOKENS,
                              sampling_parameters=json.dumps({"guided_json": PERSON})))
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), PERSON)


@pytest.mark.parametrize(("sampling_parameters", "key"), [
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_json": {"type": "strin"}}, "guided_json"),
    ({"guided_choice": ["a"] * 1000}, "guided_choice"),
    ({"guided_json": "x" * (MAX_SCHEMA_BYTES + 1)}, "guided_json"),
])
def test_triton_bad_guided_key_is_an_error_naming_it(server, sampling_parameters, key):
    with pytest.raises(ServerError, match=key):
        list(stream_grpc(server.grpc_url, "flover", text_input="x", max_tokens=4,
                         sampling_parameters=json.dumps(sampling_parameters)))
    chunks = list(stream_grpc(server.grpc_url, "flover", text_input="still alive", max_tokens=3, ignore_eos=True))
    assert sum(len(c.token_ids) for c in chunks) == 3
