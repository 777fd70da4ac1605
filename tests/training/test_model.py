"""The federated model: arrays round trip, strict loading, building from texts, saving a directory
that transformers loads with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from edgefed.common.training import FederatedModel, TrainingError

from . import tiny


def test_arrays_are_float32_copies_of_the_float_state_in_order() -> None:
    fm = tiny.build("text-classification")
    arrays = fm.arrays()
    state = fm.model.state_dict()
    assert list(arrays) == [k for k, v in state.items() if v.is_floating_point()]
    assert "bert.embeddings.position_ids" not in arrays  # integer buffer: rebuilt by the model
    assert all(a.dtype == np.float32 for a in arrays.values())
    arrays["classifier.bias"][:] = 42.0  # a copy: the model is untouched
    assert not torch.equal(state["classifier.bias"], torch.full_like(state["classifier.bias"], 42))


def test_load_arrays_round_trips_between_models() -> None:
    source, target = tiny.build("text-classification", seed=1), tiny.build("text-classification")
    target.load_arrays(source.arrays())
    for key, value in source.arrays().items():
        np.testing.assert_array_equal(target.arrays()[key], value)


def test_load_arrays_names_missing_and_unexpected_keys() -> None:
    fm = tiny.build("text-classification")
    arrays = fm.arrays()
    del arrays["classifier.weight"]
    arrays["extra.weight"] = np.zeros(3, dtype=np.float32)
    before = fm.arrays()
    with pytest.raises(TrainingError) as info:
        fm.load_arrays(arrays)
    assert "missing keys classifier.weight" in str(info.value)
    assert "unexpected keys extra.weight" in str(info.value)
    np.testing.assert_array_equal(fm.arrays()["classifier.bias"], before["classifier.bias"])


def test_load_arrays_names_a_wrong_shape_and_changes_nothing() -> None:
    fm = tiny.build("text-classification")
    arrays = tiny.build("text-classification", seed=3).arrays()
    arrays["classifier.weight"] = np.zeros((3, 32), dtype=np.float32)
    before = fm.arrays()
    with pytest.raises(TrainingError, match=r"classifier\.weight \(3, 32\) != \(2, 32\)"):
        fm.load_arrays(arrays)
    for key, value in before.items():
        np.testing.assert_array_equal(fm.arrays()[key], value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")],
)
def test_load_arrays_refuses_non_finite_values(value: float, problem: str) -> None:
    fm = tiny.build("text-classification")
    arrays = fm.arrays()
    arrays["classifier.bias"][0] = value
    with pytest.raises(TrainingError, match=f"classifier.bias holds {problem}"):
        fm.load_arrays(arrays)


def test_load_arrays_refuses_integer_arrays() -> None:
    fm = tiny.build("text-classification")
    arrays = fm.arrays()
    arrays["classifier.bias"] = np.zeros(2, dtype=np.int64)
    with pytest.raises(TrainingError, match=r"classifier\.bias is not floating point \(int64\)"):
        fm.load_arrays(arrays)


def test_from_texts_builds_the_same_architecture_and_digest() -> None:
    fm = tiny.build("text-classification")
    clone = FederatedModel.from_texts("text-classification", fm.config_json, fm.tokenizer_json)
    assert clone.digest == fm.digest
    assert len(fm.digest) == 64
    assert clone.label2id == {"red": 0, "blue": 1}
    clone.load_arrays(fm.arrays())
    inputs = fm.encode(["the red car"], None, 16)
    with torch.no_grad():
        torch.testing.assert_close(clone.model(**inputs).logits, fm.model(**inputs).logits)


@pytest.mark.parametrize(
    ("config_json", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"hidden_size": 32}', "names no known model_type"),
        ('{"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}', "not a multiple"),
    ],
)
def test_from_texts_refuses_a_bad_config(config_json: str, problem: str) -> None:
    tok = tiny.tokenizer().to_str()
    with pytest.raises(TrainingError, match=problem):
        FederatedModel.from_texts("text-classification", config_json, tok)


def test_from_texts_refuses_a_bad_tokenizer_and_task() -> None:
    fm = tiny.build("text-classification")
    with pytest.raises(TrainingError, match=r"not a valid tokenizer\.json"):
        FederatedModel.from_texts("text-classification", fm.config_json, '{"model": 1}')
    with pytest.raises(TrainingError, match="unsupported task 'translation'"):
        FederatedModel.from_texts("translation", fm.config_json, fm.tokenizer_json)


def test_saved_classifier_loads_with_transformers_and_gives_the_same_logits(
    tmp_path: Path,
) -> None:
    fm = tiny.build("text-classification", seed=5)
    out = fm.save_dir(tmp_path / "model")
    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    texts = ["the red car is near", "a blue lamp"]
    hf_inputs = tokenizer(texts, padding=True, return_tensors="pt")
    ours = fm.encode(texts, None, 64)
    torch.testing.assert_close(hf_inputs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**hf_inputs).logits, fm.model(**ours).logits)
    declared = json.loads((out / "config.json").read_text())
    assert declared["id2label"] == {"0": "red", "1": "blue"}
    assert FederatedModel.from_dir(out).task == "text-classification"


def test_saved_encoder_reloads_as_feature_extraction(tmp_path: Path) -> None:
    fm = tiny.build("feature-extraction", seed=2)
    out = fm.save_dir(tmp_path / "enc")
    again = FederatedModel.from_dir(out)
    assert again.task == "feature-extraction"
    assert again.label2id is None
    assert again.digest == FederatedModel.from_dir(out).digest
    for key, value in fm.arrays().items():
        np.testing.assert_array_equal(again.arrays()[key], value)
    assert isinstance(AutoModel.from_pretrained(out, local_files_only=True), torch.nn.Module)


def test_save_dir_copies_the_tokenizer_files_of_a_source(tmp_path: Path) -> None:
    source = tiny.save("text-classification", tmp_path / "src")
    fm = FederatedModel.from_dir(source)
    out = fm.save_dir(tmp_path / "out", tokenizer_source=source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


def test_from_dir_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"has no config\.json"):
        FederatedModel.from_dir(tmp_path)
    source = tiny.save("text-classification", tmp_path / "m")
    (source / "tokenizer.json").unlink()
    with pytest.raises(TrainingError, match=r"has no tokenizer\.json"):
        FederatedModel.from_dir(source)
