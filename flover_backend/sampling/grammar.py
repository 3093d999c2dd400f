"""Grammars for structured output, through xgrammar: compiled once per request on the submitting thread, then
each step a token bitmask for the rows that carry one, and the grammar advanced by each accepted token.

xgrammar rather than outlines-core (measured on the 2-core AMD EPYC: benchmarks/results/structured_output.json): it compiles
context-free grammars, so `json_object` and recursive schemas are exact rather than regexes unrolled to a depth,
a five-field schema compiles in ~7-15 ms against outlines-core's ~0.3-1 s and any JSON object in ~6-43 ms against
~8-30 s on the built-in 32000-token vocabulary, its per-token mask costs the same few microseconds, and it is
the structured-output library vLLM uses by default. Its import (~2-3 s: it imports transformers) is paid on the
first structured request, not by servers that never see one.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from flover_backend.errors import InvalidRequestError
from flover_backend.sampling.structured_output import GuidedDecoding

if TYPE_CHECKING:
    import xgrammar

# String character classes of xgrammar's JSON schema grammar (bounded strings, then unbounded ones), and what
# strict JSON allows there: no control character, quote, backslash or lone surrogate.
_LOOSE_STRING_CHARACTERS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_STRICT_STRING_CHARACTER = r'[^\0-\x1f\"\\\uD800-\uDFFF]'
# Compiled grammars kept for reuse across requests (the same schema sent again compiles in microseconds).
GRAMMAR_CACHE_BYTES = 64 << 20


class GrammarCompiler:
    """Turns a request's GuidedDecoding into a Guide for one tokenizer and vocabulary. Thread-safe: any caller
    thread may compile while the loop thread steps the guides it made before."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compile(self, guided: GuidedDecoding) -> Guide:
        """A fresh guide for `guided`; a schema or regex xgrammar cannot compile is an error naming the key."""
        compiler = self._get_compiler(guided.field)
        try:
            if guided.kind == "json":
                grammar = compiler.compile_grammar(json_schema_ebnf(guided.source))
            elif guided.kind == "regex":
                grammar = compiler.compile_regex(guided.source)
            else:  # EBNF string literals take JSON's escapes, so each choice is its own JSON string
                grammar = compiler.compile_grammar("root ::= " + " | ".join(
                    json.dumps(choice) for choice in json.loads(guided.source)))
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar raises RuntimeError and its subclasses
            raise InvalidRequestError(guided.field, f"cannot be compiled: {_first_line(exc)}") from None
        import xgrammar

        return Guide(xgrammar.GrammarMatcher(grammar), self.vocab_size, self.stop_token_ids)

    def _get_compiler(self, field: str) -> xgrammar.GrammarCompiler:
        """The compiler, made on first use (importing xgrammar and reading the vocabulary take seconds)."""
        with self._lock:
            if self._compiler is None:
                try:
                    import transformers
                    import xgrammar
                except ImportError as exc:
                    raise InvalidRequestError(field, f"structured output needs xgrammar, which is not installed "
                                                     f"({exc}): pip install xgrammar") from None
                wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=self.tokenizer)
                info = xgrammar.TokenizerInfo.from_huggingface(wrapped, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                # One thread: compiling beside the loop must not take the cores its forwards run on.
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler


def json_schema_ebnf(schema: str) -> str:
    """The grammar of compact JSON valid under `schema` (text), as EBNF: no free whitespace, so the grammar alone
    bounds the output (a model could otherwise wander in whitespace forever), as json.dumps(..., separators=(",",
    ":")) writes it; and no string character that strict JSON parsers refuse."""
    import xgrammar

    ebnf = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    # xgrammar 0.2.9 lets a string with minLength / maxLength hold raw control characters (mlc-ai/xgrammar#800,
    # still open), and every string a UTF-8-encoded surrogate (U+D800-U+DFFF, which is not valid UTF-8): its
    # string character classes are narrowed to what RFC 8259 allows. (A bounded string still cannot hold an
    # escape, as #800 says; the unbounded one can.)
    for loose in _LOOSE_STRING_CHARACTERS:
        ebnf = ebnf.replace(loose, _STRICT_STRING_CHARACTER)
    return ebnf


class Guide:
    """One request's grammar state: which tokens may come next, advanced by each token the request takes.
    Its grammar may end at one of the model's eos tokens, which it allows once (and only when) it is complete."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar

        self._matcher = matcher
        self._stop_token_ids = stop_token_ids
        self._scratch = xgrammar.allocate_token_bitmask(1, vocab_size)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of the int32 CPU `bitmask` (a set bit allows)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False if the grammar does not allow it (the state is then unchanged)."""
        return self._matcher.accept_token(token_id)

    @property
    def finished(self) -> bool:
        """Whether the output is complete: the grammar took its end (an eos), or it is complete and allows
        nothing but its end, so the request stops now rather than spend a step on that eos."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False  # e.g. inside a JSON value: more must come
        self._matcher.fill_next_token_bitmask(self._scratch)
        words = self._scratch[0].numpy().view(np.uint32).copy()
        for token_id in self._stop_token_ids:
            words[token_id >> 5] &= ~np.uint32(1 << (token_id & 31))
        return not words.any()


def apply_guides(logits: torch.Tensor, rows: list[int], guides: list[Guide]) -> list[int]:
    """Set to -inf, in place, the logits that each of `rows` of `logits` (n, vocab) may not take next
    under guides[i]; the other rows are neither read nor written. Returns the rows whose grammar allows no token."""
    import xgrammar

    vocab_size = logits.shape[1]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab_size)  # int32 on the CPU, all allowed
    for k, guide in enumerate(guides):
        guide.fill(bitmask, k)
    # Bit j of word w allows token 32 w + j: the words' little-endian bytes, unpacked least bit first.
    words = bitmask.numpy().astype("<i4", copy=False)
    allowed = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size].view(bool)
    dead = [row for row, any_allowed in zip(rows, allowed.any(axis=1)) if not any_allowed]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # One vectorized write per row: several times faster than xgrammar's CPU kernel at 32000 tokens.
        host = logits.numpy()
        for k, row in enumerate(rows):
            np.copyto(host[row], -np.inf, where=~allowed[k])
    else:  # xgrammar's kernel for the device and dtype, which reads row i of the mask for row i of the logits
        full = torch.full((len(logits), bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask
        xgrammar.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True),
                                             vocab_size=vocab_size, indices=rows)
    return dead


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix ("[time] file.cc:123: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    _, sep, rest = text.partition(".cc:")
    return rest.split(": ", 1)[-1] if sep else text
