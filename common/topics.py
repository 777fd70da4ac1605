"""The MQTT topic tree of edgefed (documented in the README for third-party clients).

Every topic lives under ``edgefed/v1/<fleet>/``::

    agents/<agent>/status      retained AgentStatus; the agent's last will sets it offline
    agents/<agent>/heartbeat   Heartbeat (QoS 0: a late heartbeat is worth nothing)
    agents/<agent>/telemetry   Telemetry (QoS 1: queued while the uplink is down)
    agents/<agent>/desired     retained DesiredState written by the controller
    agents/<agent>/commands    Command requests; the CommandAck goes to the response topic
    agents/<agent>/infer       InferenceRequest; the reply goes to the response topic
    agents/<agent>/sessions    SessionRequest (conversation sessions the agent holds); the
                               SessionReply goes to the response topic
    agents/<agent>/sessions-replica
                               SessionReplica: the agent's encrypted copy of each session it
                               holds, for the controller (QoS 1)
    workers/<pool>/infer       InferenceRequest for a pool of cloud workers, consumed through
                               the shared subscription $share/<pool>/<the topic above>
    workers/<pool>/load/<worker>
                               WorkerLoad every few seconds (QoS 0, not retained); an empty
                               message (the worker's last will, or its goodbye) says it is gone
    clients/<client>/replies   the response topic of each requester (replies, acks, errors)
    controller/status          retained status of the controller

Identifiers (fleet, agent, pool, client) are 1-64 characters of letters, digits, ``_ . -``
starting with a letter or digit, so they never contain MQTT wildcards or separators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefed.common.errors import ConfigError

ROOT = "edgefed"
PROTOCOL = "v1"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""What every identifier (fleet, agent, pool, client, model name) looks like: a topic segment."""
_ID = re.compile(ID_PATTERN)


def check_id(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid topic segment, else raise :class:`ConfigError`."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds the topics of one fleet. ``Topics("plant-3").agent_status("a1")``."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{PROTOCOL}/{self.fleet}"

    def _agent(self, agent_id: str, leaf: str) -> str:
        return f"{self.prefix}/agents/{check_id(agent_id, 'agent id')}/{leaf}"

    def agent_status(self, agent_id: str) -> str:
        return self._agent(agent_id, "status")

    def heartbeat(self, agent_id: str) -> str:
        return self._agent(agent_id, "heartbeat")

    def telemetry(self, agent_id: str) -> str:
        return self._agent(agent_id, "telemetry")

    def desired(self, agent_id: str) -> str:
        return self._agent(agent_id, "desired")

    def commands(self, agent_id: str) -> str:
        return self._agent(agent_id, "commands")

    def agent_infer(self, agent_id: str) -> str:
        return self._agent(agent_id, "infer")

    def agent_sessions(self, agent_id: str) -> str:
        return self._agent(agent_id, "sessions")

    def session_replica(self, agent_id: str) -> str:
        return self._agent(agent_id, "sessions-replica")

    def all_session_replicas(self) -> str:
        return f"{self.prefix}/agents/+/sessions-replica"

    def worker_infer(self, pool: str) -> str:
        return f"{self.prefix}/workers/{check_id(pool, 'worker pool')}/infer"

    def worker_infer_shared(self, pool: str) -> str:
        """Subscription filter that spreads a pool's requests over its workers."""
        return f"$share/{check_id(pool, 'worker pool')}/{self.worker_infer(pool)}"

    def worker_load(self, pool: str, worker_id: str) -> str:
        """Where one worker of ``pool`` reports its load (and its last will says it is gone)."""
        return (
            f"{self.prefix}/workers/{check_id(pool, 'worker pool')}/load/"
            f"{check_id(worker_id, 'worker id')}"
        )

    def all_worker_load(self, pool: str | None = None) -> str:
        """Filter over the load reports of every worker of ``pool`` (``None``: every pool)."""
        segment = "+" if pool is None else check_id(pool, "worker pool")
        return f"{self.prefix}/workers/{segment}/load/+"

    def worker_load_of(self, topic: str) -> tuple[str, str] | None:
        """(pool, worker id) of a ``workers/<pool>/load/<worker>`` topic of this fleet."""
        head = f"{self.prefix}/workers/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 3 or parts[1] != "load":
            return None
        pool, _, worker = parts
        return (pool, worker) if _ID.match(pool) and _ID.match(worker) else None

    def replies(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{check_id(client_id, 'client id')}/replies"

    def controller_status(self) -> str:
        return f"{self.prefix}/controller/status"

    # Filters over many agents (for the controller).
    def all_agent_status(self) -> str:
        return f"{self.prefix}/agents/+/status"

    def all_heartbeats(self) -> str:
        return f"{self.prefix}/agents/+/heartbeat"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/agents/+/telemetry"

    def agent_of(self, topic: str) -> str | None:
        """The agent id in an ``agents/<agent>/...`` topic of this fleet, else ``None``."""
        head = f"{self.prefix}/agents/"
        if not topic.startswith(head):
            return None
        agent, sep, _ = topic[len(head) :].partition("/")
        return agent if sep and _ID.match(agent) else None
