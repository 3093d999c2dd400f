"""Prompt logprobs and several prompts per request through `flover serve`: lm-eval's loglikelihood task end to
end on its OpenAI port, OpenAI's echo + logprobs shape and Triton's `prompt_logprobs` output, both equal to
transformers' log-softmax on the same fp32 weights."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flover_backend.frontends.openai.protocol import Limits
from flover_backend.ports import free_ports
from flover_backend.triton_env import PROJECT_ROOT
from tests.waiting import wait_for

pytestmark = pytest.mark.triton
SETTINGS = {"model": "builtin:tiny", "max_num_seqs": 8, "max_model_len": 256, "num_threads": 1}
PROMPT = "Temporal fusion joins requests at every iteration boundary."
# A multiple-choice task lm-eval reads from local files: nothing is downloaded.
DOCS = [{"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "answer": 0},
        {"question": "Two plus two equals", "choices": ["three", "four"], "answer": 1},
        {"question": "Fire is", "choices": ["cold", "hot", "square", "slow"], "answer": 1},
        {"question": "A cat says", "choices": ["meow", "moo"], "answer": 0},
        {"question": "Ice is made of", "choices": ["water", "sand", "glass"], "answer": 0}]
TASK_YAML = """task: flover_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, builtin_home):
    """`flover serve` with the OpenAI port: its ports; the whole process group is killed at the end."""
    ports = free_ports("http-port", "grpc-port", "metrics-port", "openai-port")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "flover_backend", "serve", "--models", "flover",
               *[f"--set={key}={value}" for key, value in SETTINGS.items()],
               *[f"--{name}={port}" for name, port in ports.items()]]
    with open(log, "w") as out:
        cli = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        urls = {"openai": f"http://127.0.0.1:{ports['openai-port']}", "http": f"http://127.0.0.1:{ports['http-port']}"}
        assert wait_for(lambda: cli.poll() is not None or _ready(urls["openai"]), timeout_s=300) and cli.poll() is None, \
            log.read_text()[-3000:]
        yield urls
    finally:
        os.killpg(cli.pid, signal.SIGTERM)
        try:
            cli.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


def _ready(url: str) -> bool:
    try:
        return "flover" in httpx.get(f"{url}/v1/models", timeout=5).text
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    """transformers' model and tokenizer of the served checkpoint, fp32."""
    return (AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_checkpoint))


def hf_logprobs(hf, token_ids: list[int]) -> torch.Tensor:
    """log-softmax after each prefix: row i is the distribution of token i + 1, (len - 1, vocab)."""
    with torch.no_grad():
        return torch.log_softmax(hf[0](torch.tensor([token_ids])).logits[0].float(), dim=-1)[:-1]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served['openai']}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_are_transformers_log_softmax(client, hf, stream, max_tokens):
    ids = hf[1](PROMPT)["input_ids"]  # as the engine tokenizes a text prompt (special tokens added)
    want = hf_logprobs(hf, ids)
    args = {"model": "flover", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "echo": True,
            "logprobs": 2}
    if stream:
        chunks = [chunk for chunk in client.completions.create(**args, stream=True) if chunk.choices]
        text = "".join(chunk.choices[0].text for chunk in chunks)
        logprobs = {key: [v for chunk in chunks if chunk.choices[0].logprobs
                          for v in getattr(chunk.choices[0].logprobs, key)] for key in ("tokens", "token_logprobs",
                                                                                       "top_logprobs", "text_offset")}
        finish = chunks[-1].choices[0].finish_reason
    else:
        completion = client.completions.create(**args)
        text, logprobs = completion.choices[0].text, completion.choices[0].logprobs.model_dump()
        finish = completion.choices[0].finish_reason
        assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == max_tokens
    assert text.startswith(PROMPT) and (text == PROMPT) == (max_tokens == 0) and finish == "length"
    assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # nothing precedes it
    got = logprobs["token_logprobs"][1:len(ids)]
    assert got == pytest.approx([want[i, ids[i + 1]].item() for i in range(len(ids) - 1)], abs=1e-4)
    for i, top in enumerate(logprobs["top_logprobs"][1:len(ids)]):
        best = want[i].topk(2)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert len(top) <= 3 and hf[1].decode([ids[i + 1]]) in top  # the chosen token and the 2 most likely
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_echo_of_token_ids_is_their_text(client, hf):
    ids = hf[1](PROMPT)["input_ids"]
    completion = client.completions.create(model="flover", prompt=ids, max_tokens=0, echo=True)
    assert completion.choices[0].text == hf[1].decode(ids) and completion.usage.completion_tokens == 0


def test_triton_prompt_logprobs_output(served, hf):
    ids = hf[1](PROMPT)["input_ids"]
    want = hf_logprobs(hf, ids)
    body = {"text_input": PROMPT, "max_tokens": 1, "stream": False,
            "sampling_parameters": json.dumps({"prompt_logprobs": 3, "temperature": 0})}
    reply = httpx.post(f"{served['http']}/v2/models/flover/generate", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    steps = json.loads(reply.json()["prompt_logprobs"])
    assert steps[0] is None and len(steps) == len(ids)
    for i, step in enumerate(steps[1:]):
        chosen_id, chosen = next(iter(step.items()))  # the prompt's own token first, then the 3 most likely
        assert int(chosen_id) == ids[i + 1] and chosen["logprob"] == pytest.approx(want[i, ids[i + 1]].item(),
                                                                                   abs=1e-4)
        assert chosen["rank"] == 1 + int((want[i] > want[i, ids[i + 1]]).sum())
        top = want[i].topk(3).indices.tolist()
        assert set(map(int, step)) == {ids[i + 1], *top}
    refused = httpx.post(f"{served['http']}/v2/models/flover/generate", timeout=60,
                         json=body | {"sampling_parameters": json.dumps({"prompt_logprobs": 21})})
    assert refused.status_code == 400 and "prompt_logprobs" in refused.text


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_are_several_choices(client, stream):
    prompts = ["First prompt", "A second, longer prompt here", "Third"]
    ids_prompts = [[5, 6, 7], [8, 9]]
    for batch in (prompts, ids_prompts):
        alone = [client.completions.create(model="flover", prompt=p, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True}) for p in batch]
        args = {"model": "flover", "prompt": batch, "max_tokens": 5, "temperature": 0,
                "extra_body": {"ignore_eos": True}}
        if stream:
            chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
            texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                     for i in range(len(batch))}
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            completion = client.completions.create(**args)
            assert [c.index for c in completion.choices] == list(range(len(batch)))
            texts = {c.index: c.text for c in completion.choices}
            finishes = [c.finish_reason for c in completion.choices]
            usage = completion.usage
        assert texts == {i: a.choices[0].text for i, a in enumerate(alone)} and finishes == ["length"] * len(batch)
        assert usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
        assert usage.completion_tokens == 5 * len(batch) == usage.total_tokens - usage.prompt_tokens


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": ["x"] * (Limits().max_prompts + 1)}, "prompt", f"at most {Limits().max_prompts}"),
    ({"prompt": ["x", ""]}, "prompt", "must not be empty"),
    ({"prompt": ["x", "word " * 300]}, "prompt", "max_model_len"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "only allowed with echo"),
    ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs", "less than or equal to 20"),
])
def test_refusals_name_the_parameter(served, body, param, words):
    reply = httpx.post(f"{served['openai']}/v1/completions", json={"model": "flover", "max_tokens": 2} | body,
                       timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_lm_eval_loglikelihood_task_end_to_end(served, hf, tiny_checkpoint, tmp_path):
    """lm-eval's `local-completions` runs a multiple-choice task (batches of 3 prompts per request) offline; its
    per-choice loglikelihoods are transformers' sums over each continuation."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "flover_mc.yaml").write_text(TASK_YAML.format(data=data))
    model_args = ",".join(["model=flover", f"base_url={served['openai']}/v1/completions", f"tokenizer={tiny_checkpoint}",
                           "tokenizer_backend=huggingface", "tokenized_requests=True", "max_length=256",
                           "num_concurrent=1", "max_retries=1"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "OPENAI_API_KEY": "unused"}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "flover_mc", "--include_path", str(tasks), "--batch_size", "3", "--log_samples",
               "--output_path", str(out)]
    log = tmp_path / "lm_eval.log"
    with open(log, "w") as output:
        run = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert run.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    (results_file,) = out.rglob("results_*.json")
    acc = json.loads(results_file.read_text())["results"]["flover_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    (samples_file,) = out.rglob("samples_flover_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    tokenizer = hf[1]
    for sample in samples:
        # lm-eval writes each request's (context, continuation) as {"arg_0", "arg_1"}, its answers as strings.
        for args, ((loglikelihood, _greedy),) in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            want = hf_logprobs(hf, whole)
            expected = sum(want[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))
            assert float(loglikelihood) == pytest.approx(expected, abs=1e-3)
    assert sum(float(sample["acc"]) for sample in samples) == pytest.approx(acc * len(DOCS))


def test_metrics_page_is_up(served):
    """The served model stays healthy after everything above (no request broke the loop)."""
    with urllib.request.urlopen(f"{served['http']}/v2/health/ready", timeout=10) as reply:
        assert reply.status == 200
