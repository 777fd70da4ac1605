"""The deployment engine on loopback with real Flower processes: the controller's SuperLink
supervisor (start, restart after a kill, stop leaving nothing behind), the agent's SuperNode
supervisor, TLS and SuperNode authentication as Flower 1.41 does them, and the federation
service running runs on it (submit, progress per round, success, stop, restart recovery).

The runs here use a small numpy Flower app shipped inside the FAB (``tiny_fl_app.py``), so the
engine is tested without torch; ``test_deploy_e2e.py`` runs the real edgefed apps.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.federation.flower_app import FlowerApp
from edgefed.cloud.federation.runs import FlowerRunner
from edgefed.cloud.federation.service import FederationService
from edgefed.cloud.federation.superlink import SuperLinkSupervisor, SuperLinkUnavailable
from edgefed.cloud.jobs.supervisor import JobSupervisor
from edgefed.cloud.registry.db import make_engine, make_sessionmaker, migrate
from edgefed.cloud.registry.models import FederationRun, FederationRunStatus
from edgefed.cloud.settings import FederationSettings
from edgefed.edge.config import TrainingConfig
from edgefed.edge.training.supernode import SuperNodeSupervisor
from tests.certs import TestCa

pytestmark = pytest.mark.integration

TINY_APP = textwrap.dedent(
    '''
    """A numpy Flower app following the edgefed message and progress contracts."""
    import json
    import os
    import time
    from pathlib import Path

    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()


    @client.train()
    def train(msg: Message, context: Context) -> Message:
        data = Path(str(context.node_config["data-dir"])) / "train.jsonl"
        examples = len(data.read_text().splitlines())
        arrays = [a + 1.0 for a in msg.content["arrays"].to_numpy_ndarrays()]
        content = RecordDict({
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
        })
        return Message(content=content, reply_to=msg)


    server = ServerApp()


    def _write(out: Path, progress: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".progress.tmp"
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, out / "progress.json")


    @server.main()
    def main(grid: Grid, context: Context) -> None:
        out = Path(str(context.run_config["out-dir"]))
        rounds = int(context.run_config["num-rounds"])
        nodes = int(context.run_config["min-train-nodes"])
        progress = {"status": "running", "strategy": "fedavg", "num_rounds": rounds,
                    "rounds": [], "error": None}
        _write(out, progress)
        arrays = ArrayRecord([np.zeros(3, dtype=np.float32)])
        for r in range(1, rounds + 1):
            started = time.monotonic()
            strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes,
                              min_available_nodes=nodes)
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
            arrays = result.arrays
            progress["rounds"].append({"round": r, "accepted": nodes, "rejected": [],
                                       "train_loss": 1.0, "eval_loss": None,
                                       "eval_accuracy": None,
                                       "seconds": time.monotonic() - started})
            _write(out, progress)
        (out / "model").mkdir(exist_ok=True)
        np.save(out / "model" / "w.npy", arrays.to_numpy_ndarrays()[0])
        progress.update(status="succeeded", model_dir=str(out / "model"))
        _write(out, progress)
    '''
)

TINY = FlowerApp(
    server_app="tiny_fl_app:server",
    client_app="tiny_fl_app:client",
    defaults={"num-rounds": 2, "out-dir": "", "min-train-nodes": 2},
    extra_files={"tiny_fl_app.py": TINY_APP},
)


# --------------------------------------------------------------------------- helpers


def wait_for(what: str, check: Callable[[], object], timeout: float = 120.0) -> None:
    """Poll until ``check()`` is truthy; the timeout only keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def node_data(folder: Path, lines: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(
        "".join(f'{{"text": "example {i}", "label": {i % 2}}}\n' for i in range(lines))
    )
    return folder


def activated(superlink: SuperLinkSupervisor) -> int:
    text = superlink.log_file.read_text(errors="replace")
    return text.count("[Fleet.ActivateNode] Activated")


def ssh_keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair as Flower 1.41 reads them: OpenSSH private key, OpenSSH public."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / f"{name}.key"
    public = folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def sessions_for(data_dir: Path) -> sessionmaker[Session]:
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{data_dir / 'controller.db'}")
    migrate(engine)
    return make_sessionmaker(engine, immediate=True)


class Ticker:
    """Ticks a federation service (or the job supervisor) in a thread, as its asyncio task
    would."""

    def __init__(self, service: FederationService | JobSupervisor) -> None:
        self.service = service
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        self.service.recover()
        while not self.stop.wait(0.3):
            self.service.tick()

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def row(sessions: sessionmaker[Session], run_id: int) -> FederationRun:
    with sessions() as session:
        run = session.get(FederationRun, run_id)
        assert run is not None
        session.expunge(run)
        return run


def add_run(sessions: sessionmaker[Session], **spec: object) -> int:
    with sessions.begin() as session:
        run = FederationRun(
            model="tiny",
            status=FederationRunStatus.QUEUED,
            spec={"model": "tiny", **spec},
            progress={},
            loop={},
            stop_requested=False,
        )
        session.add(run)
        session.flush()
        return run.id


# --------------------------------------------------------------------------- SuperLink alone


def test_superlink_is_restarted_after_a_kill_and_stops_without_leftovers(
    tmp_path: Path,
) -> None:
    import asyncio

    superlink = SuperLinkSupervisor(FederationSettings(enabled=True, port=0), tmp_path, check_s=0.2)

    async def scenario() -> tuple[int, int, list[psutil.Process]]:
        await asyncio.to_thread(superlink.start)
        first = superlink.pid
        assert first is not None
        watch = asyncio.create_task(superlink.run())
        os.kill(first, signal.SIGKILL)
        await asyncio.to_thread(
            wait_for,
            "the SuperLink to be restarted",
            lambda: superlink.restarts >= 1 and superlink.running,
        )
        second = superlink.pid
        assert second is not None
        family = descendants(second)
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch
        return first, second, family

    first, second, family = asyncio.run(scenario())
    assert second != first
    assert superlink.proc is None
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie"
    wait_for("the SuperLink's helpers to exit", lambda: gone(family), timeout=30)
    # it kept its port across the restart (agents and flwr find it again)
    assert (tmp_path / "federation" / "superlink.port").read_text().strip() == str(superlink.port)
    assert "FLWR_HOME" in superlink.env
    assert superlink.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_superlink_refuses_a_port_that_is_taken(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        superlink = SuperLinkSupervisor(FederationSettings(enabled=True, port=port), tmp_path)
        with pytest.raises(SuperLinkUnavailable, match=f"port {port}"):
            superlink.start()
    assert superlink.proc is None


# --------------------------------------------------------------------------- TLS and auth


def test_tls_and_supernode_auth(tmp_path: Path) -> None:
    """TLS: a SuperNode that trusts the SuperLink's CA connects, one with another CA is
    refused. Auth (Flower 1.41: ``--enable-supernode-auth`` plus keys registered through the
    Control API): a node with a registered key connects, one with an unlisted key is refused."""
    ca = TestCa.create(tmp_path / "ca", "fedca")
    other = TestCa.create(tmp_path / "other", "otherca")
    server = ca.issue("superlink", server=True)
    listed_key, listed_pub = ssh_keypair(tmp_path, "listed")
    unlisted_key, _ = ssh_keypair(tmp_path, "unlisted")
    settings = FederationSettings(
        enabled=True,
        port=0,
        tls_cert=server.cert_file,
        tls_key=server.key_file,
        tls_ca=ca.cert_file,
        supernode_auth=True,
        supernode_public_keys=[listed_pub],
    )
    superlink = SuperLinkSupervisor(settings, tmp_path / "ctl")
    nodes: list[SuperNodeSupervisor] = []
    try:
        superlink.start()
        superlink.register_supernodes()  # again after a restart: already known is fine
        data = node_data(tmp_path / "data", 3)

        def node(name: str, ca_file: Path, key: Path) -> SuperNodeSupervisor:
            cfg = TrainingConfig(
                enabled=True,
                data_dir=data,
                superlink=superlink.address,
                root_certificates=ca_file,
                auth_private_key=key,
            )
            supervisor = SuperNodeSupervisor(cfg, tmp_path / name)
            supervisor.start()
            nodes.append(supervisor)
            return supervisor

        wrong_ca = node("wrong-ca", other.cert_file, listed_key)
        unlisted = node("unlisted", ca.cert_file, unlisted_key)
        wait_for("the wrong-CA node to give up", lambda: not wrong_ca.running)
        wait_for("the unlisted node to give up", lambda: not unlisted.running)
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.log_file.read_text()
        assert "Failed to activate SuperNode" in unlisted.log_file.read_text()
        assert activated(superlink) == 0

        good = node("good", ca.cert_file, listed_key)
        wait_for("the listed node to be activated", lambda: activated(superlink) == 1)
        assert good.running
    finally:
        for supervisor in nodes:
            supervisor.stop()
        superlink.stop()


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, SuperLinkSupervisor]]:
    """An insecure loopback SuperLink with two SuperNodes (agent-side supervisors)."""
    root = tmp_path_factory.mktemp("engine")
    superlink = SuperLinkSupervisor(FederationSettings(enabled=True, port=0), root / "ctl")
    superlink.start()
    nodes = []
    try:
        for i, lines in enumerate((3, 5)):
            cfg = TrainingConfig(
                enabled=True,
                data_dir=node_data(root / f"data{i}", lines),
                superlink=superlink.address,
                insecure=True,
            )
            supervisor = SuperNodeSupervisor(cfg, root / f"agent{i}")
            supervisor.start()
            nodes.append(supervisor)
        wait_for("both SuperNodes to be activated", lambda: activated(superlink) >= 2)
        yield root, superlink
    finally:
        for supervisor in nodes:
            supervisor.stop()
        superlink.stop()


def test_a_running_federated_run_is_stopped_on_request(
    engine: tuple[Path, SuperLinkSupervisor],
) -> None:
    root, superlink = engine
    sessions = sessions_for(root / "ctl")
    service = FederationService(
        sessions,
        runner=FlowerRunner(superlink.env),
        data_dir=root / "ctl",
        superlink=superlink,
        app=TINY,
        lookup_s=5.0,
    )
    # A run to success through the service is the e2e test's (real apps, test_deploy_e2e);
    # here: one that is stopped mid-way stops in Flower too.
    with Ticker(service):
        long = add_run(sessions, rounds=200, min_nodes=2)
        wait_for(
            "the long run to report a round", lambda: row(sessions, long).progress.get("rounds")
        )
        with sessions.begin() as session:
            run = session.get(FederationRun, long)
            assert run is not None
            run.stop_requested = True
        wait_for(
            "the long run to stop",
            lambda: row(sessions, long).status == FederationRunStatus.STOPPED,
        )
    flwr_id = row(sessions, long).flwr_run_id
    assert flwr_id is not None
    flower = FlowerRunner(superlink.env).lookup(int(flwr_id))
    assert flower is not None
    assert flower.outcome == "stopped"


def test_a_run_left_running_by_a_previous_controller_fails_with_the_reason(
    engine: tuple[Path, SuperLinkSupervisor], tmp_path: Path
) -> None:
    _root, superlink = engine
    sessions = sessions_for(tmp_path / "ctl")
    left = add_run(sessions, rounds=2)
    unknown = add_run(sessions, rounds=2)
    with sessions.begin() as session:
        for run_id in (left, unknown):
            run = session.get(FederationRun, run_id)
            assert run is not None
            run.status = FederationRunStatus.RUNNING
            run.flwr_run_id = "12345"
    owned = FederationService(
        sessions, runner=FlowerRunner(superlink.env), data_dir=tmp_path, superlink=superlink
    )
    with sessions.begin() as session:  # only the first row is "ours" for the owned service
        run = session.get(FederationRun, unknown)
        assert run is not None
        run.status = FederationRunStatus.QUEUED
    owned.recover()
    failed = row(sessions, left)
    assert failed.status == FederationRunStatus.FAILED
    assert failed.error is not None
    assert "controller restarted" in failed.error

    # A SuperLink the service does not own: Flower is asked, and does not know the run.
    with sessions.begin() as session:
        run = session.get(FederationRun, unknown)
        assert run is not None
        run.status = FederationRunStatus.RUNNING
    foreign = FederationService(
        sessions, runner=FlowerRunner(superlink.env), data_dir=tmp_path, superlink=None
    )
    foreign.recover()
    foreign.tick()
    lost = row(sessions, unknown)
    assert lost.status == FederationRunStatus.FAILED
    assert lost.error is not None
    assert "does not know Flower run 12345" in lost.error


def test_flower_refusal_fails_the_run_with_flowers_words(
    engine: tuple[Path, SuperLinkSupervisor], tmp_path: Path
) -> None:
    """A run setting the app does not declare fails the run, naming it, before Flower sees it."""
    _root, superlink = engine
    sessions = sessions_for(tmp_path / "ctl")
    bad = add_run(sessions, rounds=2, no_such_setting=3)
    service = FederationService(
        sessions,
        runner=FlowerRunner(superlink.env),
        data_dir=tmp_path,
        superlink=superlink,
        app=TINY,
    )
    service.recover()
    service.tick()
    refused = row(sessions, bad)
    assert refused.status == FederationRunStatus.FAILED
    assert refused.error is not None
    assert "no-such-setting" in refused.error
