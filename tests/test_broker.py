"""The private mosquitto helper: finding the binary, starting, stopping, failing clearly."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefed.common import broker as broker_module
from edgefed.common.broker import PrivateBroker, find_mosquitto
from edgefed.common.errors import BrokerNotInstalled, BrokerUnavailable, ConfigError


def connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except ConnectionRefusedError:
        return False


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still in the process table: only acceptable as a zombie waiting to be reaped.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port on which another socket is listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# --------------------------------------------------------------------------- finding mosquitto


def test_explicit_missing_binary_is_not_installed(tmp_path: Path) -> None:
    with pytest.raises(BrokerNotInstalled, match="missing"):
        find_mosquitto(tmp_path / "no-mosquitto")


def test_missing_mosquitto_explains_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(broker_module, "_SEARCH_DIRS", ())

    with pytest.raises(BrokerNotInstalled) as info:
        find_mosquitto()

    assert "apt-get install -y mosquitto" in info.value.message
    assert "EDGEFED_BROKER_URL" in info.value.message


def test_invalid_user_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="user name"):
        PrivateBroker(users={"bad:name": "secret"})


# --------------------------------------------------------------------------- a real mosquitto


@pytest.mark.integration
def test_broker_accepts_connections_on_its_port(tmp_path: Path) -> None:
    with PrivateBroker(data_dir=tmp_path) as broker:
        assert broker.port > 0
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert connects(broker.host, broker.port)


@pytest.mark.integration
def test_generated_config_turns_nagle_off_and_listens_on_loopback_only(tmp_path: Path) -> None:
    with PrivateBroker(data_dir=tmp_path) as broker:
        lines = (tmp_path / "mosquitto.conf").read_text().splitlines()

        assert "set_tcp_nodelay true" in lines
        assert [ln for ln in lines if ln.startswith("listener")] == [
            f"listener {broker.port} 127.0.0.1"
        ]


@pytest.mark.integration
def test_leaving_the_context_ends_the_process_and_closes_the_port(tmp_path: Path) -> None:
    with PrivateBroker(data_dir=tmp_path) as broker:
        pid, port = broker.pid, broker.port
        assert pid is not None

    assert process_is_gone(pid)
    assert not connects("127.0.0.1", port)
    assert not broker.running


@pytest.mark.integration
def test_restart_after_kill_keeps_the_same_port(tmp_path: Path) -> None:
    with PrivateBroker(data_dir=tmp_path) as broker:
        port, first_pid = broker.port, broker.pid
        broker.kill()
        assert not connects("127.0.0.1", port)

        broker.start()

        assert broker.port == port
        assert broker.pid != first_pid
        assert connects("127.0.0.1", port)


@pytest.mark.integration
def test_broker_on_a_port_in_use_fails_with_a_clear_message(tmp_path: Path, held_port: int) -> None:
    broker = PrivateBroker(data_dir=tmp_path, port=held_port, start_timeout_s=5)

    with pytest.raises(BrokerUnavailable) as info:
        broker.start()

    assert "Address already in use" in info.value.message
    assert str(held_port) in info.value.message
    assert not broker.running
    broker.close()


@pytest.mark.integration
def test_broker_without_fixed_port_skips_a_port_taken_in_the_meantime(
    tmp_path: Path, held_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([held_port])
    real_free_port = broker_module.free_port
    monkeypatch.setattr(
        broker_module, "free_port", lambda host: next(ports, None) or real_free_port(host)
    )

    with PrivateBroker(data_dir=tmp_path) as broker:
        assert broker.port != held_port
        assert connects("127.0.0.1", broker.port)


@pytest.mark.integration
def test_a_broker_left_running_by_a_killed_owner_is_stopped_when_the_data_dir_is_reused(
    tmp_path: Path,
) -> None:
    import signal as _signal
    import subprocess as _subprocess
    import sys as _sys

    from edgefed.common.broker import PrivateBroker, free_port

    port = free_port()
    script = (
        "import sys, time; from pathlib import Path;"
        "from edgefed.common.broker import PrivateBroker;"
        f"b = PrivateBroker(port={port}, data_dir=Path({str(tmp_path)!r})); b.start();"
        "print('UP', flush=True); time.sleep(60)"
    )
    owner = _subprocess.Popen([_sys.executable, "-c", script], stdout=_subprocess.PIPE)
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == b"UP"
    owner.send_signal(_signal.SIGKILL)  # the owner dies; its mosquitto does not
    owner.wait()
    orphan = int((tmp_path / "mosquitto.pid").read_text())

    with PrivateBroker(port=port, data_dir=tmp_path) as again:
        assert again.running
        assert again.pid != orphan
    assert not Path(f"/proc/{orphan}").exists()
