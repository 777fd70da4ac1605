"""Desired-state reconciliation with real signed artifacts on disk, the real HTTP stub, the real
fetcher and store. The loaded "model" is a tiny fake with ``warm_up`` (the artifacts hold random
bytes): these tests are about which version is served when, not about running one; a test with
the real OnnxModel belongs with the runtime."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefed.common.artifact import SIGNATURE_NAME, Manifest, SigningKey, generate_signing_key
from edgefed.common.errors import RejectReason
from edgefed.common.schemas import DesiredModel
from edgefed.common.serving.errors import ModelLoadError
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.fetch import ArtifactFetcher
from edgefed.edge.reconcile import ModelEvent, Reconciler
from edgefed.edge.store import ModelStore

from .controller_stub import ControllerStub
from .random_artifacts import (
    build,
    desired_model,
    desired_state,
    flip_byte,
    reset,
    shared_controller,
)


@dataclass
class FakeModel:
    """Stands in for OnnxModel (see the module docstring)."""

    name: str
    version: int
    path: Path
    fail_warm_up: bool = False
    warmed: bool = False

    def warm_up(self) -> None:
        if self.fail_warm_up:
            raise ModelLoadError(f"{self.name} v{self.version} produced NaN during warm-up")
        self.warmed = True


class FakeTable:
    """The serving table: models by name, swapped in one step."""

    def __init__(self) -> None:
        self.models: dict[str, FakeModel] = {}

    def swap(self, model: FakeModel) -> FakeModel | None:
        previous = self.models.get(model.name)
        self.models[model.name] = model
        return previous

    def remove(self, name: str) -> FakeModel | None:
        return self.models.pop(name, None)

    def names(self) -> list[str]:
        return list(self.models)


@dataclass
class Loader:
    fail_load: set[int] = field(default_factory=set)
    fail_warm_up: set[int] = field(default_factory=set)
    block: dict[int, threading.Event] = field(default_factory=dict)
    entered: threading.Event = field(default_factory=threading.Event)
    loads: list[int] = field(default_factory=list)

    def __call__(self, path: Path, manifest: Manifest, desired: DesiredModel) -> FakeModel:
        self.loads.append(manifest.version)
        self.entered.set()
        if manifest.version in self.block:
            assert self.block[manifest.version].wait(10)
        if manifest.version in self.fail_load:
            raise ModelLoadError(f"cannot create a session for v{manifest.version}")
        assert (path / "model.onnx").stat().st_size == manifest.file("model.onnx").size
        return FakeModel(
            manifest.name, manifest.version, path, manifest.version in self.fail_warm_up
        )


@dataclass
class Agent:
    store: ModelStore
    table: FakeTable
    loader: Loader
    reconciler: Reconciler[FakeModel]
    events: list[ModelEvent]
    configured: list[DesiredModel]

    def steps(self) -> list[tuple[str, int | None, RejectReason | None]]:
        return [(e.step, e.version, e.reason) for e in self.events if e.step != "downloading"]

    def serving(self) -> dict[str, int]:
        return {name: m.version for name, m in self.table.models.items()}


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the agent used the network")


@pytest.fixture
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerStub]:
    with shared_controller(tmp_path_factory.mktemp("controller")) as stub:
        yield stub


@pytest.fixture
def stub(controller: ControllerStub, tmp_path: Path) -> ControllerStub:
    return reset(controller, tmp_path / "store")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        yield c


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_agent(
    state_dir: Path, stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey
) -> Any:
    def make(*, retries: int = 1, fetch: Any = None) -> Agent:
        store = ModelStore(state_dir)
        table = FakeTable()
        loader = Loader()
        events: list[ModelEvent] = []
        configured: list[DesiredModel] = []
        fetcher = fetch or ArtifactFetcher(
            client,
            stub.agent_token,
            [key.verify_key],
            ArtifactSettings(),
            retries=retries,
            backoff_s=0.01,
        )
        reconciler = Reconciler(
            store=store,
            table=table,
            loader=loader,
            fetch=fetcher,
            report=events.append,
            trusted_keys=[key.verify_key],
            configure=configured.append,
        )
        return Agent(store, table, loader, reconciler, events, configured)

    return make


def _staging_is_empty(state_dir: Path) -> bool:
    return not any(p.is_file() for p in (state_dir / "staging").rglob("*"))


# --------------------------------------------------------------------------- deploying


async def test_a_desired_model_is_downloaded_verified_loaded_and_served(
    make_agent: Any, stub: ControllerStub, key: SigningKey, state_dir: Path
) -> None:
    agent = make_agent()
    v1 = build(stub.store, key, version=1)

    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))

    assert agent.serving() == {"m": 1}
    assert agent.table.models["m"].warmed
    assert agent.steps() == [
        ("verifying", 1, None),
        ("loading", 1, None),
        ("warming", 1, None),
        ("loaded", 1, None),
    ]
    downloading = [e for e in agent.events if e.step == "downloading"]
    assert downloading[0].detail == stub.artifact_url("m", 1, "x86-avx2")
    assert downloading[-1].bytes_done == downloading[-1].bytes_total
    assert agent.store.current("m") == 1
    assert agent.store.generation == 1
    assert _staging_is_empty(state_dir)


async def test_a_new_version_swaps_in_and_the_previous_is_kept_for_rollback(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    v1, v2 = build(stub.store, key, version=1), build(stub.store, key, version=2)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))

    await agent.reconciler.apply(desired_state(2, desired_model(stub, v2)))

    assert agent.serving() == {"m": 2}
    record = agent.store.get("m")
    assert record is not None
    assert (record.current, record.previous) == (2, 1)
    assert "v1 kept for rollback" in agent.events[-1].detail

    assert await agent.reconciler.rollback("m") == 1
    assert agent.serving() == {"m": 1}
    assert agent.events[-1].step == "restored"
    assert agent.store.floor("m") == 3


@pytest.mark.parametrize("failure", ["load", "warm-up"])
async def test_a_model_that_fails_to_load_or_warm_up_leaves_the_old_one_serving(
    make_agent: Any, stub: ControllerStub, key: SigningKey, state_dir: Path, failure: str
) -> None:
    agent = make_agent()
    v1, v2 = build(stub.store, key, version=1), build(stub.store, key, version=2)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))
    serving = agent.table.models["m"]
    (agent.loader.fail_load if failure == "load" else agent.loader.fail_warm_up).add(2)

    await agent.reconciler.apply(desired_state(2, desired_model(stub, v2)))

    assert agent.table.models["m"] is serving
    event = agent.events[-1]
    assert (event.step, event.version) == ("failed", 2)
    assert f"{failure} failed" in event.detail
    assert "v1 keeps serving" in event.detail
    assert agent.store.current("m") == 1
    assert not agent.store.path("m", 2).exists()
    assert _staging_is_empty(state_dir)
    assert agent.store.generation == 2  # handled: not applied again and again


def _flipped(stub: ControllerStub, key: SigningKey, version: int) -> DesiredModel:
    directory = build(stub.store, key, version=version)
    flip_byte(directory / "model.onnx")
    return desired_model(stub, directory)


def _unsigned(stub: ControllerStub, key: SigningKey, version: int) -> DesiredModel:
    directory = build(stub.store, key, version=version)
    (directory / SIGNATURE_NAME).unlink()
    return desired_model(stub, directory)


def _other_key(stub: ControllerStub, key: SigningKey, version: int) -> DesiredModel:
    return desired_model(stub, build(stub.store, generate_signing_key(), version=version))


def _sha_mismatch(stub: ControllerStub, key: SigningKey, version: int) -> DesiredModel:
    directory = build(stub.store, key, version=version)
    return desired_model(stub, directory, manifest_sha256="ab" * 32)


def _older(stub: ControllerStub, key: SigningKey, version: int) -> DesiredModel:
    return desired_model(stub, build(stub.store, key, version=1))


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_flipped, RejectReason.HASH_MISMATCH),
        (_unsigned, RejectReason.MISSING_SIGNATURE),
        (_other_key, RejectReason.UNTRUSTED_SIGNER),
        (_sha_mismatch, RejectReason.HASH_MISMATCH),
        (_older, RejectReason.VERSION_TOO_LOW),
    ],
    ids=["flipped-byte", "unsigned", "other-key", "manifest-sha", "older-version"],
)
async def test_an_attack_is_rejected_with_its_reason_and_the_old_model_keeps_serving(
    make_agent: Any,
    stub: ControllerStub,
    key: SigningKey,
    state_dir: Path,
    attack: Any,
    reason: RejectReason,
) -> None:
    agent = make_agent()
    v2 = build(stub.store, key, version=2)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v2)))
    serving = agent.table.models["m"]
    bad = attack(stub, key, 3)
    stub.requests.clear()

    await agent.reconciler.apply(desired_state(2, bad))

    event = agent.events[-1]
    assert (event.step, event.version, event.reason) == ("rejected", bad.version, reason)
    assert agent.table.models["m"] is serving
    assert agent.store.current("m") == 2
    assert sorted(p.name for p in (state_dir / "models" / "m").iterdir()) == ["v2"]
    assert _staging_is_empty(state_dir)
    if reason is RejectReason.VERSION_TOO_LOW:
        assert stub.requests == []  # refused before any network access


# --------------------------------------------------------------------------- desired states


async def test_a_replayed_or_older_desired_state_changes_nothing(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    v1, v2 = build(stub.store, key, version=1), build(stub.store, key, version=2)
    v3 = build(stub.store, key, version=3)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))
    current = desired_state(2, desired_model(stub, v2))
    await agent.reconciler.apply(current)
    stub.requests.clear()
    agent.events.clear()

    await agent.reconciler.apply(desired_state(2, desired_model(stub, v3)))  # same generation
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))  # older
    await agent.reconciler.apply(desired_state(1))  # an old state that would unload everything

    assert agent.serving() == {"m": 2}
    assert [(e.step, e.version) for e in agent.events] == [("rejected", 3), ("rejected", 1)]
    assert all("replay" in e.detail for e in agent.events)
    assert stub.requests == []
    assert agent.store.generation == 2

    agent.events.clear()
    await agent.reconciler.apply(current)  # the retained message delivered again: quiet
    assert agent.events == []
    assert stub.requests == []


async def test_a_model_left_out_of_the_desired_state_is_unloaded_and_its_files_kept(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    v1 = build(stub.store, key, version=1)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))

    await agent.reconciler.apply(desired_state(2))

    assert agent.serving() == {}
    assert agent.events[-1].step == "unloaded"
    assert agent.store.path("m", 1).is_dir()
    restarted = make_agent(fetch=_no_network)
    await restarted.reconciler.restore()
    assert restarted.serving() == {}  # not wanted: not restored

    await restarted.reconciler.apply(desired_state(3, desired_model(stub, v1)))
    assert restarted.serving() == {"m": 1}  # wanted again: from disk, no download
    assert restarted.events[-1].detail == "loaded from the installed copy"


async def test_only_batching_changes_are_applied_in_place(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    v1 = build(stub.store, key, version=1)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1, max_batch_size=8)))
    stub.requests.clear()
    faster = desired_model(stub, v1, max_batch_size=32, max_batch_wait_ms=5.0)

    await agent.reconciler.apply(desired_state(2, faster))

    assert agent.loader.loads == [1]
    assert agent.configured == [faster]
    assert stub.requests == []
    record = agent.store.get("m")
    assert record is not None
    assert record.settings == faster


async def test_newer_states_arriving_during_an_apply_are_coalesced_to_the_newest(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    models = {v: desired_model(stub, build(stub.store, key, version=v)) for v in (1, 2, 3)}
    release = threading.Event()
    agent.loader.block[1] = release

    first = asyncio.create_task(agent.reconciler.apply(desired_state(1, models[1])))
    assert await asyncio.to_thread(agent.loader.entered.wait, 10)
    second = asyncio.create_task(agent.reconciler.apply(desired_state(2, models[2])))
    third = asyncio.create_task(agent.reconciler.apply(desired_state(3, models[3])))
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second, third), 20)

    assert agent.loader.loads == [1, 3]
    assert agent.serving() == {"m": 3}
    assert agent.store.generation == 3
    assert not any("/v2/" in path for _, path, _ in stub.requests)


# --------------------------------------------------------------------------- failures


async def test_a_cut_download_fails_temporarily_and_retry_resumes_it(
    make_agent: Any, stub: ControllerStub, key: SigningKey, state_dir: Path
) -> None:
    agent = make_agent(retries=0)
    v1 = build(stub.store, key, version=1, size=4000)
    stub.fail_after_bytes = 1500

    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))

    assert agent.events[-1].step == "failed"
    assert agent.events[-1].temporary  # the report tells the controller a retry is coming
    assert agent.reconciler.needs_retry
    assert (state_dir / "staging" / "m" / "v1" / "model.onnx").stat().st_size == 1500
    assert agent.serving() == {}

    stub.fail_after_bytes = None
    await agent.reconciler.retry()

    assert agent.serving() == {"m": 1}
    assert not agent.reconciler.needs_retry
    assert ("GET", "/api/v1/artifacts/m/v1/x86-avx2/model.onnx", "bytes=1500-") in stub.requests


async def test_a_refused_agent_token_fails_and_the_old_model_keeps_serving(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    v1, v2 = build(stub.store, key, version=1), build(stub.store, key, version=2)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))
    stub.agent_token = "rotated"

    await agent.reconciler.apply(desired_state(2, desired_model(stub, v2)))

    event = agent.events[-1]
    assert (event.step, event.version) == ("failed", 2)
    assert "agent token" in event.detail
    assert not event.temporary
    assert agent.serving() == {"m": 1}
    assert not agent.reconciler.needs_retry


# --------------------------------------------------------------------------- restart


async def test_a_restarted_agent_serves_its_installed_model_without_the_network(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    v1, v2 = build(stub.store, key, version=1), build(stub.store, key, version=2)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))
    retained = desired_state(2, desired_model(stub, v2))
    await agent.reconciler.apply(retained)

    restarted = make_agent(fetch=_no_network)  # a new process: new store, table, reconciler
    await restarted.reconciler.restore()

    assert restarted.serving() == {"m": 2}
    assert restarted.steps()[-1] == ("restored", 2, None)
    await restarted.reconciler.apply(retained)  # the retained desired state, again
    assert restarted.serving() == {"m": 2}
    assert restarted.loader.loads == [2]


async def test_a_tampered_installed_file_is_caught_at_restore_and_the_previous_serves(
    make_agent: Any, stub: ControllerStub, key: SigningKey, state_dir: Path
) -> None:
    agent = make_agent()
    v1, v2 = build(stub.store, key, version=1), build(stub.store, key, version=2)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))
    retained = desired_state(2, desired_model(stub, v2))
    await agent.reconciler.apply(retained)
    flip_byte(state_dir / "models" / "m" / "v2" / "model.onnx")

    restarted = make_agent()
    await restarted.reconciler.restore()

    steps = restarted.steps()
    assert ("rejected", 2, RejectReason.HASH_MISMATCH) in steps
    assert steps[-1] == ("restored", 1, None)
    assert restarted.serving() == {"m": 1}
    assert restarted.loader.loads == [1]
    assert not (state_dir / "models" / "m" / "v2").exists()

    # the controller still wants v2: the same version is fetched again (never a lower one)
    await restarted.reconciler.apply(retained)
    assert restarted.serving() == {"m": 2}
    assert restarted.store.current("m") == 2


async def test_a_tampered_model_without_a_previous_version_is_not_served(
    make_agent: Any, stub: ControllerStub, key: SigningKey, state_dir: Path
) -> None:
    agent = make_agent()
    v1 = build(stub.store, key, version=1)
    await agent.reconciler.apply(desired_state(1, desired_model(stub, v1)))
    (state_dir / "models" / "m" / "v1" / "planted.py").write_text("import os")

    restarted = make_agent(fetch=_no_network)
    await restarted.reconciler.restore()

    assert restarted.serving() == {}
    assert restarted.steps()[-1] == ("rejected", 1, RejectReason.EXTRA_FILE)
    assert restarted.store.current("m") is None
    assert restarted.store.floor("m") == 2


async def test_a_cancelled_apply_can_be_applied_again(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    state = desired_state(1, desired_model(stub, build(stub.store, key, version=1)))
    release = threading.Event()
    agent.loader.block[1] = release
    task = asyncio.create_task(agent.reconciler.apply(state))
    assert await asyncio.to_thread(agent.loader.entered.wait, 10)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert agent.store.generation == 0

    del agent.loader.block[1]
    await agent.reconciler.apply(state)  # the agent shut down mid-apply; the state comes again
    assert agent.serving() == {"m": 1}
    assert agent.store.generation == 1


async def test_an_artifact_for_another_split_role_is_rejected(
    make_agent: Any, stub: ControllerStub, key: SigningKey
) -> None:
    agent = make_agent()
    full = build(stub.store, key, version=1)

    await agent.reconciler.apply(
        desired_state(1, desired_model(stub, full, role="head", split_point=2))
    )

    event = agent.events[-1]
    assert (event.step, event.reason) == ("rejected", RejectReason.MALFORMED_MANIFEST)
    assert "head" in event.detail
    assert agent.serving() == {}
    assert agent.store.current("m") is None
