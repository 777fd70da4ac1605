"""Export through Optimum for every task, parity against torch, and clear errors for inputs that
are not models."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edgefed.cloud.compress.errors import ExportError
from edgefed.cloud.compress.export import check_parity, export_onnx, require_parity

from .tiny_hf import SENTENCES, Exported, build, build_and_export

KINDS = ("bert", "cls", "gpt2", "llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("export")
    return {kind: build_and_export(kind, root) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_export_writes_a_complete_model_folder(exported: dict[str, Exported], kind: str) -> None:
    e = exported[kind]
    files = {p.name for p in e.onnx_dir.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "vocab.txt"} <= files
    model = onnx.load(str(e.onnx_dir / "model.onnx"))
    onnx.checker.check_model(model)
    assert {op.domain: op.version for op in model.opset_import}[""] == 18
    inputs = {i.name for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    if e.task == "feature-extraction":
        assert outputs == ["last_hidden_state"]
    else:
        assert outputs[0] == "logits"
    if e.task == "text-generation":
        # exported with KV cache (text-generation-with-past)
        assert any(name.startswith("past_key_values") for name in inputs)
        assert "generation_config.json" in files


@pytest.mark.parametrize("kind", KINDS)
def test_parity_is_tight_in_fp32(exported: dict[str, Exported], kind: str) -> None:
    e = exported[kind]
    report = check_parity(e.model, e.tokenizer, e.onnx_dir, e.task, SENTENCES)
    assert report.passed, report.detail
    assert report.max_abs_diff < 1e-4, report.detail
    assert report.cosine_min > 0.99999, report.detail
    assert require_parity(e.model, e.tokenizer, e.onnx_dir, e.task, SENTENCES).passed


def test_parity_fails_for_a_different_model(exported: dict[str, Exported], tmp_path: Path) -> None:
    """An export compared with another model (other weights) must fail, with numbers."""
    e = exported["bert"]
    other, _ = build("bert", tmp_path / "other", seed=1)
    report = check_parity(other, e.tokenizer, e.onnx_dir, e.task, SENTENCES)
    assert not report.passed
    assert report.max_abs_diff > 1e-2
    assert "FAILED" in report.detail
    with pytest.raises(ExportError, match="does not match torch") as info:
        require_parity(other, e.tokenizer, e.onnx_dir, e.task, SENTENCES)
    assert "max |torch - onnx|" in str(info.value)


def test_parity_of_a_missing_export_is_an_export_error(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    e = exported["cls"]
    with pytest.raises(ExportError, match=r"no model\.onnx"):
        check_parity(e.model, e.tokenizer, tmp_path, e.task, SENTENCES)


def test_export_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist") as info:
        export_onnx(tmp_path / "nope", tmp_path / "out", "feature-extraction")
    assert "feature-extraction" in str(info.value)


def test_export_of_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ExportError, match=r"not a Hugging Face model directory"):
        export_onnx(tmp_path, tmp_path / "out", "text-classification")


def test_export_failure_inside_optimum_names_task_and_cause(tmp_path: Path) -> None:
    """A config.json Optimum cannot load: the error says which task and what went wrong."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ExportError, match=r"text-generation export of .* failed: \w+"):
        export_onnx(bad, tmp_path / "out", "text-generation")


def test_export_of_an_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot export for task"):
        export_onnx(tmp_path, tmp_path / "out", "summarization")  # type: ignore[arg-type]
