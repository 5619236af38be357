"""Chat prompts from the model's own Jinja2 chat template, rendered as Hugging Face's apply_chat_template does.

The template is the string in GGUF `tokenizer.chat_template` or tokenizer_config.json `chat_template`. As in
transformers (utils/chat_template_utils.py): an ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that keeps non-ASCII text, the globals
`raise_exception(msg)` and `strftime_now(fmt)`, and the variables `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `tools` and `documents` (None). A template that reaches for an unsafe attribute
(`''.__class__`) fails at once instead of printing an empty string.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from refengine.errors import EngineError, one_line
from refengine.tokenizer import Tokenizer

Message = Mapping[str, str]            # {"role": "system" | "user" | "assistant", "content": text}


class ChatTemplateError(EngineError):
    """A chat template that is missing, does not parse, refuses the conversation, or breaks the sandbox."""


class _Raised(TemplateError):
    """What the template's own raise_exception(msg) throws (its message is the template author's)."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: HF marks assistant text with it; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, except that an unsafe attribute raises instead of rendering as an empty Undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> None:
    raise _Raised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat prompts need the text as written.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: line {exc.lineno}: "
                                f"{one_line(exc.message)}") from None


def render(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The prompt text `template` makes of `messages`, ending with the assistant's header when asked."""
    compiled = _compile(template)
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, tools=None, documents=None)
    except _Raised as exc:
        raise ChatTemplateError(f"the model's chat template refuses this conversation: {one_line(exc)}") from None
    except SecurityError as exc:
        raise ChatTemplateError(f"the model's chat template was stopped by the sandbox: {one_line(exc)}") from None
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {one_line(exc)}") from None


def _token_text(tok: Tokenizer, token_id: Optional[int]) -> str:
    return "" if token_id is None else tok.token(token_id)


def chat_ids(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Prompt ids of `messages` through the model's template; BOS once, as llama.cpp's chat path gives it.

    The template's special-token text (`<|im_start|>`, `<s>`) becomes those tokens' ids. BOS is prepended
    when the model asks for it (`add_bos`) unless the rendered text already starts with it: llama.cpp
    (common/chat.cpp) strips a leading BOS from the template's output and lets the tokenizer add it.
    """
    if not tok.chat_template:
        raise ChatTemplateError(f"{tok.source}: the model carries no chat template "
                                "(GGUF tokenizer.chat_template / tokenizer_config.json chat_template)")
    bos = _token_text(tok, tok.bos_id)
    text = render(tok.chat_template, messages, bos_token=bos, eos_token=_token_text(tok, tok.eos_id))
    return tok.encode(text, bos=tok.add_bos and not (bos and text.startswith(bos)))


__all__ = ["ChatTemplateError", "Message", "chat_ids", "render"]
