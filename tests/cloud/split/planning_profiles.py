"""Model profiles for planner tests, shaped like what ``profile_model`` measures on this host.

The planner is arithmetic over a profile; these fixed profiles make its choices reproducible
(a measured profile of the real MiniLM is planned in ``test_plan_minilm.py``). The figures are
those of all-MiniLM-L6-v2 at batch 1, seq 128 on the 2-vCPU reference host (~14 ms per layer in
ONNX Runtime fp32) and the exact wire sizes the profiler computes for hidden size 384.
"""

from __future__ import annotations

from datetime import UTC, datetime

from edgefed.cloud.split.profile import ComponentTimes, ModelProfile

MINILM_LAYER_PARAMS = 1_774_464
MINILM_EMBED_PARAMS = 11_918_592


def encoder_profile(layer_ms: float = 14.0, layers: int = 6) -> ModelProfile:
    return ModelProfile(
        model="minilm-like",
        architecture="BertModel",
        task="feature-extraction",
        kind="encoder",
        num_layers=layers,
        hidden_size=384,
        batch=1,
        seq=128,
        providers=["CPUExecutionProvider"],
        measured_at=datetime(2026, 11, 1, tzinfo=UTC),
        forward=ComponentTimes(embed_ms=0.15, layer_ms=[layer_ms] * layers, head_ms=0.1),
        embed_params=MINILM_EMBED_PARAMS,
        layer_params=[MINILM_LAYER_PARAMS] * layers,
        head_params=0,
        input_bytes=2_696,
        output_bytes=2_232,
        activation_bytes={"fp32": 198_496, "fp16": 100_192, "int8": 51_696},
    )


def decoder_profile() -> ModelProfile:
    """Shaped like SmolLM2-135M: 30 layers, hidden 576, prompt of 64 tokens."""
    layers = 30
    return ModelProfile(
        model="smollm-like",
        architecture="LlamaForCausalLM",
        task="text-generation",
        kind="decoder",
        num_layers=layers,
        hidden_size=576,
        batch=1,
        seq=64,
        providers=["CPUExecutionProvider"],
        measured_at=datetime(2026, 11, 1, tzinfo=UTC),
        forward=ComponentTimes(embed_ms=0.1, layer_ms=[3.0] * layers, head_ms=4.0),
        decode_step=ComponentTimes(embed_ms=0.05, layer_ms=[1.2] * layers, head_ms=3.5),
        embed_params=28_311_552,
        layer_params=[3_540_096] * layers,
        head_params=576,
        input_bytes=1_600,
        output_bytes=700,
        activation_bytes={"fp32": 148_600, "fp16": 74_900, "int8": 38_000},
        step_activation_bytes={"fp32": 2_900, "fp16": 1_750, "int8": 1_180},
        step_input_bytes=700,
    )
