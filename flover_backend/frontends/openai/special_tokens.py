"""Chat prompts tokenized so that only the template's own special tokens become special ids, never user text.

A checkpoint whose role markers are special tokens (`<|im_start|>`, `<|eot_id|>`, `</s>`) would let a user
forge turns if message text were tokenized with the template's text. So before rendering, every special
token's text inside the messages is swapped for a placeholder character; after rendering, the special ids the
tokenizer finds are the template's own, and each stretch of text between them that holds a placeholder is
encoded again, the placeholders restored, with special-token matching off (`encode_special_tokens`, what
transformers calls `split_special_tokens`). Messages without special-token text encode exactly as before.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer

# The supplementary Private Use Areas: characters no tokenizer gives a meaning to; ones a request uses are skipped.
PLACEHOLDERS = (range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))


class NoPlaceholderError(ValueError):
    """The messages use every placeholder character (only a request made to fail does)."""


class PlainContentEncoder:
    """`defuse(messages)` before rendering, `encode(text, marks)` after: user text never yields a special id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # A copy, not a toggle on the shared one: encodes run concurrently in threads.
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.encode_special_tokens = True
        specials = {token.content: index for index, token in tokenizer.get_added_tokens_decoder().items()
                    if token.special and token.content}
        self.special_ids = frozenset(specials.values())
        # Longest first, so a special that contains another is replaced whole.
        self._pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) \
            if specials else None

    def defuse(self, messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
        """The messages with each special token's text replaced by a placeholder, and {placeholder: text}."""
        texts = [value for message in messages for value in message.values() if isinstance(value, str)]
        if self._pattern is None or not any(self._pattern.search(text) for text in texts):
            return messages, {}
        used = set().union(*texts)
        free = (chr(code) for codes in PLACEHOLDERS for code in codes if chr(code) not in used)
        marks: dict[str, str] = {}  # special text -> its placeholder

        def swap(match: re.Match) -> str:
            if match.group() not in marks:
                marks[match.group()] = next(free, "")
                if not marks[match.group()]:
                    raise NoPlaceholderError("the messages use every private-use character and special-token "
                                             "text: one of the two must go")
            return marks[match.group()]

        defused = [{key: self._pattern.sub(swap, value) if isinstance(value, str) else value
                    for key, value in message.items()} for message in messages]
        return defused, {placeholder: text for text, placeholder in marks.items()}

    def encode(self, text: str, marks: dict[str, str]) -> list[int]:
        """`text`'s ids (no added bos/eos): its special tokens as special ids, placeholders as plain text."""
        whole = self.tokenizer.encode(text, add_special_tokens=False)
        if not any(placeholder in text for placeholder in marks):
            return whole.ids
        restore = str.maketrans(marks)
        ids: list[int] = []
        section: list[int] = []  # the ids since the last special token
        section_start = 0
        for token_id, (start, end) in zip([*whole.ids, None], [*whole.offsets, (len(text), len(text))]):
            if token_id is not None and token_id not in self.special_ids:
                section.append(token_id)
                continue
            # A section ends (at a special token of the template, or at the end): encode it again as plain
            # text if it held a special token's text from the messages.
            stretch = text[section_start:start]
            if any(placeholder in stretch for placeholder in marks):
                section = self.plain.encode(stretch.translate(restore), add_special_tokens=False).ids
            ids += section
            if token_id is not None:
                ids.append(token_id)
            section, section_start = [], end
        return ids
