"""A checkpoint's chat template, rendered as transformers' `apply_chat_template` does, and tokenized."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from flover_backend.frontends.openai.special_tokens import NoPlaceholderError, PlainContentEncoder

# Special-token names transformers passes to every template (its `special_tokens_map`).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class NoChatTemplateError(Exception):
    """The checkpoint has no chat template: it can do completions only."""


class ChatTemplateError(ValueError):
    """The template refused the messages (its `raise_exception`), or failed rendering them."""


class ChatTemplate:
    """`render(messages)` -> prompt text; `encode(messages)` -> prompt ids, special ids from the template only."""

    def __init__(self, source: str | None, special_tokens: dict[str, str], tokenizer: Tokenizer | None,
                 origin: str = "the checkpoint"):
        self.source, self.special_tokens, self.tokenizer, self.origin = source, special_tokens, tokenizer, origin
        self._template = _environment().from_string(source) if source is not None else None
        self._encoder = PlainContentEncoder(tokenizer) if tokenizer is not None else None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplate:
        """Read `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`, and `tokenizer.json`."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            source = {item.get("name"): item.get("template") for item in source}.get("default")
        jinja_file = path / "chat_template.jinja"  # where newer transformers save it
        if jinja_file.is_file():
            source = jinja_file.read_text()
        specials = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if config.get(name)}
        tokenizer_file = path / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
        return cls(source if isinstance(source, str) else None, specials, tokenizer, origin=str(path))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the checkpoint's template makes of `messages`."""
        if self._template is None:
            raise NoChatTemplateError(f"{self.origin} has no chat template (no chat_template in its "
                                      f"tokenizer_config.json); use /v1/completions")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"the chat template failed on the messages: {exc!r}") from None

    def encode(self, messages: list[dict], special_tokens_in_messages: bool = False) -> list[int]:
        """The rendered prompt's token ids; the template writes the special tokens (add_special_tokens off).

        Special-token text inside the messages stays text (a user cannot forge a turn), unless
        `special_tokens_in_messages`: then, as vLLM and transformers do, it becomes special ids too.
        """
        if self._encoder is None:
            self.render(messages)  # no template: that error first
            raise NoChatTemplateError(f"{self.origin} has no tokenizer.json to encode the chat prompt with")
        if special_tokens_in_messages:
            return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids
        try:
            defused, marks = self._encoder.defuse(messages)
        except NoPlaceholderError as exc:
            raise ChatTemplateError(str(exc)) from None
        return self._encoder.encode(self.render(defused), marks)


def _token_text(value) -> str:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    return value.get("content", "") if isinstance(value, dict) else str(value)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): rendered as is."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        """Parse `{% generation %}...{% endgeneration %}`, which marks assistant text: render its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore-prefixed attributes, as transformers restricts it."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` only: no attribute of the type itself reaches the template."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        """`dict.fromkeys`, the one class method of `dict` a template may call."""
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not, and templates expect that.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' sandboxed template environment: the same options, filters and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace, dict=_Dict(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env
