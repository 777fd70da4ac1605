"""Row 3: the agent's uplink is cut (30 s and 120 s in the bench, 8 s in the test).

The agent (a real ``edgefed edge run`` process) dials the cloud broker through a
:class:`~edgefed.simulation.linkproxy.LinkProxy`; cutting it resets the agent's connection and
refuses new ones, as a dead uplink would (the broker sees the drop and publishes the agent's
last will). A local application -- an MQTT client on the agent's local endpoint, the private
mosquitto the agent starts on the device -- sends requests throughout.

Must hold: every local request during the cut is answered by the agent's own model, and what
the agent produced for the cloud meanwhile (its ``requests.summary`` telemetry, which counts the
requests it served: the results) reaches the cloud after the link is back, none lost.

Figures: ``served_locally_pct`` (answered / sent during the cuts), ``delivered`` and
``produced`` (requests counted in the summaries that reached the cloud after the cut / requests
answered during it), ``telemetry_lost`` (gaps in the telemetry sequence) and
``telemetry_duplicated`` (QoS 1 redeliveries, counted once).
"""

from __future__ import annotations

import time
from pathlib import Path

from edgefed.common.broker import free_port
from edgefed.simulation.linkproxy import LinkProxy
from tests.faults.drills import DrillResult
from tests.faults.drills.edge_stage import EdgeStage, MqttSide, edge_stage, wait_until

ROW = 3
INJECT = "cut the agent's uplink to the cloud broker (link proxy) for 30 s and 120 s"
MUST_HOLD = "local requests served during the cut; queued telemetry and results delivered after"

FULL_CUTS_S = (30.0, 120.0)
TEST_CUTS_S = (8.0,)
PACE_S = 0.1
"""Pause between two local requests."""


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    cuts = FULL_CUTS_S if full else TEST_CUTS_S
    notes: list[str] = []
    sent = answered = produced = delivered = 0
    offline_seen = online_again = True
    with (
        edge_stage(workdir) as stage,
        MqttSide(stage.broker.url, stage.fleet, "row03-cloud") as cloud,
    ):
        proxy = LinkProxy("127.0.0.1", stage.broker.port)
        cloud.call(proxy.start())
        try:
            cloud.watch_telemetry()  # before the agent exists: every record is seen
            local_port = free_port()
            agent = stage.enrol(
                "agent", broker_url=f"mqtt://127.0.0.1:{proxy.port}", local_port=local_port
            )
            version = stage.release_and_deploy()
            local_url = f"mqtt://127.0.0.1:{local_port}"
            with MqttSide(local_url, stage.fleet, "row03-local-app") as app:
                app.serving(agent.agent_id)
                for cut_s in cuts:
                    _settle(cloud)
                    baseline = len(cloud.records)
                    cloud.call(_do(proxy.cut))
                    started = time.monotonic()
                    offline = False
                    ok = tries = 0
                    while time.monotonic() - started < cut_s:
                        got, outcome = app.infer(agent.agent_id, timeout=5)
                        tries += 1
                        if got == version:
                            ok += 1
                        elif len(notes) < 20:
                            notes.append(f"a local request during the cut got {outcome}")
                        offline = offline or stage.live(agent.agent_id).get("state") == ("offline")
                        time.sleep(PACE_S)
                    cloud.call(_do(proxy.restore))
                    restored = time.monotonic()
                    came, lost, dup = _delivered_after(cloud, agent.agent_id, baseline, ok)
                    back = _online(stage, agent.agent_id)
                    notes.append(
                        f"cut {cut_s:g} s: {ok}/{tries} local requests answered; "
                        f"{came}/{ok} served requests reported to the cloud "
                        f"{time.monotonic() - restored:.1f} s after the link came back; "
                        f"the controller saw the agent offline: {offline}, online again: "
                        f"{back}; telemetry lost {lost}, duplicated {dup}"
                    )
                    sent += tries
                    answered += ok
                    produced += ok
                    delivered += came
                    offline_seen = offline_seen and offline
                    online_again = online_again and back
            lost, duplicated = _sequence_figures(cloud, agent.agent_id)
            alive = agent.alive()
        finally:
            cloud.call(proxy.close())
    if not alive:
        notes.append("the agent process died")
    figures: dict[str, int | float | str | bool] = {
        "served_locally_pct": round(100.0 * answered / sent, 2) if sent else 0.0,
        "delivered": delivered,
        "produced": produced,
        "telemetry_lost": lost,
        "telemetry_duplicated": duplicated,
        "cut_s": "/".join(f"{c:g}" for c in cuts),
        "offline_seen": offline_seen,
        "online_again": online_again,
    }
    held = (
        sent > 0
        and answered == sent
        and delivered == produced
        and lost == 0
        and offline_seen
        and online_again
        and alive
    )
    return DrillResult(ROW, figures, held=held, notes=notes)


async def _do(action: object) -> None:
    """Run a synchronous method of the proxy on its event loop."""
    assert callable(action)
    action()


def _settle(cloud: MqttSide, quiet_s: float = 1.5, timeout_s: float = 30) -> None:
    """Wait until no telemetry arrived for ``quiet_s`` (summaries come while requests are
    served, so everything served before is reported by then)."""
    deadline = time.monotonic() + timeout_s
    count, since = len(cloud.records), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if len(cloud.records) != count:
            count, since = len(cloud.records), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def _summaries(cloud: MqttSide, agent_id: str, start: int) -> dict[int, int]:
    """Requests served per telemetry seq, in the summaries received from ``start`` on."""
    served: dict[int, int] = {}
    for agent, seq, record in list(cloud.records)[start:]:
        if agent == agent_id and record.name == "requests.summary":
            count = record.fields.get("served")
            served[seq] = int(count) if isinstance(count, int) else 0
    return served


def _delivered_after(
    cloud: MqttSide, agent_id: str, baseline: int, produced: int, timeout_s: float = 60
) -> tuple[int, int, int]:
    """Wait until the summaries received since ``baseline`` count ``produced`` requests (or
    ``timeout_s``): (requests counted, telemetry lost, duplicated) so far."""
    deadline = time.monotonic() + timeout_s
    while True:
        came = sum(_summaries(cloud, agent_id, baseline).values())
        if came >= produced or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lost, duplicated = _sequence_figures(cloud, agent_id)
    return came, lost, duplicated


def _sequence_figures(cloud: MqttSide, agent_id: str) -> tuple[int, int]:
    """(missing, duplicated) telemetry sequence numbers of ``agent_id`` (one process: its
    telemetry seq counts 1, 2, 3, ... from its start)."""
    seqs = [seq for agent, seq, _ in list(cloud.records) if agent == agent_id]
    if not seqs:
        return 0, 0
    unique = set(seqs)
    return max(unique) - len(unique), len(seqs) - len(unique)


def _online(stage: EdgeStage, agent_id: str) -> bool:
    try:
        wait_until(
            "the agent online again",
            lambda: stage.live(agent_id).get("state") == "online",
            30,
        )
    except AssertionError:
        return False
    return True
