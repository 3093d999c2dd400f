"""Streaming text for each request: incremental decoding that never emits half a character."""

from __future__ import annotations

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, and finds stop strings in that text.

    Decodes only a short window of recent ids each step (the window start keeps the merge context of
    byte-level tokenizers), holds back a trailing incomplete UTF-8 sequence, and, when stop strings
    are set, holds back text that could still become the start of one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], *, skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop  # the stop string that ends the text stays in it (vLLM's option)
        self.text = ""  # everything decoded so far, including held-back text
        self.emitted = 0  # characters of `text` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def step(self, token_ids: list[int], finished: bool, find_stops: bool = True) -> tuple[str, bool]:
        """Text newly safe to emit after `token_ids` grew, and whether a stop string ended it (looked for only
        if `find_stops`; text is held back all the same)."""
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(token_ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(token_ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        elif finished and full.endswith(_REPLACEMENT):
            self.text += full[len(prefix):]  # the stream ends mid-character: show what there is
        # Only new text can complete a stop string: search from just before it; the earliest one wins.
        hits = [(at, at + len(stop) if self.include_stop else at) for stop in self.stop if find_stops
                and (at := self.text.find(stop, max(0, self.emitted - len(stop) + 1))) != -1]
        if hits:
            self.text = self.text[:min(hits)[1]]
            return self._take(len(self.text)), True
        safe_end = len(self.text) if finished else len(self.text) - self._holdback
        return self._take(safe_end), False

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta
