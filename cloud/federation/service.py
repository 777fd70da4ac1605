"""The controller's federation service: runs the rows of ``federation_runs`` on the SuperLink
and keeps them truthful.

* a queued run is submitted with ``flwr run`` (the generated app directory, its settings as a
  run-config file, ``out-dir = <data-dir>/federation/runs/<id>``) and becomes ``running`` with
  Flower's run id; a SuperLink that is down leaves it queued (tried again), a refusal by Flower
  fails it with Flower's words;
* while it runs, the ServerApp's ``progress.json`` is copied into the row (rounds, accepted and
  rejected updates with reasons, losses); the ServerApp's final status there decides the
  outcome, and Flower's own view of the run (``flwr list``, looked up now and then since each
  lookup starts a process) catches a ServerApp that died without saying so;
* a stop request stops the Flower run (``flwr stop``) and marks the row ``stopped``;
* on success the ``on_succeeded`` hook gets the row (in the transaction that marks it
  succeeded: ``sqlalchemy.orm.object_session(run)`` is that session) -- the closed loop
  (compression, canary rollout) hangs there; the default does nothing;
* after a controller restart, a run left ``running`` is failed with the reason: the ServerApp
  runs under the SuperLink, which stopped with the old controller (or, with a SuperLink this
  service does not own, when Flower no longer knows the run or says it ended).

Database work runs in threads, in write transactions on the engine behind ``sessions``; Flower
commands run outside transactions (they take seconds; SQLite has one writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.federation.closed_loop import DONE_STAGES, LoopSettings, advance
from edgefed.cloud.federation.flower_app import FlowerApp, RunConfigValue
from edgefed.cloud.federation.runs import RUN_CONFIG_FILE, FlowerRunner, read_progress
from edgefed.cloud.federation.superlink import (
    FlowerCommandError,
    SuperLinkSupervisor,
    SuperLinkUnavailable,
)
from edgefed.cloud.registry.db import make_sessionmaker
from edgefed.cloud.registry.models import FederationRun, FederationRunStatus
from edgefed.cloud.services import Kickable, kick

log = logging.getLogger(__name__)

OnSucceeded = Callable[[FederationRun], None]

FINISHED = frozenset(
    {FederationRunStatus.SUCCEEDED, FederationRunStatus.FAILED, FederationRunStatus.STOPPED}
)

RENAMED = {"rounds": "num-rounds", "min_nodes": "min-train-nodes"}
"""Spec keys whose run-config key is not just the spec key with dashes."""
NOT_RUN_CONFIG = frozenset({"model"})
"""Spec keys the ServerApp does not read."""


@dataclass(frozen=True)
class Promotion:
    """The closed loop's wiring: how runs are promoted, in which fleet, and whom to kick."""

    settings: LoopSettings
    fleet: str
    jobs: Kickable | None = None
    rollouts: Kickable | None = None


def no_promotion(run: FederationRun) -> None:
    """The default ``on_succeeded``: the run's model stays in its out-dir, nothing follows."""
    log.info("federated run %d succeeded; its model is in %s", run.id, run.spec.get("out_dir"))


def run_config(spec: Mapping[str, Any]) -> dict[str, RunConfigValue]:
    """The Flower run config (flat ``key-with-dashes = value``) of a run's spec: nested tables
    (training, validation, dp) are flattened, None values left out (the app's defaults)."""
    flat: dict[str, RunConfigValue] = {}

    def add(key: str, value: Any) -> None:
        if value is None or key in NOT_RUN_CONFIG:
            return
        if isinstance(value, Mapping):
            for inner, v in value.items():
                add(inner, v)
            return
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"run setting {key!r} is a {type(value).__name__}, not a value")
        flat[RENAMED.get(key, key.replace("_", "-"))] = value

    for key, value in spec.items():
        add(key, value)
    return flat


def _now() -> datetime:
    return datetime.now(UTC)


class FederationService:
    """The federation service of the controller (see the module's docstring).

    Run it as an asyncio task (``asyncio.create_task(service.run())``, cancelled to stop);
    :meth:`kick` may be called from any thread. Tests may call :meth:`recover` once and then
    :meth:`tick` themselves."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        runner: FlowerRunner,
        data_dir: Path,
        superlink: SuperLinkSupervisor | None = None,
        app: FlowerApp | None = None,
        on_succeeded: OnSucceeded = no_promotion,
        poll_s: float = 2.0,
        lookup_s: float = 20.0,
        promotion: Promotion | None = None,
    ) -> None:
        bind = sessions.kw.get("bind")
        self.sessions = (
            make_sessionmaker(bind, immediate=True) if isinstance(bind, Engine) else sessions
        )
        self.runner = runner
        self.superlink = superlink
        self.app = app or FlowerApp()
        self.on_succeeded = on_succeeded
        self.promotion = promotion
        self.poll_s = poll_s
        self.lookup_s = lookup_s
        self.root = data_dir / "federation"
        self._looked_up: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recovered = False
        self.ticks = 0

    def out_dir(self, run_id: int) -> Path:
        return self.root / "runs" / str(run_id)

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    def kick(self) -> None:
        """Look at the runs table now (thread-safe; before :meth:`run` it is a no-op)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Until cancelled: recover once, then start, watch and stop runs."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            await asyncio.to_thread(self.recover)
            while True:
                self._wake.clear()
                try:
                    await asyncio.to_thread(self.tick)
                except Exception:
                    log.exception("the federation service's tick failed; trying again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:
            self._loop = None
            self._recovered = False

    # ------------------------------------------------------------------ steps (sync)

    def recover(self) -> None:
        """Make runs left ``running`` by an earlier controller truthful again."""
        owned = self.superlink is not None
        with self.sessions.begin() as session:
            left = session.scalars(
                select(FederationRun).where(FederationRun.status == FederationRunStatus.RUNNING)
            ).all()
            for run in left:
                if owned:
                    self._finish(
                        run,
                        FederationRunStatus.FAILED,
                        f"the controller restarted while Flower run {run.flwr_run_id} was "
                        "running; its ServerApp stopped with the SuperLink",
                    )
                else:
                    self._looked_up[run.id] = 0.0  # ask Flower at the next tick
        self._recovered = True

    def tick(self) -> None:
        if not self._recovered:
            self.recover()
        self._start_queued()
        self._watch_running()
        if self.promotion is not None:
            self._advance_loops(self.promotion)
        self.ticks += 1

    def _start_queued(self) -> None:
        with self.sessions() as session:
            queued = session.scalars(
                select(FederationRun)
                .where(FederationRun.status == FederationRunStatus.QUEUED)
                .order_by(FederationRun.id)
            ).all()
            todo = [(r.id, dict(r.spec), r.stop_requested) for r in queued]
        for run_id, spec, stop_requested in todo:
            if stop_requested:
                self._update(run_id, FederationRunStatus.STOPPED, "stopped before it started")
                continue
            if self.superlink is not None and not self.superlink.running:
                log.info("federated run %d waits for the SuperLink", run_id)
                return
            out_dir = self.out_dir(run_id)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                config = run_config({**spec, "out_dir": str(out_dir)})
                unknown = sorted(set(config) - set(self.app.defaults))
                if unknown:
                    raise ValueError(
                        f"settings the Flower app does not declare: {', '.join(unknown)} "
                        "(Flower would refuse them as an invalid run configuration)"
                    )
                flwr_id = self.runner.start(
                    self.app.write(self.app_dir), config, out_dir / RUN_CONFIG_FILE
                )
            except SuperLinkUnavailable as exc:
                log.warning("federated run %d not started yet: %s", run_id, exc.message)
                return
            except (FlowerCommandError, ValueError, OSError) as exc:
                why = exc.message if isinstance(exc, FlowerCommandError) else str(exc)
                self._update(run_id, FederationRunStatus.FAILED, f"Flower refused the run: {why}")
                continue
            with self.sessions.begin() as session:
                run = session.get(FederationRun, run_id)
                if run is None:
                    continue
                run.flwr_run_id = str(flwr_id)
                run.status = FederationRunStatus.RUNNING
                run.started_at = _now()
                run.spec = {**run.spec, "out_dir": str(out_dir)}
            self._looked_up[run_id] = time.monotonic()
            log.info("federated run %d started as Flower run %d", run_id, flwr_id)

    def _watch_running(self) -> None:
        with self.sessions() as session:
            running = session.scalars(
                select(FederationRun).where(FederationRun.status == FederationRunStatus.RUNNING)
            ).all()
            todo = [(r.id, r.flwr_run_id, r.stop_requested) for r in running]
        for run_id, flwr_id, stop_requested in todo:
            try:
                self._watch(run_id, flwr_id, stop_requested)
            except SuperLinkUnavailable as exc:
                log.warning("federated run %d: %s (trying again)", run_id, exc.message)

    def _watch(self, run_id: int, flwr_id: str | None, stop_requested: bool) -> None:
        progress = read_progress(self.out_dir(run_id))
        if stop_requested:
            if flwr_id is not None:
                self.runner.stop(int(flwr_id))
            self._update(run_id, FederationRunStatus.STOPPED, "stopped on request", progress)
            return
        state = (progress or {}).get("status")
        if state == "succeeded":
            self._succeeded(run_id, progress or {})
            return
        if state == "failed":
            why = (progress or {}).get("error") or "the ServerApp reported a failure"
            self._update(run_id, FederationRunStatus.FAILED, str(why), progress)
            return
        if progress is not None:
            self._save_progress(run_id, progress)
        due = self._looked_up.get(run_id, 0.0) + self.lookup_s
        if flwr_id is None or time.monotonic() < due:
            return
        self._looked_up[run_id] = time.monotonic()
        flower = self.runner.lookup(int(flwr_id))
        if flower is not None and not flower.finished:
            return
        progress = read_progress(self.out_dir(run_id))  # it may have finished meanwhile
        if (progress or {}).get("status") in ("succeeded", "failed"):
            return  # the next tick records it
        if flower is None:
            why = f"the SuperLink does not know Flower run {flwr_id} (its database was replaced?)"
        else:
            why = (
                f"Flower run {flwr_id} ended ({flower.status}"
                + (f": {flower.details}" if flower.details else "")
                + ") without the ServerApp reporting an outcome"
            )
        self._update(run_id, FederationRunStatus.FAILED, why, progress)

    def _advance_loops(self, promotion: Promotion) -> None:
        """Move every succeeded run's closed loop one step (:mod:`.closed_loop`): gate,
        compression job, canary rollout; kick the job and rollout services when it moved."""
        with self.sessions() as session:
            pending = session.scalars(
                select(FederationRun.id).where(
                    FederationRun.status == FederationRunStatus.SUCCEEDED
                )
            ).all()
        for run_id in pending:
            with self.sessions.begin() as session:
                run = session.get(FederationRun, run_id)
                if run is None or (run.loop or {}).get("stage") in DONE_STAGES:
                    continue
                before = dict(run.loop or {})
                try:
                    after = advance(
                        session,
                        before,
                        model_name=run.model,
                        model_dir=Path((run.result or {}).get("model_dir") or ""),
                        progress=run.progress or {},
                        settings=promotion.settings,
                        fleet=promotion.fleet,
                        actor=f"federation:{run.id}",
                    )
                except Exception as exc:  # the loop must not stop the service
                    log.exception("federated run %d: the closed loop failed", run_id)
                    after = {
                        **before,
                        "stage": "failed",
                        "reason": f"the closed loop failed: {exc}",
                    }
                if after == before:
                    continue
                run.loop = after
            log.info("federated run %d: closed loop %s", run_id, after)
            kick(promotion.jobs, "job")
            kick(promotion.rollouts, "rollout")

    # ------------------------------------------------------------------ row updates

    def _save_progress(self, run_id: int, progress: dict[str, Any]) -> None:
        with self.sessions.begin() as session:
            run = session.get(FederationRun, run_id)
            if run is not None and run.progress != progress:
                run.progress = progress

    def _succeeded(self, run_id: int, progress: dict[str, Any]) -> None:
        with self.sessions.begin() as session:
            run = session.get(FederationRun, run_id)
            if run is None or run.status in FINISHED:
                return
            model_dir = progress.get("model_dir") or str(self.out_dir(run_id) / "model")
            run.progress = progress
            run.result = {
                "model_dir": model_dir,
                "rounds": len(progress.get("rounds") or []),
                "strategy": progress.get("strategy"),
            }
            self._finish(run, FederationRunStatus.SUCCEEDED, None)
            session.flush()
            try:
                self.on_succeeded(run)
            except Exception as exc:
                log.exception("federated run %d: the on_succeeded hook failed", run_id)
                run.loop = {"stage": "failed", "reason": f"the closed loop failed: {exc}"}
        log.info("federated run %d succeeded (model in %s)", run_id, model_dir)

    def _update(
        self,
        run_id: int,
        status: FederationRunStatus,
        why: str | None,
        progress: dict[str, Any] | None = None,
    ) -> None:
        with self.sessions.begin() as session:
            run = session.get(FederationRun, run_id)
            if run is None or run.status in FINISHED:
                return
            if progress is not None:
                run.progress = progress
            self._finish(run, status, why)
        self._looked_up.pop(run_id, None)
        log.log(
            logging.WARNING if status == FederationRunStatus.FAILED else logging.INFO,
            "federated run %d %s: %s",
            run_id,
            status.value,
            why,
        )

    @staticmethod
    def _finish(run: FederationRun, status: FederationRunStatus, why: str | None) -> None:
        run.status = status
        run.finished_at = _now()
        if why is not None:
            run.error = why
