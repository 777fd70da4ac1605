"""Shared fixtures: a real mosquitto per test session (started by edgefed's own helper), a unique
fleet (topic prefix) per test, and settings isolated from the developer's environment."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.settings import Settings, load_settings
from edgefed.common.topics import Topics


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGEFED_* setting of the developer's shell leaks into a test (EDGEFED_TEST_* are the
    suite's own switches, e.g. EDGEFED_TEST_POSTGRES_URL)."""
    for name in list(os.environ):
        if name.startswith("EDGEFED_") and not name.startswith("EDGEFED_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """One real mosquitto for the whole session; tests keep apart by fleet."""
    with PrivateBroker(data_dir=tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def fleet() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topics(fleet: str) -> Topics:
    return Topics(fleet)


def fast_settings(broker_url: str, fleet: str, **mqtt: object) -> Settings:
    """Settings with short timeouts and backoff, so failure paths finish quickly."""
    base: dict[str, object] = {
        "connect_timeout_s": 5.0,
        "publish_timeout_s": 5.0,
        "subscribe_timeout_s": 5.0,
        "request_timeout_s": 5.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "keepalive_s": 5,
    }
    base.update(mqtt)
    return load_settings(broker_url=broker_url, fleet=fleet, mqtt=base)


@pytest.fixture
def settings(broker: PrivateBroker, fleet: str) -> Settings:
    return fast_settings(broker.url, fleet)


async def wait_broker_saved(b: PrivateBroker, stamp: float) -> None:
    """Wait until a broker with persistence has written its sessions after ``stamp`` (it saves
    every second), so that killing it does not lose what happened before."""
    import asyncio

    db = b.data_dir / "mosquitto.db"
    for _ in range(100):
        if db.exists() and db.stat().st_mtime > stamp:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("mosquitto did not save its sessions within 10 s")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A broker of this test's own, for tests that kill or restart it."""
    with PrivateBroker(data_dir=tmp_path / "own-broker") as b:
        yield b
