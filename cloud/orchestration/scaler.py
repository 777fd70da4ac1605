"""What the autoscaler resizes: a pool of cloud workers.

Two implementations: the Kubernetes one (:mod:`edgefed.cloud.orchestration.kube`) patches the
replicas of the pool's worker Deployment; the simulation harness starts and stops
``edgefed cloud worker`` processes. The autoscaler only sees this protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class WorkerScaler(Protocol):
    """Reads and sets the number of workers of a pool."""

    async def replicas(self, pool: str) -> int:
        """The number of workers the pool is asked to run now (its desired size)."""
        ...

    async def scale(self, pool: str, replicas: int) -> None:
        """Ask for ``replicas`` workers in ``pool``; returns once the request is accepted
        (workers may still be starting)."""
        ...
