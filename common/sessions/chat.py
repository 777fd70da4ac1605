"""How a model turns a conversation into a prompt: its chat template.

Hugging Face models ship a Jinja2 chat template (``chat_template`` in ``tokenizer_config.json``,
or a ``chat_template.jinja`` file next to it). :class:`ChatFormat` renders it the way
transformers' ``apply_chat_template`` does (same sandboxed environment, filters and globals,
``add_generation_prompt=True``), without importing transformers: the edge agent never installs
it. A model without a template gets a plain format::

    <system prompt>

    User: ...
    Assistant: ...
    Assistant:
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgefed.common.errors import ArtifactError, PayloadError
from edgefed.common.sessions.context import ChatMessage

__all__ = ["CHAT_TEMPLATE_FILE", "TOKENIZER_CONFIG_FILE", "ChatFormat"]

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""transformers >= 4.43 saves the template in its own file (it wins over tokenizer_config's)."""

_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # as transformers: no HTML escaping, and the options templates use
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ChatFormat:
    """A model's chat format: its Jinja2 chat template, or the plain fallback (``None``)."""

    def __init__(
        self,
        template: str | None,
        *,
        special_tokens: Mapping[str, Any] | None = None,
        source: str = "chat template",
    ) -> None:
        self.template = template
        self.source = source
        self.special_tokens: dict[str, Any] = dict(special_tokens or {})
        self._compiled: jinja2.Template | None = None
        if template is not None:
            try:
                self._compiled = _environment().from_string(template)
            except jinja2.TemplateSyntaxError as exc:
                raise ArtifactError(
                    f"the {source} is not a valid Jinja2 template (line {exc.lineno}: "
                    f"{exc.message}); fix or remove it"
                ) from None

    def __repr__(self) -> str:
        return f"ChatFormat({self.source!r}, templated={self.templated})"

    @property
    def templated(self) -> bool:
        """Whether the model has a chat template (else: the plain fallback)."""
        return self._compiled is not None

    @classmethod
    def for_artifact(cls, directory: Path) -> ChatFormat:
        """The chat format of the model in ``directory`` (its ``chat_template.jinja``, else its
        ``tokenizer_config.json``'s ``chat_template``; the plain format if it has neither).
        Raises :class:`ArtifactError` naming the file when one is unreadable or invalid."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                loaded = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ArtifactError(f"cannot read {config_path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ArtifactError(f"{config_path} is not a JSON object")
            config = loaded
        special: dict[str, Any] = {}
        for name in _SPECIAL_TOKENS:
            text = _token_text(config.get(name))
            if text is not None:
                special[name] = text
        extra = config.get("additional_special_tokens")
        if isinstance(extra, list) and extra:
            special["additional_special_tokens"] = [
                t for t in (_token_text(v) for v in extra) if t is not None
            ]

        template_path = directory / CHAT_TEMPLATE_FILE
        if template_path.is_file():
            try:
                template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ArtifactError(f"cannot read {template_path}: {exc}") from exc
            return cls(template, special_tokens=special, source=str(template_path))
        raw = config.get("chat_template")
        if raw is None:
            return cls(None, special_tokens=special, source="plain format")
        source = f"chat_template of {config_path}"
        return cls(_pick_template(raw, source), special_tokens=special, source=source)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for ``messages``, ending where the assistant's answer starts. Raises
        :class:`PayloadError` when the template refuses the conversation (its
        ``raise_exception``, e.g. roles that do not alternate)."""
        if self._compiled is None:
            return _plain(messages)
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._compiled.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise PayloadError(f"the {self.source} refused the conversation: {exc}") from None
        except (TypeError, ValueError, LookupError, AttributeError) as exc:  # template bugs
            raise PayloadError(
                f"the {self.source} failed on this conversation ({type(exc).__name__}: {exc})"
            ) from None


def _pick_template(raw: Any, source: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        named = {
            item.get("name"): item.get("template") for item in raw if isinstance(item, Mapping)
        }
        default = named.get("default")
        if isinstance(default, str):
            return default
        names = ", ".join(sorted(str(n) for n in named))
        raise ArtifactError(f"the {source} has no template named 'default' (it has: {names})")
    raise ArtifactError(
        f"the {source} is a {type(raw).__name__}; expected a string or a list of {{name, template}}"
    )


def _plain(messages: Sequence[ChatMessage]) -> str:
    parts: list[str] = []
    for message in messages:
        if message.role == "system":
            parts.append(f"{message.content}\n\n")
        else:
            parts.append(f"{_ROLE_NAMES[message.role]}: {message.content}\n")
    parts.append("Assistant:")
    return "".join(parts)
