"""Settings of the MQTT credentials the controller issues (``[controller.mqtt_auth]``).

Off by default, so that a development broker (``edgefed broker``, the test suite, the demo)
stays open to anonymous loopback clients. With ``enabled = true``:

* every agent that joins gets its own broker user (its agent id) and a random password;
* the controller writes the broker's password file and ACL file into ``files_dir`` from its
  registry, and sends SIGHUP to the broker named by ``broker_pid_file`` so it re-reads them;
* the controller's embedded broker (no ``broker_url``) uses those files and refuses anonymous
  clients; an external broker must be configured with ``password_file`` and ``acl_file``
  pointing at them (and be sent SIGHUP when they change, if no pid file can be named).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from edgefed.common.topics import ID_PATTERN


class MqttAuthSettings(BaseModel):
    """Per-agent MQTT users and the broker ACL rendered by the controller."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Issue MQTT credentials at join and render the broker's password and ACL files."""
    files_dir: Path | None = None
    """Where ``passwd``, ``acl`` and ``credentials/<service user>`` are written;
    ``data_dir/broker`` (the embedded broker's folder) when unset."""
    broker_pid_file: Path | None = None
    """A file holding the broker's pid, sent SIGHUP after each rewrite; the embedded broker's
    own pid file when the controller runs it."""
    controller_user: str = Field(default="edgefed-controller", pattern=ID_PATTERN)
    """The controller's own broker user: the whole fleet's tree."""
    worker_user: str = Field(default="edgefed-worker", pattern=ID_PATTERN)
    """The cloud workers' user: their pools' requests, their load reports and replies."""
