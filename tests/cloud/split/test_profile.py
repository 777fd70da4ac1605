"""Per-layer profiling of real (tiny) Hugging Face models: real torch export, real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.cloud.split.errors import SplitPointError
from edgefed.cloud.split.profile import (
    MESSAGE_OVERHEAD_BYTES,
    ModelProfile,
    ProfileError,
    component_graphs,
    infer_task,
    profile_model,
    scale,
    time_onnx_files,
)
from edgefed.common.devices import MeasuredDeviceReport, load_profile, profile_from_report
from tests.compress.tiny_hf import build

HIDDEN = 32  # tiny_hf models
LAYERS = 2
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def bert(root: Path) -> ModelProfile:
    build("bert", root / "bert")
    return profile_model(
        root / "bert", batch=BATCH, seq=SEQ, repeats=3, graphs_dir=root / "bert-graphs"
    )


@pytest.fixture(scope="module")
def gpt2(root: Path) -> ModelProfile:
    build("gpt2", root / "gpt2")
    return profile_model(root / "gpt2", batch=1, seq=SEQ, repeats=3)


def test_encoder_profile_has_one_positive_time_per_layer(bert: ModelProfile) -> None:
    assert bert.kind == "encoder"
    assert bert.task == "feature-extraction"
    assert bert.architecture == "BertModel"
    assert bert.num_layers == LAYERS
    assert bert.hidden_size == HIDDEN
    assert (bert.batch, bert.seq) == (BATCH, SEQ)
    assert len(bert.forward.layer_ms) == LAYERS
    assert all(ms > 0 for ms in bert.forward.layer_ms)
    assert bert.forward.embed_ms > 0
    assert bert.forward.head_ms > 0
    assert bert.decode_step is None
    assert bert.forward.total_ms == pytest.approx(
        bert.forward.embed_ms + sum(bert.forward.layer_ms) + bert.forward.head_ms
    )
    assert bert.providers == ["CPUExecutionProvider"]
    assert set(bert.graphs_sha256) == {"embed", "layer0", "layer1", "head"}


def test_encoder_weights_are_counted_per_component(bert: ModelProfile) -> None:
    # BERT layer: 4 attention projections + 2 MLP matrices + biases + 2 layer norms.
    h, i = HIDDEN, 64
    per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    assert bert.layer_params == [per_layer] * LAYERS
    assert bert.embed_params > 0
    assert bert.head_params == 0  # mean pooling has no weights
    assert bert.edge_weight_bytes(1, 4) == 4 * (bert.embed_params + per_layer)
    assert bert.edge_weight_bytes(0, 4) == 0


def test_activation_bytes_follow_hidden_times_seq_and_halve_from_fp32_to_fp16(
    bert: ModelProfile,
) -> None:
    elements = BATCH * SEQ * HIDDEN
    mask = BATCH * SEQ * 8  # the int64 attention mask travels with the hidden state
    fp32, fp16, int8 = (bert.activation_bytes[d] for d in ("fp32", "fp16", "int8"))
    framing = 1024  # safetensors header + message envelope, well below any real activation
    assert 4 * elements + mask + MESSAGE_OVERHEAD_BYTES <= fp32 <= 4 * elements + mask + framing
    assert fp32 - fp16 == pytest.approx(2 * elements, abs=16)
    # int8 carries one float32 scale per token on top of one byte per element.
    assert fp16 - int8 == pytest.approx(elements - BATCH * SEQ * 4, abs=200)
    # Every split point sends the same bytes: hidden states do not shrink with depth.
    assert bert.activation_bytes_at(1, "fp16") == fp16


def test_raw_input_is_much_smaller_than_an_activation(bert: ModelProfile) -> None:
    assert bert.input_bytes < bert.activation_bytes["fp16"]
    # result: one mean-pooled float32 vector per row
    assert bert.output_bytes >= BATCH * HIDDEN * 4 + MESSAGE_OVERHEAD_BYTES


def test_decoder_profile_times_the_prompt_and_one_generation_step(gpt2: ModelProfile) -> None:
    assert gpt2.kind == "decoder"
    assert gpt2.task == "text-generation"
    assert gpt2.decode_step is not None
    assert len(gpt2.decode_step.layer_ms) == LAYERS
    assert all(ms > 0 for ms in gpt2.decode_step.layer_ms)
    assert gpt2.step_activation_bytes is not None
    # one hidden vector per generated token crosses the link, not the whole sequence
    step = gpt2.step_activation_bytes["fp32"]
    assert HIDDEN * 4 + MESSAGE_OVERHEAD_BYTES <= step < gpt2.activation_bytes["fp32"]
    assert gpt2.step_input_bytes is not None
    assert gpt2.step_input_bytes > 8
    # GPT-2 ties its LM head to the token embeddings: the head's own weights are the final norm.
    assert gpt2.head_params == 2 * HIDDEN


def test_llama_and_classifier_profiles(root: Path) -> None:
    build("llama", root / "llama")
    llama = profile_model(root / "llama", seq=8, repeats=2, warmup=1)
    assert llama.architecture == "LlamaForCausalLM"
    assert llama.num_layers == LAYERS
    assert llama.decode_step is not None
    assert llama.head_params > llama.embed_params / 2  # untied LM head counts in full

    build("cls", root / "cls")
    assert infer_task(root / "cls") == "text-classification"
    cls = profile_model(root / "cls", seq=8, repeats=2, warmup=1)
    assert cls.task == "text-classification"
    assert cls.head_params > 0  # pooler + classifier
    assert cls.output_bytes < MESSAGE_OVERHEAD_BYTES + 256  # two logits per row


def test_profile_round_trips_through_json(bert: ModelProfile) -> None:
    assert ModelProfile.model_validate_json(bert.model_dump_json()) == bert


def test_scale_multiplies_every_time_by_the_speed_factor(
    bert: ModelProfile, gpt2: ModelProfile
) -> None:
    nano = load_profile("jetson-nano")
    scaled = scale(bert, nano)
    assert scaled.device == "jetson-nano"
    assert scaled.forward.layer_ms == pytest.approx([ms * 6.0 for ms in bert.forward.layer_ms])
    assert scaled.forward.total_ms == pytest.approx(bert.forward.total_ms * nano.speed_factor)
    assert scaled.activation_bytes == bert.activation_bytes  # bytes do not depend on the device
    step = scale(gpt2, nano).decode_step
    assert step is not None
    assert gpt2.decode_step is not None
    assert step.head_ms == pytest.approx(gpt2.decode_step.head_ms * nano.speed_factor)
    with pytest.raises(ProfileError, match="already scaled"):
        scale(scaled, nano)


def test_the_timing_core_runs_any_onnx_files_and_feeds_a_device_report(
    bert: ModelProfile, root: Path
) -> None:
    graphs = root / "bert-graphs"
    names = ["embed", "layer0", "layer1", "head"]
    timings = time_onnx_files(
        [graphs / f"{n}.onnx" for n in names], {"batch": BATCH, "seq": SEQ}, repeats=3
    )
    assert [t.path.stem for t in timings] == names
    assert all(t.median_ms > 0 and t.runs == 3 for t in timings)
    assert [t.sha256 for t in timings] == [bert.graphs_sha256[n] for n in names]
    # what an agent would send after timing the same graphs on its device
    report = MeasuredDeviceReport(
        device="this-host",
        graphs_sha256={n: t.sha256 for n, t in zip(names, timings, strict=True)},
        median_ms={n: t.median_ms for n, t in zip(names, timings, strict=True)},
        batch=BATCH,
        seq=SEQ,
        providers=list(timings[0].providers),
        memory_bytes=2**30,
    )
    device = profile_from_report(report, bert.reference_ms(), bert.graphs_sha256)
    assert device.source == "measured"
    assert device.speed_factor > 0


def test_timing_core_names_a_dimension_it_was_not_given(root: Path) -> None:
    with pytest.raises(ProfileError, match="'seq'"):
        time_onnx_files([root / "bert-graphs" / "layer0.onnx"], {"batch": 1})
    with pytest.raises(ProfileError, match="does not exist"):
        time_onnx_files([root / "nope.onnx"], {"batch": 1})


def test_bad_input_gets_clear_errors(bert: ModelProfile, root: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitPointError, match="out of range"):
        bert.activation_bytes_at(LAYERS, "fp16")
    with pytest.raises(SplitPointError, match="out of range"):
        bert.activation_bytes_at(0, "fp16")
    with pytest.raises(ProfileError, match="unknown transfer dtype 'bf16'"):
        bert.activation_bytes_at(1, "bf16")  # type: ignore[arg-type]
    with pytest.raises(ProfileError, match=r"no config\.json"):
        profile_model(tmp_path / "missing")
    with pytest.raises(ProfileError, match="seq must be a positive integer"):
        profile_model(root / "bert", seq=0)


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    ).save_pretrained(tmp_path / "distil")
    with pytest.raises(ProfileError, match="cannot profile DistilBertModel"):
        component_graphs(tmp_path / "distil", tmp_path / "out")


def test_plan_for_profiles_the_model_directory_itself(root: Path, bert: ModelProfile) -> None:
    from edgefed.cloud.split.plan import plan_for

    result = plan_for(root / "bert", "raspberry-pi-5", 100, 1, seq=SEQ)
    assert result.model == "bert"
    assert [o.k for o in result.options] == list(range(LAYERS + 1))
    # a 2-layer, 32-wide model computes in well under a 100 ms round trip: keep it local
    assert result.choice.placement == "edge"
