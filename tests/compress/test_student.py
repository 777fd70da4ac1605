"""Students: layer choice, layer lists of every supported family, and students that keep the
chosen teacher layers, survive save/load through the Auto classes and generate with a KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Model,
    PreTrainedModel,
)

from edgefed.cloud.compress.config import StudentSpec
from edgefed.cloud.compress.errors import StudentError
from edgefed.cloud.compress.student import (
    TEACHER_LAYERS_ATTR,
    build_student,
    layer_stack,
    parameter_count,
    select_layers,
    teacher_layer_map,
)

from .tiny_teachers import LAYERS, make_model, sentences

AUTO: dict[str, Any] = {
    "bert": AutoModel,
    "distilbert": AutoModel,
    "cls": AutoModelForSequenceClassification,
    "gpt2": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "qwen2": AutoModelForCausalLM,
}
DECODERS = ("gpt2", "llama", "qwen2")


def _inputs(tokenizer: Any, kind: str) -> dict[str, torch.Tensor]:
    if kind in DECODERS:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(sentences(3), padding=True, return_tensors="pt")
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _output(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert isinstance(tensor, torch.Tensor)
    return tensor


# --------------------------------------------------------------------------- select_layers


@pytest.mark.parametrize(
    ("n", "spec", "expected"),
    [
        (6, StudentSpec(depth=3), [0, 2, 5]),
        (6, StudentSpec(depth=2), [0, 5]),
        (6, StudentSpec(depth=1), [0]),
        (6, StudentSpec(depth=6), [0, 1, 2, 3, 4, 5]),
        (12, StudentSpec(depth=4), [0, 4, 7, 11]),
        (6, StudentSpec(), [0, 2, 5]),  # neither: half the depth
        (1, StudentSpec(), [0]),
        (6, StudentSpec(layers=(1, 3, 4)), [1, 3, 4]),
    ],
)
def test_select_layers(n: int, spec: StudentSpec, expected: list[int]) -> None:
    assert select_layers(n, spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StudentSpec(depth=7), r"student has more layers than the teacher \(7 > 6\)"),
        (StudentSpec(layers=tuple(range(7))), r"more layers than the teacher \(7 > 6\)"),
        (StudentSpec(layers=(0, 6)), r"indices \[6\] are outside the teacher's layers 0\.\.5"),
        (StudentSpec(layers=(-1, 2)), r"indices \[-1\] are outside"),
        (StudentSpec(layers=(3, 1)), r"strictly increasing, got \[3, 1\]"),
        (StudentSpec(layers=(2, 2)), r"strictly increasing"),
        (StudentSpec(layers=()), r"layer list is empty"),
    ],
)
def test_select_layers_refuses(spec: StudentSpec, message: str) -> None:
    with pytest.raises(StudentError, match=message):
        select_layers(6, spec)


# --------------------------------------------------------------------------- layer_stack


@pytest.mark.parametrize("kind", list(AUTO))
def test_layer_stack_finds_every_family(kind: str) -> None:
    model, _ = make_model(kind)
    assert len(layer_stack(model)) == LAYERS
    assert layer_stack(model) is layer_stack(model.base_model)


def test_layer_stack_of_a_gpt2_base_model() -> None:
    model, _ = make_model("gpt2")
    base = model.base_model
    assert isinstance(base, GPT2Model)
    assert layer_stack(base) is base.h


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(StudentError, match="unsupported architecture Linear"):
        layer_stack(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- build_student


@pytest.mark.parametrize("kind", list(AUTO))
def test_student_keeps_the_chosen_layers_and_round_trips(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, tok = make_model(kind)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, [0, 3])

    stack = layer_stack(student)
    assert len(stack) == 2
    assert student.config.num_hidden_layers == 2
    assert getattr(student.config, TEACHER_LAYERS_ATTR) == [0, 3]
    for s_layer, t_index in zip(stack, [0, 3], strict=True):
        t_layer = layer_stack(teacher)[t_index]
        for (name, s_param), t_param in zip(
            s_layer.named_parameters(), t_layer.parameters(), strict=True
        ):
            assert torch.equal(s_param, t_param), name
            assert s_param.data_ptr() != t_param.data_ptr()  # a copy, not shared
    # The teacher is untouched.
    assert len(layer_stack(teacher)) == LAYERS
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert parameter_count(student) < parameter_count(teacher)

    student.save_pretrained(tmp_path)
    reloaded = AUTO[kind].from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(reloaded) is type(student)
    assert getattr(reloaded.config, TEACHER_LAYERS_ATTR) == [0, 3]
    inputs = _inputs(tok, kind)
    assert torch.equal(_output(student.eval(), inputs), _output(reloaded, inputs))


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_student_generates_with_its_kv_cache(kind: str) -> None:
    torch.manual_seed(0)
    teacher, tok = make_model(kind)
    student = build_student(teacher, [1, 3]).eval()
    for index, layer in enumerate(layer_stack(student)):
        indices = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert indices == {index}
    prompt = tok(["the module provides"], return_tensors="pt")["input_ids"]
    args = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        cached = student.generate(prompt, use_cache=True, **args)
        uncached = student.generate(prompt, use_cache=False, **args)
    assert cached.shape[1] > prompt.shape[1]
    assert torch.equal(cached, uncached)


def test_gpt2_student_keeps_tied_embeddings() -> None:
    teacher, _ = make_model("gpt2")
    student = build_student(teacher, [0, 3])
    assert student.lm_head.weight is student.transformer.wte.weight
    assert student.lm_head.weight is not teacher.lm_head.weight
    assert parameter_count(student) == sum(
        p.numel() for p in {id(p): p for p in student.parameters()}.values()
    )


def test_qwen2_student_keeps_the_layer_types_of_its_layers(tmp_path: Path) -> None:
    teacher, _ = make_model("qwen2")
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = build_student(teacher, [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("kind", ["cls", "gpt2"])
def test_student_with_every_layer_equals_its_teacher(kind: str) -> None:
    teacher, tok = make_model(kind)
    student = build_student(teacher, list(range(LAYERS))).eval()
    inputs = _inputs(tok, kind)
    assert torch.equal(_output(student, inputs), _output(teacher, inputs))


def test_build_student_refuses_bad_layers() -> None:
    teacher, _ = make_model("bert")
    with pytest.raises(StudentError, match=r"more layers than the teacher \(5 > 4\)"):
        build_student(teacher, [0, 1, 2, 3, 3])
    with pytest.raises(StudentError, match="outside the teacher's layers"):
        build_student(teacher, [0, 4])
    assert len(layer_stack(teacher)) == LAYERS


def test_teacher_layer_map_reads_the_record_or_spreads_evenly() -> None:
    teacher, _ = make_model("bert")
    student = build_student(teacher, [1, 2])
    assert teacher_layer_map(student, LAYERS) == [1, 2]
    delattr(student.config, TEACHER_LAYERS_ATTR)
    assert teacher_layer_map(student, LAYERS) == [0, 3]
    setattr(student.config, TEACHER_LAYERS_ATTR, [0, 9])
    assert teacher_layer_map(student, LAYERS) == [0, 3]
