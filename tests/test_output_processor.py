"""Streaming text and the end-of-request decision on the tiny built-in tokenizer, with no model."""

import pytest

from flover_backend.engine.detokenizer import IncrementalDetokenizer
from flover_backend.engine.output_processor import OutputProcessor
from flover_backend.errors import InvalidRequestError
from flover_backend.execution.models.builtin import EOS_TOKEN_ID
from flover_backend.execution.models.loader import load_tokenizer
from flover_backend.request import Request, RequestStatus
from flover_backend.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def stream(tokenizer, token_ids: list[int], stop: list[str] = ()) -> tuple[list[str], bool]:
    """Feed `token_ids` one at a time (the last one finishing); the deltas and whether a stop string hit."""
    detokenizer = IncrementalDetokenizer(tokenizer, list(stop))
    deltas = []
    for n in range(1, len(token_ids) + 1):
        delta, hit = detokenizer.step(token_ids[:n], finished=n == len(token_ids))
        deltas.append(delta)
        if hit:
            return deltas, True
    return deltas, False


def test_multibyte_character_split_across_tokens_is_never_emitted_half(tokenizer):
    # "é" is the bytes C3 A9: one byte-level token each.
    first, second = tokenizer.token_to_id("Ã"), tokenizer.token_to_id("©")
    ids = tokenizer.encode("caf").ids + [first, second] + tokenizer.encode(" ok").ids
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) and "é" in "".join(deltas)
    assert all("\ufffd" not in delta for delta in deltas)
    assert deltas[len(tokenizer.encode("caf").ids)] == ""  # the first half waits for the second


def test_stream_ending_mid_character_shows_what_there_is(tokenizer):
    ids = tokenizer.encode("ab").ids + [tokenizer.token_to_id("Ã")]
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas).startswith("ab") and "".join(deltas).endswith("\ufffd")


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed(tokenizer):
    text = "hello there world"
    ids = [tokenizer.token_to_id(c) for c in "hello"] + tokenizer.encode(" there world").ids
    deltas, hit = stream(tokenizer, ids, stop=["lo th"])  # starts inside "hello", ends inside " there"
    assert hit and "".join(deltas) == text[: text.find("lo th")]


def test_the_last_characters_that_could_begin_a_stop_string_wait_for_the_next(tokenizer):
    ids = [tokenizer.token_to_id(c) for c in "abxab"]
    deltas, hit = stream(tokenizer, ids, stop=["abc"])
    assert not hit
    assert deltas == ["", "", "a", "b", "xab"]  # len("abc") - 1 characters held back until the end


def make_request(**params) -> Request:
    return Request("r", [5, 6], SamplingParams(**params))


@pytest.mark.parametrize("params, token, status", [
    ({"max_tokens": 5}, EOS_TOKEN_ID, RequestStatus.FINISHED_STOP),
    ({"max_tokens": 5, "ignore_eos": True}, EOS_TOKEN_ID, None),
    ({"max_tokens": 5, "stop_token_ids": [99]}, 99, RequestStatus.FINISHED_STOP),
    ({"max_tokens": 1}, 42, RequestStatus.FINISHED_LENGTH),
    ({"max_tokens": 5}, 42, None),
])
def test_the_token_decides_the_end(tokenizer, params, token, status):
    processor = OutputProcessor(tokenizer, frozenset({EOS_TOKEN_ID}))
    request = make_request(**params)
    processor.add(request)
    assert processor.append_token(request, token)[1] == status
    assert request.output_token_ids == [token]


def test_stop_string_ends_the_request(tokenizer):
    processor = OutputProcessor(tokenizer, frozenset({EOS_TOKEN_ID}))
    request = make_request(max_tokens=10, stop=["xy"])
    processor.add(request)
    assert processor.append_token(request, tokenizer.token_to_id("x")) == ("", None)
    assert processor.append_token(request, tokenizer.token_to_id("y")) == ("", RequestStatus.FINISHED_STOP)


def run_through(tokenizer, token_ids: list[int], **params) -> tuple[str, RequestStatus | None]:
    """Append `token_ids` to a fresh request with `params`: its whole streamed text and its end."""
    processor = OutputProcessor(tokenizer, frozenset({EOS_TOKEN_ID}))
    request = make_request(max_tokens=len(token_ids), **params)
    processor.add(request)
    texts, status = [], None
    for token_id in token_ids:
        text, status = processor.append_token(request, token_id)
        texts.append(text)
        if status is not None:
            break
    return "".join(texts), status


def test_skip_special_tokens_false_shows_them(tokenizer):
    """vLLM's skip_special_tokens: eos (a special token of the built-in tokenizer) shows in the text only if false."""
    ids = [*tokenizer.encode("ab", add_special_tokens=False).ids, EOS_TOKEN_ID,
           *tokenizer.encode("c", add_special_tokens=False).ids]  # no bos
    eos = tokenizer.decode([EOS_TOKEN_ID], skip_special_tokens=False)
    assert eos and tokenizer.decode([EOS_TOKEN_ID]) == ""
    assert run_through(tokenizer, ids, ignore_eos=True) == ("abc", RequestStatus.FINISHED_LENGTH)
    assert run_through(tokenizer, ids, ignore_eos=True, skip_special_tokens=False) == (
        f"ab{eos}c", RequestStatus.FINISHED_LENGTH)


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer):
    ids = tokenizer.encode("one two three").ids
    assert run_through(tokenizer, ids, stop=["two"]) == ("one ", RequestStatus.FINISHED_STOP)
    assert run_through(tokenizer, ids, stop=["two"], include_stop_str_in_output=True) == (
        "one two", RequestStatus.FINISHED_STOP)


def test_detokenize_false_gives_ids_and_no_text(tokenizer):
    ids = tokenizer.encode("one two").ids
    assert run_through(tokenizer, ids, detokenize=False) == ("", RequestStatus.FINISHED_LENGTH)
    with pytest.raises(InvalidRequestError, match="detokenize"):
        SamplingParams(detokenize=False, stop=["x"])
