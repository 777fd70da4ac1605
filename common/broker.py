"""A private mosquitto broker on a free loopback port, started and stopped by edgefed.

No pure-Python broker speaks MQTT v5 well enough, so edgefed runs the real mosquitto with a
generated configuration: loopback only, ``set_tcp_nodelay true`` (without it every round trip
costs ~40-90 ms of Nagle delay), optional persistence, password file, TLS / mutual TLS and ACLs.
``edgefed broker`` and the test suite use this same helper.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from edgefed.common.errors import BrokerNotInstalled, BrokerUnavailable, ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "mosquitto is not installed. Install it (Debian/Ubuntu: `sudo apt-get install -y mosquitto`; "
    "Fedora: `sudo dnf install mosquitto`; macOS: `brew install mosquitto`), set "
    "EDGEFED_BROKER__MOSQUITTO_PATH to its binary, or point EDGEFED_BROKER_URL at an existing "
    "MQTT v5 broker."
)
_SEARCH_DIRS = (
    "/usr/sbin",
    "/usr/local/sbin",
    "/opt/homebrew/sbin",
    "/usr/local/opt/mosquitto/sbin",
)


def find_mosquitto(explicit: Path | str | None = None) -> Path:
    """The mosquitto binary: ``explicit``, else on PATH, else in the usual sbin folders."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise BrokerNotInstalled(f"mosquitto binary {path} is missing or not executable")
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for folder in _SEARCH_DIRS:
        candidate = Path(folder, "mosquitto")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerNotInstalled(INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    """Raise :class:`BrokerUnavailable` when another socket listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerUnavailable(
                f"cannot start mosquitto on {host}:{port}: Address already in use "
                f"(another process listens there; choose another port or leave it unset): {exc}"
            ) from exc


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """TLS for the broker's listener; ``require_certificate`` turns on mutual TLS."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False


class PrivateBroker:
    """A mosquitto process owned by this process. Use as a context manager.

    ``users`` maps user names to passwords (turns anonymous access off); ``acl`` is the text of a
    mosquitto ACL file. ``password_file`` and ``acl_file`` instead name files someone else keeps
    (the controller renders them per agent) and :meth:`reload` makes mosquitto re-read them.
    ``kill()`` and ``start()`` again keep the same port, for fault tests.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        persistence: bool = False,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
        acl: str | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: BrokerTls | None = None,
        mosquitto_path: Path | str | None = None,
        start_timeout_s: float = 10.0,
        max_queued_messages: int = 10_000,
    ) -> None:
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self._binary = find_mosquitto(mosquitto_path)
        self._own_dir = data_dir is None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._data_dir = data_dir
        self.persistence = persistence
        self.users = dict(users or {})
        if users and password_file is not None:
            raise ConfigError("give the broker users or a password_file, not both")
        if acl is not None and acl_file is not None:
            raise ConfigError("give the broker an acl text or an acl_file, not both")
        self.password_file = password_file
        self.acl_file = acl_file
        self.allow_anonymous = (
            allow_anonymous
            if allow_anonymous is not None
            else not self.users and password_file is None
        )
        self.acl = acl
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self.max_queued_messages = max_queued_messages
        self._proc: subprocess.Popen[bytes] | None = None
        for name in self.users:
            if not name or ":" in name or any(c.isspace() for c in name):
                raise ConfigError(f"broker user name {name!r} is not valid")

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgefed-broker-")
            self._data_dir = Path(self._tmp.name)
        return self._data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port or self.port else 3
        last: Exception | None = None
        for _ in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn()
                return
            except BrokerUnavailable as exc:
                last = exc
                if "Address already in use" not in str(exc) or self._fixed_port:
                    raise
                self.port = 0
        assert last is not None
        raise last

    def stop(self, timeout: float = 5.0) -> None:
        """Stop mosquitto cleanly (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for fault tests); ``start()`` brings it back."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files (connected clients stay)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._data_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "mosquitto.pid"

    def _reap_leftover(self, conf: Path) -> None:
        """Stop a mosquitto that an earlier owner of this data directory left running (its
        owner was killed before it could stop it), so that its port is free again."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(conf).encode() not in cmdline:
            return  # the pid was reused by an unrelated process
        log.warning("stopping mosquitto %d left running by an earlier owner of %s", pid, conf)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _spawn(self) -> None:
        self._reap_leftover(self.data_dir / "mosquitto.conf")
        # Another process listening on the port would accept our readiness probe while mosquitto
        # fails to bind, so a taken port must be detected before spawning, not after.
        _check_port_free(self.host, self.port)
        conf = self._write_config()
        self.log_file.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [str(self._binary), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise BrokerUnavailable(
                    f"mosquitto exited at start: {err.strip() or self._log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                if self._proc.poll() is None:
                    log.info("private mosquitto %s listening on %s", self.pid, self.url)
                    return
            time.sleep(0.02)
        self.stop()
        raise BrokerUnavailable(
            f"mosquitto did not accept connections on {self.host}:{self.port} "
            f"within {self.start_timeout_s} s: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"

    def _write_config(self) -> Path:
        d = self.data_dir
        lines = [
            "# generated by edgefed; edits are overwritten",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 0",
            f"log_dest file {d / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"persistence {'true' if self.persistence else 'false'}",
        ]
        if os.geteuid() == 0:
            # mosquitto drops root privileges to the 'mosquitto' user, who could not read the
            # generated files; a private loopback broker keeps the identity of its owner.
            lines.append(f"user {getpass.getuser()}")
        if self.persistence:
            lines += [f"persistence_location {d}/", "autosave_interval 1"]
        if self.users:
            pw = d / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            subprocess.run(
                [str(self._binary.with_name("mosquitto_passwd")), "-U", str(pw)]
                if self._binary.with_name("mosquitto_passwd").exists()
                else ["mosquitto_passwd", "-U", str(pw)],
                check=True,
                capture_output=True,
            )
            lines.append(f"password_file {pw}")
        elif self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.acl is not None:
            acl = d / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        if self.tls is not None:
            lines += [
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                "tls_version tlsv1.2",
            ]
            if self.tls.ca_file is not None:
                lines.append(f"cafile {self.tls.ca_file}")
            if self.tls.require_certificate:
                lines.append("require_certificate true")
            if self.tls.use_identity_as_username:
                lines.append("use_identity_as_username true")
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf
