"""Prometheus gauges of the fleet, read from the registry when scraped: agents by state,
deployments by status, jobs by status, rollbacks made. ``edgefed cloud serve`` registers a
:class:`RegistryCollector` on the API's metrics registry, so ``/metrics`` carries them beside
the HTTP figures.

Counting at scrape time (a few grouped ``COUNT`` queries) keeps the figures true after a
restart and across controller replicas, which counters kept in memory would not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.registry.models import (
    Agent,
    Deployment,
    DeploymentStatus,
    Job,
    JobStatus,
    RolloutEvent,
)

log = logging.getLogger(__name__)


class RegistryCollector(Collector):
    """Gauges computed from the registry on every scrape."""

    def __init__(self, sessions: sessionmaker[Session], fleet: str) -> None:
        self._sessions = sessions
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        agents = GaugeMetricFamily(
            "edgefed_agents", "Enrolled agents by their last known state", labels=["state"]
        )
        deployments = GaugeMetricFamily(
            "edgefed_deployments", "Deployments by status", labels=["status"]
        )
        jobs = GaugeMetricFamily("edgefed_jobs", "Compression jobs by status", labels=["status"])
        rollbacks = GaugeMetricFamily(
            "edgefed_rollbacks", "Rollout rollbacks recorded (versions made to roll back)"
        )
        try:
            with self._sessions() as session:
                by_state = dict(
                    session.execute(
                        select(Agent.state, func.count())
                        .where(Agent.fleet == self._fleet)
                        .group_by(Agent.state)
                    ).all()
                )
                by_status = dict(
                    session.execute(
                        select(Deployment.status, func.count()).group_by(Deployment.status)
                    ).all()
                )
                by_job = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                made = session.scalar(
                    select(func.count())
                    .select_from(RolloutEvent)
                    .where(RolloutEvent.kind == "rollback-version")
                )
        except SQLAlchemyError:
            log.warning("fleet metrics: the registry did not answer", exc_info=True)
            return
        for state in sorted({"online", "offline", "unknown", *map(str, by_state)}):
            agents.add_metric([state], float(by_state.get(state, 0)))
        for status in DeploymentStatus:
            deployments.add_metric([status.value], float(by_status.get(status, 0)))
        for job_status in JobStatus:
            jobs.add_metric([job_status.value], float(by_job.get(job_status, 0)))
        rollbacks.add_metric([], float(made or 0))
        yield agents
        yield deployments
        yield jobs
        yield rollbacks
