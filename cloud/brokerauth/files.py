"""The broker's password and ACL files, rendered from the registry and re-read by the broker.

:class:`BrokerAuth` owns ``files_dir``: ``passwd`` and ``acl`` (what mosquitto reads) and
``credentials/<user>`` (the service users' passwords, mode 0600, made on first use, for the
controller itself and for whoever starts cloud workers). Each :meth:`BrokerAuth.sync` renders
both files from the agents the registry holds, replaces them atomically and sends SIGHUP to the
broker, which re-reads its password and ACL files on that signal (mosquitto 2.0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.brokerauth.acl import render_acl, render_passwords
from edgefed.cloud.brokerauth.passwords import hash_password, new_password
from edgefed.cloud.brokerauth.settings import MqttAuthSettings
from edgefed.cloud.registry.models import Agent
from edgefed.common.errors import ConfigError
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

PASSWORD_FILE = "passwd"  # noqa: S105 - a file name, not a password
ACL_FILE = "acl"
CREDENTIALS_DIR = "credentials"
_SYNC_LOCK = threading.Lock()


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only (a broker reading
    half a file would lock everyone out)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


class BrokerAuth:
    """Renders and reloads the broker's authentication for one fleet (thread-safe)."""

    def __init__(self, settings: MqttAuthSettings, fleet: str, default_dir: Path) -> None:
        self.settings = settings
        self.topics = Topics(fleet)
        self.dir = settings.files_dir or default_dir
        self._lock = threading.Lock()

    @property
    def password_file(self) -> Path:
        return self.dir / PASSWORD_FILE

    @property
    def acl_file(self) -> Path:
        return self.dir / ACL_FILE

    def service_password(self, user: str) -> SecretStr:
        """The password of a service user (controller, workers), made once and kept in
        ``credentials/<user>``."""
        path = self.dir / CREDENTIALS_DIR / user
        with self._lock:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _write_private(path, new_password() + "\n")
            return SecretStr(path.read_text().strip())

    def controller_credentials(self) -> tuple[str, SecretStr]:
        user = self.settings.controller_user
        return user, self.service_password(user)

    def worker_credentials(self) -> tuple[str, SecretStr]:
        user = self.settings.worker_user
        return user, self.service_password(user)

    def write(self, agents: Iterable[tuple[str, str]]) -> None:
        """Write both files for ``agents`` (agent id, ``$7$`` hash) plus the service users."""
        agents = list(agents)
        ids = {a for a, _ in agents}
        service = {self.settings.controller_user, self.settings.worker_user}
        clash = ids & service
        if clash:
            raise ConfigError(f"agent ids {sorted(clash)} clash with the broker's service users")
        users = [
            (user, hash_password(self.service_password(user).get_secret_value()))
            for user in sorted(service)
        ]
        passwd = render_passwords([*users, *agents])
        acl = render_acl(
            self.topics,
            ids,
            controller_user=self.settings.controller_user,
            worker_user=self.settings.worker_user,
        )
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(self.password_file, passwd)
            _write_private(self.acl_file, acl)
        log.info("broker password and ACL files written for %d agents in %s", len(ids), self.dir)

    def reload(self) -> bool:
        """SIGHUP the broker named by ``broker_pid_file`` (True when one was signalled)."""
        pid_file = self.settings.broker_pid_file
        if pid_file is None:
            return False
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            log.warning(
                "no broker pid in %s: the broker was not told to re-read its files", pid_file
            )
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
            return True
        log.warning("broker pid %d from %s is not running", pid, pid_file)
        return False


def sync_from_registry(auth: BrokerAuth, sessions: sessionmaker[Session]) -> None:
    """Render the files from the agents of ``auth``'s fleet that hold a password, then SIGHUP
    the broker. Serialised, so that two joins at once cannot write an older fleet last."""
    with _SYNC_LOCK:
        with sessions() as session:
            rows = session.execute(
                select(Agent.id, Agent.mqtt_password_hash)
                .where(Agent.fleet == auth.topics.fleet, Agent.mqtt_password_hash.is_not(None))
                .order_by(Agent.id)
            ).all()
        auth.write((agent_id, hashed) for agent_id, hashed in rows if hashed is not None)
        auth.reload()
