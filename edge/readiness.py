"""When the agent is ready to serve, as its ``/readyz`` says (Kubernetes readiness probe).

Ready means the agent does what its controller asked of it: it is connected to the cloud broker,
it has subscribed to its desired state, and every model of the newest desired state it has seen
is served at the desired version (the reconciler swaps a model into the serving table only after
it was verified, loaded and warmed up, so "served" includes "warmed up"). Until then the probe
answers 503 with the reasons, so that a DaemonSet rollout waits for each node's models (a
TensorRT engine build on a Jetson takes minutes) and ``kubectl describe pod`` says what is
missing. :class:`~edgefed.common.probes.Readiness`, the probe's answer, is shared with the cloud
workers and re-exported here.

An agent whose controller has published no desired state for it is ready once connected and
subscribed: there is nothing more to wait for. A version the agent refused (a bad signature,
say) keeps it unready while the old version serves, until the controller rolls back: the pod's
state then shows which nodes lag behind a rollout.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefed.common.probes import Readiness

__all__ = ["Readiness", "assess"]


def assess(
    *,
    started: bool,
    connected: bool,
    subscribed: bool,
    desired: Mapping[str, int] | None,
    serving: Mapping[str, int],
    stopping: bool = False,
) -> Readiness:
    """Readiness from what the agent knows.

    ``started``: installed models restored and the local endpoint serving; ``connected``: the
    cloud MQTT link is up; ``subscribed``: the desired-state subscription was acknowledged;
    ``desired``: the newest desired state's models (name -> version), None before one arrived;
    ``serving``: what the serving table holds (name -> version); ``stopping``: shutting down.
    """
    if stopping:
        return Readiness.not_ready("stopping")
    if not started:
        return Readiness.not_ready("starting: restoring the installed models")
    reasons: list[str] = []
    if not connected:
        reasons.append("not connected to the cloud broker")
    elif not subscribed:
        reasons.append("not yet subscribed to the desired state")
    for name, version in sorted((desired or {}).items()):
        have = serving.get(name)
        if have is None:
            reasons.append(f"model {name}: v{version} desired, not loaded yet")
        elif have != version:
            reasons.append(f"model {name}: v{version} desired, v{have} serving")
    return Readiness(ready=not reasons, reasons=tuple(reasons))
