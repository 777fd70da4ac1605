"""Row 6: nobody gets into the broker, and agents stay in their lane.

The controller runs with ``[controller.mqtt_auth] enabled``: it starts its own mosquitto on the
password and ACL files it renders from its registry, and every agent joining through the API
gets its own broker user. Two (full: three) agents join and run as processes; then agent A's
identity (its real user name and password, from its ``agent.json``) and strangers try:

* connections: no credentials, a wrong password, another agent's password, an unknown user; on
  a second, mutual-TLS listener (the same generated files) A's valid password with a client
  certificate from another CA, and with none;
* publishes at QoS 1 (and one at QoS 0, and one retained) on each victim's desired state,
  status, heartbeats, telemetry, requests and commands;
* subscriptions to ``#``, ``edgefed/#``, the fleet's tree, each victim's subtree and topics,
  every agent's status, and ``$SYS/#``.

An attempt counts as accepted when the broker lets it through: a connection that opens, a
publish that a spy with the controller's rights receives, a subscription that delivers one
message A may not read. mosquitto 2.0.11's ``acl_file`` answers such a SUBACK with "granted"
and checks read access per message (it never sends 0x87 for a subscribe), so delivery, not
the SUBACK, is what is judged; the SUBACK codes are in the notes. Controls that must succeed
(A's own credentials on both listeners, the agents' own traffic) keep the drill honest.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from edgefed.common.broker import BrokerTls, PrivateBroker
from edgefed.common.errors import BrokerAuthError, EdgefedError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.topics import Topics
from tests.certs import TestCa

from . import DrillResult
from .secured_fleet import CONTROLLER_USER, FLEET, SecuredFleet, Spy, mqtt_client, secured_fleet

ROW = 6
INJECT = (
    "MQTT: no credentials, wrong password, a certificate from another CA; agent A publishing on "
    "agent B's topics or subscribing to #"
)
MUST_HOLD = "all refused by the broker ACLs the controller generates per agent"

FLUSH_POOL = "row6-flush"
"""A pool nobody serves: agents may write its request topic, so A's publishes end with one there
and the spy, once it has it, has had every earlier publish of A."""


@dataclass(frozen=True)
class Attempt:
    kind: str
    what: str
    accepted: bool
    detail: str


async def _connects(
    url: str, client_id: str, user: str | None, password: str | None, **tls: Path
) -> tuple[bool, str]:
    try:
        async with mqtt_client(url, client_id, user, password, **tls):
            return True, "connected"
    except EdgefedError as exc:
        return False, f"{type(exc).__name__}: {exc}"


async def _connection_attempts(
    fleet: SecuredFleet, a: str, a_pw: str, b_pw: str, tls_url: str, certs: dict[str, Path]
) -> list[Attempt]:
    url = fleet.broker_url
    cases: list[tuple[str, str, Callable[[], Awaitable[tuple[bool, str]]]]] = [
        ("connect", "no credentials", lambda: _connects(url, "row6-anon", None, None)),
        (
            "connect",
            f"{a} with a wrong password",
            lambda: _connects(url, "row6-wrong", a, "wrong-" + uuid.uuid4().hex),
        ),
        (
            "connect",
            f"{a} with another agent's password",
            lambda: _connects(url, "row6-other", a, b_pw),
        ),
        ("connect", "an unknown user", lambda: _connects(url, "row6-unknown", "mallory", a_pw)),
        (
            "connect",
            f"TLS: {a}'s password, client certificate from another CA",
            lambda: _connects(
                tls_url,
                "row6-rogue-ca",
                a,
                a_pw,
                ca_file=certs["ca"],
                cert_file=certs["rogue_cert"],
                key_file=certs["rogue_key"],
            ),
        ),
        (
            "connect",
            f"TLS: {a}'s password, no client certificate",
            lambda: _connects(tls_url, "row6-no-cert", a, a_pw, ca_file=certs["ca"]),
        ),
    ]
    out = []
    for kind, what, attempt in cases:
        accepted, detail = await attempt()
        out.append(Attempt(kind, what, accepted, detail))
    return out


async def _controls(
    fleet: SecuredFleet, a: str, a_pw: str, tls_url: str, certs: dict[str, Path]
) -> list[str]:
    """What must work; the failures (empty: all worked)."""
    failures = []
    ok, detail = await _connects(fleet.broker_url, "row6-control", a, a_pw)
    if not ok:
        failures.append(f"{a}'s own credentials refused: {detail}")
    ok, detail = await _connects(
        tls_url,
        "row6-control-tls",
        a,
        a_pw,
        ca_file=certs["ca"],
        cert_file=certs["cert"],
        key_file=certs["key"],
    )
    if not ok:
        failures.append(f"{a}'s own credentials with the fleet CA's certificate refused: {detail}")
    return failures


def _victim_topics(topics: Topics, victim: str) -> list[str]:
    return [
        topics.desired(victim),
        topics.agent_status(victim),
        topics.heartbeat(victim),
        topics.telemetry(victim),
        topics.agent_infer(victim),
        topics.commands(victim),
    ]


async def _publish_attempts(
    attacker: MqttClient, spy: Spy, topics: Topics, victims: list[str]
) -> list[Attempt]:
    planned: list[tuple[str, bytes, int, bool]] = []
    for victim in victims:
        for topic in _victim_topics(topics, victim):
            planned.append((topic, f"row6-{uuid.uuid4().hex}".encode(), 1, False))
        planned.append((topics.agent_status(victim), f"row6-{uuid.uuid4().hex}".encode(), 0, False))
        planned.append((topics.desired(victim), f"row6-{uuid.uuid4().hex}".encode(), 1, True))
    acks: list[str] = []
    for topic, payload, qos, retain in planned:
        try:
            await attacker.publish(topic, payload, qos=qos, retain=retain)
            acks.append("acknowledged" if qos else "sent (QoS 0: no ack)")
        except BrokerAuthError as exc:
            acks.append(f"refused: {exc}")
    flush = f"row6-flush-{uuid.uuid4().hex}".encode()
    await attacker.publish(topics.worker_infer(FLUSH_POOL), flush, qos=1)
    await spy.wait_for(topics.worker_infer(FLUSH_POOL), flush)
    out = []
    for (topic, payload, qos, retain), ack in zip(planned, acks, strict=True):
        delivered = spy.saw(topic, payload)
        what = f"publish {'retained ' if retain else ''}QoS {qos} on {topic}"
        accepted = delivered or ack == "acknowledged"
        detail = f"{ack}; {'DELIVERED to the spy' if delivered else 'not delivered'}"
        out.append(Attempt("publish", what, accepted, detail))
    return out


def _readable_by(topics: Topics, agent_id: str) -> set[str]:
    """What the ACL lets an agent read (its own inbound topics)."""
    return {
        topics.desired(agent_id),
        topics.agent_infer(agent_id),
        topics.commands(agent_id),
        topics.replies(agent_id),
    }


async def _subscribe_attempts(
    attacker: MqttClient,
    a: str,
    spy: Spy,
    controller: MqttClient,
    topics: Topics,
    victims: list[str],
) -> list[Attempt]:
    filters = ["#", "edgefed/#", f"{topics.prefix}/#", f"{topics.prefix}/agents/+/status", "$SYS/#"]
    for victim in victims:
        filters += [
            f"{topics.prefix}/agents/{victim}/#",
            topics.desired(victim),
            topics.agent_status(victim),
            topics.agent_infer(victim),
            topics.replies(victim),
        ]
    allowed = _readable_by(topics, a)
    received: dict[str, list[str]] = {f: [] for f in filters}
    subacks: dict[str, str] = {}
    # A's own replies topic ends the stream: once A has it, it has had everything before. The
    # client hands a message matching several filters to one handler: every handler watches.
    flush = f"row6-flush-{uuid.uuid4().hex}".encode()
    flushed = asyncio.Event()

    def recorder(f: str) -> Callable[[Message], Awaitable[None]]:
        async def on_message(message: Message) -> None:
            if message.payload == flush:
                flushed.set()
            if message.topic not in allowed:
                received.setdefault(f, []).append(message.topic)

        return on_message

    for f in filters:
        try:
            await attacker.subscribe(f, recorder(f))
            subacks[f] = "granted"
        except BrokerAuthError as exc:
            subacks[f] = f"refused: {exc}"
    # Fresh traffic on each victim's topics: the controller's probes (not retained, on topics
    # the agents ignore) and the victims' own heartbeats; retained statuses came at subscribe.
    since = len(spy.seen)
    for victim in victims:
        await controller.publish(topics.commands(victim), b"row6-probe", qos=1)
        await controller.publish(topics.replies(victim), b"row6-probe", qos=1)
        await spy.wait_for(topics.heartbeat(victim), since=since)
    await attacker.subscribe(topics.replies(a), recorder(topics.replies(a)))
    await controller.publish(topics.replies(a), flush, qos=1)
    async with asyncio.timeout(20):
        await flushed.wait()
    out = []
    for f in filters:
        got = received[f]
        detail = f"SUBACK {subacks[f]}; {len(got)} unauthorised messages delivered"
        if got:
            detail += f" (e.g. {sorted(set(got))[:3]})"
        out.append(Attempt("subscribe", f"subscribe {f}", bool(got), detail))
    return out


def _certs(root: Path) -> dict[str, Path]:
    fleet_ca = TestCa.create(root / "fleet-ca", "fleet-ca")
    rogue_ca = TestCa.create(root / "rogue-ca", "rogue-ca")
    server = fleet_ca.issue("broker", server=True)
    good = fleet_ca.issue("agent", server=False)
    rogue = rogue_ca.issue("agent", server=False)
    return {
        "ca": fleet_ca.cert_file,
        "server_cert": server.cert_file,
        "server_key": server.key_file,
        "cert": good.cert_file,
        "key": good.key_file,
        "rogue_cert": rogue.cert_file,
        "rogue_key": rogue.key_file,
    }


async def _online(spy: Spy, topics: Topics, agent_ids: list[str], timeout: float = 30) -> list[str]:
    """Agents whose own heartbeats reached the broker within ``timeout`` (they connect with the
    credentials they got at join): the ones that did not."""
    since = len(spy.seen)
    try:
        for a in agent_ids:
            await spy.wait_for(topics.heartbeat(a), since=since, timeout=timeout)
    except TimeoutError:
        pass
    return [a for a in agent_ids if not spy.saw(topics.heartbeat(a), since=since)]


async def _drill(fleet: SecuredFleet, root: Path) -> tuple[list[Attempt], list[str], list[str]]:
    topics = Topics(FLEET)
    agents = fleet.agents
    a, victims = agents[0], [v.agent_id for v in agents[1:]]
    certs = _certs(root / "certs")
    controller_pw = fleet.controller_password
    spy = Spy()
    notes: list[str] = []
    with PrivateBroker(
        data_dir=root / "tls-broker",
        tls=BrokerTls(
            certs["server_cert"], certs["server_key"], certs["ca"], require_certificate=True
        ),
        password_file=fleet.broker_dir / "passwd",
        acl_file=fleet.broker_dir / "acl",
    ) as tls_broker:
        async with mqtt_client(
            fleet.broker_url, "row6-spy", CONTROLLER_USER, controller_pw
        ) as controller:
            await controller.subscribe(f"{topics.prefix}/#", spy.on_message)
            missing = await _online(spy, topics, [x.agent_id for x in agents])
            failures = [f"agent {m} never got through with its issued credentials" for m in missing]
            if missing:  # the attacks need the victims' traffic: nothing to judge them by
                return [], failures, notes
            failures += await _controls(fleet, a.agent_id, a.password, tls_broker.url, certs)
            attempts = await _connection_attempts(
                fleet, a.agent_id, a.password, agents[1].password, tls_broker.url, certs
            )
            async with mqtt_client(
                fleet.broker_url, f"{a.agent_id}-intruder", a.agent_id, a.password
            ) as attacker:
                attempts += await _publish_attempts(attacker, spy, topics, victims)
                attempts += await _subscribe_attempts(
                    attacker, a.agent_id, spy, controller, topics, victims
                )
            missing = await _online(spy, topics, [x.agent_id for x in agents], timeout=10)
            failures += [f"agent {m} stopped reaching the broker" for m in missing]
    return attempts, failures, notes


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    """Join 2 agents (full: 3), then try every attempt as agent A against the others."""
    n_agents = 3 if full else 2
    with secured_fleet(workdir / "fleet") as fleet:
        fleet.enrol(n_agents)
        attempts, failures, notes = asyncio.run(_drill(fleet, workdir))
    accepted = [x for x in attempts if x.accepted]
    k = len(attempts)
    notes += [
        f"{x.kind}: {x.what}: {'ACCEPTED' if x.accepted else 'refused'} ({x.detail})"
        for x in attempts
    ]
    notes += [f"control failed: {f}" for f in failures]
    notes.insert(
        0,
        f"{n_agents} agents joined through the API, each with its own broker user; agent A "
        "attacks the others; mosquitto 2.0.11 on the password and ACL files of the controller",
    )
    return DrillResult(
        row=ROW,
        figures={
            "unauthorised_accepted": f"{len(accepted)}/{k}",
            "accepted": len(accepted),
            "attempts": k,
            "legit_refused": len(failures),
        },
        held=not accepted and not failures,
        notes=notes,
    )
