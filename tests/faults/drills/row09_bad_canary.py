"""Row 9: a canary of a bad model on a real fleet (controller and three agents as processes).

Three bad versions, one after the other, each deployed as a canary of one agent out of three:

* ``crash``: a signed artifact whose ONNX graph does not load (it verifies, then fails to load);
* ``errors``: a model that loads and warms up but fails every text over 16 tokens -- with one
  request in five long (the traffic below), it fails 20 % of its requests;
* ``quality``: a model that answers everything, but worse: the good model with noise on its
  weights, its validation report measured for real against the teacher (cosine of the
  embeddings on held-out sentences) and signed into its manifest.

What must hold: each is stopped automatically -- the first two by the load and error-rate gates
while the canary runs, then rolled back (a new, higher version with the previous content that
the canary loads); the third by the quality gate (``min_quality``) before anything is
published -- and never more than the canary set is told to run a bad version, nor answers with
it. Requests go round robin to the three agents the whole time, one in five long.

Figures: requests that failed (the errors the canary answered until the rollback), and the time
to roll back: from the canary being told the bad version to the canary answering with the
rollback version (``quality``: until the refusal).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import BertModel

from edgefed.cloud.compress.export import export_onnx
from edgefed.cloud.compress.publish import graph_specs
from edgefed.cloud.compress.runtime import OnnxRunner, TorchRunner
from edgefed.cloud.compress.teacher import load_teacher
from edgefed.cloud.compress.validate import quality_report
from edgefed.common.artifact import write_artifact
from tests.cloud.e2e.world import MODEL, TARGET
from tests.faults.drills import DrillResult, Figure
from tests.faults.drills.rollout_fleet import Fleet, Load, running_fleet, wait_until

ROW = 9
INJECT = "canary of a model that crashes on load / errors on 20 % of requests / regresses quality"
MUST_HOLD = "automatic abort and rollback; never more than the canary set on the bad version"

MIN_COSINE = 0.99
"""The quality gate of every deployment here: the good model scores 1.0 against its teacher."""
HELD_OUT = [
    "the weather is fine today",
    "edge devices run small models",
    "a rollout goes to a canary first",
    "the controller signs every artifact",
    "requests are answered by the nearest agent",
    "quantised models are smaller and faster",
    "the broker keeps retained messages",
    "a model that fails is rolled back",
    "federated learning keeps data on the device",
    "latency matters more than throughput here",
    "the quick brown fox jumps over the lazy dog",
    "every version is higher than the one before",
]


def _strategy(soak_s: float) -> dict[str, Any]:
    return {
        "kind": "canary",
        "canary_count": 1,
        "soak_s": soak_s,
        "min_requests": 10,
        "max_error_rate": 0.1,
        "max_latency_ratio": None,  # a loaded test machine is not a latency regression
        "min_quality": {"cosine_mean": MIN_COSINE},
    }


def _measured_release(f: Fleet, onnx_dir: Path) -> tuple[int, dict[str, float]]:
    """Publish ``onnx_dir`` as the next version with its validation report measured against the
    teacher, signed into the manifest as ``edgefed compress`` does, and register it."""
    w = f.world
    teacher = load_teacher(w.sources["good"].parent / "good-hf", "feature-extraction")
    quality = quality_report(
        "feature-extraction",
        TorchRunner(teacher.model, "feature-extraction"),
        OnnxRunner(onnx_dir, "feature-extraction"),
        teacher.tokenizer,
        HELD_OUT,
    )
    version = w.next_version()
    dest = w.store / MODEL / f"v{version}" / TARGET
    shutil.copytree(onnx_dir, dest)
    inputs, outputs, opset = graph_specs(dest / "model.onnx")
    write_artifact(
        dest,
        name=MODEL,
        version=version,
        task="feature-extraction",
        target=TARGET,
        signing_key=w.key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        metrics={f"quality.{k}": v for k, v in quality.items()},
    )
    w.ok("POST", f"/models/{MODEL}/versions", json={"version": version})
    return version, quality


def _regressed_onnx(f: Fleet, root: Path) -> Path:
    """The good model with noise on every weight (a badly distilled student), exported."""
    hf = f.world.sources["good"].parent / "good-hf"
    torch.manual_seed(9)
    model = BertModel.from_pretrained(hf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std().clamp(min=0.02) * 0.8)
    out = root / "regressed-hf"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (hf / name).exists():
            shutil.copy2(hf / name, out / name)
    onnx_dir = root / "regressed-onnx"
    export_onnx(out, onnx_dir, "feature-extraction")
    return onnx_dir


def _canary_case(f: Fleet, load: Load, kind: str, notes: list[str]) -> dict[str, Any]:
    w = f.world
    bad = w.release("broken" if kind == "crash" else "erroring")
    start = time.monotonic()
    dep_id = int(
        w.ok(
            "POST",
            "/deployments",
            json={
                "model": MODEL,
                "version": bad,
                "target": TARGET,
                "selector": {"labels": {"site": "lab"}},
                "strategy": _strategy(soak_s=30) | {"min_quality": {}},
            },
        )["id"]
    )
    try:  # "aborted" comes first, then "rolled_back" once the rollback version is published
        dep = w.wait_deployment(dep_id, {"rolled_back", "completed"}, timeout_s=60)
    except AssertionError:
        dep = w.deployment(dep_id)
    canary = {a["agent_id"] for a in dep["agents"] if a["canary"]}
    rollback = dep["rollback_version"]
    told = [r.at for r in f.watcher.raw if r.version == bad]
    if dep["status"] == "rolled_back" and rollback is not None:
        for agent_id in canary:
            f.watcher.serving(agent_id, rollback)
    done = time.monotonic()
    told_at = min(told) if told else start
    failed = load.failed(start, done)
    beyond = (f.watcher.versions_sent(bad) - canary) | {
        o.agent_id for o in load.outcomes if o.version == bad and o.agent_id not in canary
    }
    notes.append(
        f"{kind}: v{bad} {dep['status']} ({dep['reason']}); canary {sorted(canary)}, "
        f"rollback v{rollback}; {len(failed)} of {load.sent(start, done)} requests failed"
        + (f" (e.g. {failed[0].outcome[:80]})" if failed else "")
    )
    return {
        "rolled_back": dep["status"] == "rolled_back" and rollback is not None,
        "failed": len(failed),
        "failed_elsewhere": sum(1 for o in failed if o.agent_id not in canary),
        "rollback_s": round(done - told_at, 2),
        "beyond_canary": len(beyond),
    }


def _quality_case(f: Fleet, workdir: Path, load: Load, notes: list[str]) -> dict[str, Any]:
    w = f.world
    bad, quality = _measured_release(f, _regressed_onnx(f, workdir / "regressed"))
    start = time.monotonic()
    seen = len(f.watcher.raw)
    answer = w.api(
        "POST",
        "/deployments",
        json={
            "model": MODEL,
            "version": bad,
            "target": TARGET,
            "selector": {"labels": {"site": "lab"}},
            "strategy": _strategy(soak_s=2),
        },
    )
    refused = answer.status_code == 422 and "quality gate" in answer.text
    done = time.monotonic()
    time.sleep(1.0)  # anything published by mistake would reach the watcher meanwhile
    told = {r.agent_id for r in f.watcher.raw[seen:] if r.version == bad}
    served = {o.agent_id for o in load.outcomes if o.version == bad}
    notes.append(
        f"quality: v{bad} measured cosine_mean {quality['cosine_mean']:.3f} against the teacher "
        f"(gate {MIN_COSINE}); POST /deployments -> {answer.status_code} "
        f"{answer.text[:120]}; agents told {len(told)}"
    )
    return {
        "rolled_back": refused and not told,
        "failed": len(load.failed(start, done)),
        "failed_elsewhere": 0,
        "rollback_s": round(done - start, 2),
        "beyond_canary": len(told | served),
        "cosine_mean": round(quality["cosine_mean"], 4),
    }


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    notes: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    control: str | None = None
    with running_fleet(workdir) as f, Load(f.watcher, f.agent_ids, long_every=5) as load:
        results["crash"] = _canary_case(f, load, "crash", notes)
        results["errors"] = _canary_case(f, load, "errors", notes)
        results["quality"] = _quality_case(f, workdir, load, notes)
        if full:  # no false alarm: a good version with its report passes the same gates
            good, quality = _measured_release(f, f.world.sources["good"])
            dep_id = f.world.deploy(good, **_strategy(soak_s=5))
            dep = f.world.wait_deployment(dep_id, {"rolled_back", "completed", "aborted"})
            control = str(dep["status"])
            notes.append(
                f"control: good v{good} (cosine_mean {quality['cosine_mean']:.3f}) through the "
                f"same gates: {control} ({dep['reason']})"
            )
        wait_until(lambda: load.sent() > 0, 10, "requests were sent")
        sent = load.sent()
    figures: dict[str, Figure] = {"requests": sent}
    for kind, r in results.items():
        figures[f"{kind}_failed_requests"] = r["failed"]
        figures[f"{kind}_rollback_s"] = r["rollback_s"]
    figures["failed_requests"] = sum(r["failed"] for r in results.values())
    figures["failed_beyond_canary"] = sum(r["failed_elsewhere"] for r in results.values())
    figures["beyond_canary"] = sum(r["beyond_canary"] for r in results.values())
    figures["rolled_back"] = sum(1 for r in results.values() if r["rolled_back"])
    figures["regressed_cosine_mean"] = results["quality"]["cosine_mean"]
    if control is not None:
        figures["good_control"] = control
    held = (
        figures["rolled_back"] == len(results)
        and figures["beyond_canary"] == 0
        and figures["failed_beyond_canary"] == 0
        and control in (None, "completed")
    )
    notes.append(
        "canary 1 of 3 agents, gates: load, error rate > 10 % from 10 requests on (soak 30 s), "
        f"min_quality cosine_mean {MIN_COSINE}; requests round robin, one in five long; time to "
        "roll back from the canary told to the canary answering with the rollback version"
    )
    return DrillResult(ROW, figures, held, notes)
