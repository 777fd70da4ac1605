"""Loading a teacher: every task's Auto class from a local directory, pad tokens for decoders, and
a TeacherError that says what is wrong for every directory that is not a usable model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import (
    BertForSequenceClassification,
    BertModel,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from edgefed.cloud.compress.errors import TeacherError
from edgefed.cloud.compress.teacher import load_teacher

from .tiny_teachers import minilm_dir, save_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {kind: save_model(kind, root / kind) for kind in ("bert", "cls", "gpt2", "llama")}


def _copy(src: Path, dst: Path, *, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


def test_each_task_loads_its_auto_class_in_eval_mode(models: dict[str, Path]) -> None:
    cases = [
        ("bert", "feature-extraction", BertModel),
        ("cls", "text-classification", BertForSequenceClassification),
        ("gpt2", "text-generation", GPT2LMHeadModel),
        ("llama", "text-generation", LlamaForCausalLM),
    ]
    for kind, task, cls in cases:
        teacher = load_teacher(models[kind], task)  # type: ignore[arg-type]
        assert type(teacher.model) is cls
        assert not teacher.model.training
        assert teacher.task == task
        assert teacher.path == models[kind]


def test_decoder_without_pad_token_pads_with_eos_on_the_right(models: dict[str, Path]) -> None:
    teacher = load_teacher(models["gpt2"], "text-generation")
    tok = teacher.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "right"
    assert teacher.model.config.pad_token_id == tok.eos_token_id
    batch = tok(["one two three", "one"], padding=True)
    assert batch["attention_mask"][1][-1] == 0  # padded at the end


def test_real_minilm_loads_as_an_encoder() -> None:
    teacher = load_teacher(minilm_dir(), "feature-extraction")
    assert type(teacher.model) is BertModel
    assert teacher.model.config.num_hidden_layers == 6


def test_unsupported_task_lists_the_tasks(models: dict[str, Path]) -> None:
    with pytest.raises(TeacherError, match=r"unsupported task 'summarization'.*feature-extraction"):
        load_teacher(models["bert"], "summarization")  # type: ignore[arg-type]


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(tmp_path / "missing", "feature-extraction")
    file = tmp_path / "model.bin"
    file.write_bytes(b"not a directory")
    with pytest.raises(TeacherError, match="is not a directory"):
        load_teacher(file, "feature-extraction")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match=r"not a Hugging Face model: it has no config\.json"):
        load_teacher(tmp_path / "empty", "feature-extraction")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("{not json")
    with pytest.raises(TeacherError, match="cannot read the model config"):
        load_teacher(tmp_path / "garbage", "feature-extraction")


def test_missing_tokenizer_or_weights(models: dict[str, Path], tmp_path: Path) -> None:
    no_tok = _copy(
        models["bert"],
        tmp_path / "no-tok",
        without=("tokenizer*", "vocab.txt", "special_tokens_map.json"),
    )
    with pytest.raises(TeacherError, match="has no tokenizer"):
        load_teacher(no_tok, "feature-extraction")
    no_weights = _copy(models["bert"], tmp_path / "no-weights", without=("*.safetensors",))
    with pytest.raises(TeacherError, match="cannot load the feature-extraction model"):
        load_teacher(no_weights, "feature-extraction")


def test_classification_needs_labels_or_a_head(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="has no classification head"):
        load_teacher(models["bert"], "text-classification")
    # A base checkpoint whose config names the labels is fine: the head starts untrained.
    labelled = _copy(models["bert"], tmp_path / "labelled")
    config = json.loads((labelled / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (labelled / "config.json").write_text(json.dumps(config))
    teacher = load_teacher(labelled, "text-classification")
    assert teacher.model.config.num_labels == 3
    assert type(teacher.model) is BertForSequenceClassification


def test_generation_needs_a_causal_lm(models: dict[str, Path]) -> None:
    with pytest.raises(TeacherError, match=r"not a causal language model.*BertModel"):
        load_teacher(models["bert"], "text-generation")
