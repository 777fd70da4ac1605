"""What the app's lifespan builds and the routes use, kept on ``app.state.controller``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.api.ratelimit import RateLimiter
from edgefed.cloud.brokerauth.files import BrokerAuth
from edgefed.cloud.settings import CloudSettings, ControllerSettings
from edgefed.common.artifact import SigningKey
from edgefed.common.sessions.crypto import FleetKey


@dataclass
class ControllerState:
    """The controller's resources for the lifetime of the app (built in its lifespan)."""

    settings: CloudSettings
    engine: Engine
    sessions: sessionmaker[Session]
    """Sessions for reading."""
    write_sessions: sessionmaker[Session]
    """Sessions for transactions that write (on SQLite they take the write lock at BEGIN)."""
    signing_key: SigningKey
    limiter: RateLimiter
    head_revision: str
    """The newest migration shipped; /readyz compares the database with it."""
    artifact_store: Path
    admin_token_file: Path

    @property
    def controller(self) -> ControllerSettings:
        return self.settings.controller

    @functools.cached_property
    def session_key(self) -> FleetKey | None:
        """The fleet's session key (``[controller.sessions]``; created on first use, mode
        0600); None when sessions are off."""
        ctl = self.settings.controller
        if not ctl.sessions.enabled:
            return None
        return FleetKey.load_or_create(ctl.resolved_session_key)

    @functools.cached_property
    def broker_auth(self) -> BrokerAuth | None:
        """The broker's password and ACL files (None: ``mqtt_auth`` is off)."""
        ctl = self.settings.controller
        if not ctl.mqtt_auth.enabled:
            return None
        return BrokerAuth(ctl.mqtt_auth, self.settings.fleet, ctl.data_dir / "broker")
