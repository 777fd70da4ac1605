"""Desired-state reconciliation: make the models the agent serves match what the controller
asks for, without ever leaving the agent with nothing (or something unverified) to serve.

For each model of a :class:`~edgefed.common.schemas.DesiredState` the :class:`Reconciler`
downloads the artifact into the store's staging folder, verifies it (signature, hashes, version
never lower than the one installed), installs it, loads it, warms it up, swaps it into the
serving table in one step and only then records it as the current version -- so a failure at
any step leaves the old model serving, and a crash at any step leaves the store pointing at a
sound version. Every step is reported as a :class:`ModelEvent`.

Decisions (see also :meth:`Reconciler.apply`):

* **Replay protection.** A desired state whose generation is not higher than the one applied
  changes nothing and is reported ``rejected``. The one exception is the retained message
  delivered again after a reconnect or a restart -- the *same* generation with the *same*
  content (compared by digest) -- which is accepted quietly and only fills in what is missing
  (a model whose restore failed, a download that failed for a temporary reason).
* **Generation recording.** The generation is recorded once every model of it was handled,
  failed ones included: a rejected or broken artifact is not fetched again and again each time
  the retained state is delivered. Temporary failures (network, disk) keep their partial
  download; :meth:`Reconciler.retry` (the agent calls it with backoff while
  :attr:`Reconciler.needs_retry`) and the redelivery of the same state resume them.
* **Serialisation and coalescing.** Calls are serialised by a lock; states arriving while one is
  being applied wait, and only the newest of them is applied (the ones in between are
  superseded, never half-applied).
* **Placements.** The desired state's ``placements`` (where local applications' requests for
  each model run) are recorded in the :class:`~edgefed.edge.placements.PlacementBook` once the
  models of the state were handled -- so a split placement finds its head loaded when there is
  one -- and take effect at once, without a restart; they are kept on disk for the next start.
  They are part of the state's digest: the same generation with other placements is a replay.
* **Versions only go up.** A version below the highest ever activated is refused before any
  network access. The highest one itself may be fetched again when it is not the current one
  (its copy on disk was found tampered with, or it was rolled back).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from edgefed.common.artifact import Manifest, VerifyKey, verify
from edgefed.common.errors import ArtifactRejected, EdgefedError, RejectReason
from edgefed.common.schemas import DesiredModel, DesiredState
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.errors import FetchError
from edgefed.edge.fetch import ProgressCallback
from edgefed.edge.placements import PlacementBook
from edgefed.edge.store import InstalledModel, ModelStore, StoreError

log = logging.getLogger(__name__)

Step = Literal[
    "downloading",
    "verifying",
    "loading",
    "warming",
    "loaded",
    "failed",
    "rejected",
    "unloaded",
    "restored",
]


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """One step of deploying a model, for status reports and telemetry."""

    model: str
    version: int | None
    step: Step
    detail: str = ""
    reason: RejectReason | None = None
    """Why an artifact was rejected (set with step ``rejected`` when a check named one)."""
    bytes_done: int | None = None
    """Download progress (step ``downloading``)."""
    bytes_total: int | None = None
    temporary: bool = False
    """A failure a retry may mend (network, disk): the agent tries again by itself, so the
    controller should wait for it rather than count the version as broken."""


class ServableModel(Protocol):
    """What the reconciler needs of a loaded model (``common.serving.runtime.OnnxModel``)."""

    def warm_up(self) -> object:
        """Run a few inferences so the first request is not slow; raise when the model fails.
        May return an awaitable (then it is awaited)."""
        ...


M = TypeVar("M", bound=ServableModel)


class ModelTableLike(Protocol[M]):
    """The serving table (``edgefed.common.serving.service.ModelTable``): models by name."""

    def swap(self, model: M) -> M | None:
        """Serve ``model`` under its name from now on; return the one it replaced."""
        ...

    def remove(self, name: str) -> object:
        """Stop serving ``name``."""
        ...

    def names(self) -> Iterable[str]:
        """Names of the models served."""
        ...


class Fetch(Protocol):
    """:func:`edgefed.edge.fetch.fetch_artifact` with client, token, keys and limits bound
    (:class:`edgefed.edge.fetch.ArtifactFetcher`)."""

    def __call__(
        self,
        url: str,
        dest: Path,
        *,
        min_version: int,
        expected_manifest_sha256: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Awaitable[Manifest]: ...


class _Refused(Exception):
    """A step failed; carries the event to report and whether a retry may help."""

    def __init__(self, event: ModelEvent, *, temporary: bool) -> None:
        super().__init__(event.detail)
        self.event = event
        self.temporary = temporary


class Reconciler(Generic[M]):
    """Applies desired states to the store and the serving table.

    ``loader(artifact_dir, manifest, desired)`` builds a model from a verified folder (it runs
    in a worker thread, as does ``warm_up``); ``configure(desired)``, when given, applies new
    batching settings to a model already served at the desired version; ``report`` receives
    every :class:`ModelEvent` (its failures are logged, never raised). ``trusted_keys`` and
    ``limits`` re-verify installed models at :meth:`restore`. ``placements``, when given,
    receives each applied state's placements.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        table: ModelTableLike[M],
        loader: Callable[[Path, Manifest, DesiredModel], M],
        fetch: Fetch,
        report: Callable[[ModelEvent], None],
        trusted_keys: Sequence[VerifyKey],
        limits: ArtifactSettings | None = None,
        configure: Callable[[DesiredModel], None] | None = None,
        placements: PlacementBook | None = None,
    ) -> None:
        self._store = store
        self._placements = placements
        self._table = table
        self._loader = loader
        self._fetch = fetch
        self._report = report
        self._keys = list(trusted_keys)
        self._limits = limits if limits is not None else ArtifactSettings()
        self._configure = configure
        self._lock = asyncio.Lock()
        self._pending: DesiredState | None = None
        self._newest = store.generation
        """The newest generation accepted: applied, being applied or waiting."""
        self._applying: int | None = None
        self._serving: dict[str, int] = {}
        self._refused: set[tuple[str, int, str]] = set()
        self._last: DesiredState | None = None
        self._needs_retry = False

    # ------------------------------------------------------------------ public API

    @property
    def serving(self) -> dict[str, int]:
        """Versions this reconciler put into the table, by model name."""
        return dict(self._serving)

    @property
    def needs_retry(self) -> bool:
        """True when a model of the last state failed for a reason a retry may fix."""
        return self._needs_retry

    async def apply(self, desired: DesiredState) -> None:
        """Reconcile to ``desired`` (see the module docstring for replay protection, coalescing
        and when the generation is recorded). Never raises for a model that fails: that is
        reported and the old version keeps serving."""
        digest = _digest(desired)
        applied = self._store.generation
        if (
            desired.generation == applied
            and digest == self._store.generation_digest
            and self._newest == applied
        ):
            log.debug("desired state generation %d delivered again", desired.generation)
            async with self._lock:
                if self._pending is None and self._store.generation == desired.generation:
                    await self._reconcile(desired, retrying=True)
            return
        newest = max(applied, self._newest)
        if desired.generation <= newest:
            self._reject_state(desired, newest)
            return
        self._newest = desired.generation
        self._pending = desired
        try:
            async with self._lock:
                state = self._take_pending()
                if state is None:
                    log.debug("generation %d was superseded and applied", desired.generation)
                    return
                if state.generation != desired.generation:
                    log.info(
                        "desired state generation %d superseded by %d",
                        desired.generation,
                        state.generation,
                    )
                self._applying = state.generation
                try:
                    await self._reconcile(state, retrying=False)
                finally:
                    self._applying = None
        except asyncio.CancelledError:
            # not recorded, so the same generation may be applied again later
            if self._pending is desired:
                self._pending = None
            pending = self._pending.generation if self._pending is not None else 0
            self._newest = max(self._store.generation, self._applying or 0, pending)
            raise

    def _take_pending(self) -> DesiredState | None:
        state, self._pending = self._pending, None
        return state

    async def retry(self) -> None:
        """Try again the models of the last applied state that failed for a temporary reason
        (or are otherwise missing); models refused for a permanent reason are left alone."""
        async with self._lock:
            state = self._last
            if state is None or self._pending is not None:
                return
            if state.generation != self._store.generation:
                return
            await self._reconcile(state, retrying=True)

    async def restore(self) -> None:
        """At agent start, before any network: re-verify every installed model on disk, load
        it, warm it up and serve it. A current version that fails verification is reported
        ``rejected`` and dropped; the previous version is served instead when it verifies."""
        async with self._lock:
            for record in self._store.installed():
                if not record.enabled:
                    log.info("%s is installed but not wanted: not restored", record.name)
                    continue
                try:
                    await self._restore_one(record)
                except Exception as exc:  # never stop the agent from starting
                    log.exception("restoring %s failed", record.name)
                    if record.settings is not None:
                        self._emit(self._failure(record.settings, exc).event)

    async def rollback(self, name: str) -> int:
        """Serve the previous version of ``name`` again (verified, loaded and warmed first) and
        make it current; the version rolled back from is deleted. Returns the version now
        served. Raises :class:`~edgefed.edge.store.StoreError` without a previous version, or
        the error that kept the previous version from loading (the current one keeps serving).
        """
        async with self._lock:
            record = self._store.get(name)
            if record is None or record.previous is None or record.previous_settings is None:
                raise StoreError(f"{name} has no previous version to roll back to")
            previous, settings = record.previous, record.previous_settings
            try:
                await self._serve_from_disk(settings, previous)
            except _Refused as exc:
                self._emit(exc.event)
                raise
            await asyncio.to_thread(self._store.rollback, name)
            self._emit(
                ModelEvent(
                    name,
                    previous,
                    "restored",
                    f"rolled back from v{record.current} to v{previous}",
                )
            )
            return previous

    # ------------------------------------------------------------------ reconciliation

    def _reject_state(self, desired: DesiredState, newest: int) -> None:
        detail = (
            f"desired state generation {desired.generation} is not newer than generation "
            f"{newest}: ignored (replay protection)"
        )
        log.warning("%s", detail)
        for entry in desired.models:
            self._emit(ModelEvent(entry.name, entry.version, "rejected", detail))

    async def _reconcile(self, state: DesiredState, *, retrying: bool) -> None:
        temporary = False
        wanted: set[str] = set()
        for entry in state.models:
            if entry.name in wanted:
                self._emit(
                    ModelEvent(
                        entry.name,
                        entry.version,
                        "rejected",
                        f"{entry.name} is listed twice in generation {state.generation}; "
                        "the first entry is used",
                    )
                )
                continue
            wanted.add(entry.name)
            key = (entry.name, entry.version, entry.manifest_sha256)
            if retrying and key in self._refused:
                continue
            try:
                await self._handle(entry)
            except _Refused as exc:
                self._emit(exc.event)
                if exc.temporary:
                    temporary = True
                else:
                    self._refused.add(key)
            except Exception as exc:  # a bug or the disk: report it, go on with the others
                log.exception("reconciling %s v%d failed", entry.name, entry.version)
                refusal = self._failure(entry, exc)
                self._emit(refusal.event)
                temporary = temporary or refusal.temporary
        await self._unload_unwanted(wanted)
        if self._placements is not None:
            await self._placements.apply(state.generation, state.placements)
        self._needs_retry = temporary
        self._last = state
        if not retrying:
            await asyncio.to_thread(
                self._store.record_generation, state.generation, digest=_digest(state)
            )
            log.info("desired state generation %d applied", state.generation)

    async def _unload_unwanted(self, wanted: set[str]) -> None:
        known = set(self._table.names()) | set(self._serving)
        known |= {m.name for m in self._store.installed() if m.enabled}
        for name in sorted(known - wanted):
            version = self._serving.pop(name, None)
            if name in set(self._table.names()):
                self._table.remove(name)
                self._emit(
                    ModelEvent(name, version, "unloaded", "not in the desired state; files kept")
                )
            try:
                await asyncio.to_thread(self._store.set_enabled, name, False)
            except OSError as exc:
                log.error("cannot record that %s is not wanted: %s", name, exc)

    async def _handle(self, desired: DesiredModel) -> None:
        name, version = desired.name, desired.version
        record = self._store.get(name)
        if record is not None and record.current == version:
            installed_sha = record.settings.manifest_sha256 if record.settings else None
            if installed_sha != desired.manifest_sha256:
                raise self._refusal(
                    desired,
                    "rejected",
                    f"v{version} is installed with manifest sha256 {installed_sha}, the desired "
                    f"state names {desired.manifest_sha256}: a different artifact needs a new "
                    "version",
                    reason=RejectReason.VERSION_TOO_LOW,
                )
            if self._serving.get(name) == version and name in set(self._table.names()):
                await self._update_in_place(record, desired)
                return
            try:
                await self._serve_from_disk(desired, version)
            except _Refused as exc:
                if exc.event.step != "rejected":
                    raise
                # the installed copy is bad: drop it and fetch the same version again below
                self._emit(exc.event)
                await asyncio.to_thread(self._store.drop, name, version)
            else:
                await asyncio.to_thread(self._store.set_enabled, name, True)
                await asyncio.to_thread(self._store.update_settings, desired)
                self._emit(ModelEvent(name, version, "loaded", "loaded from the installed copy"))
                return
        highest = self._store.highest(name)
        if version < highest:
            served = self._serving.get(name)
            raise self._refusal(
                desired,
                "rejected",
                f"v{version} is lower than v{highest}, already installed; versions only go up"
                + (f" (v{served} keeps serving)" if served is not None else ""),
                reason=RejectReason.VERSION_TOO_LOW,
            )
        await self._deploy(desired)

    async def _update_in_place(self, record: InstalledModel, desired: DesiredModel) -> None:
        before = record.settings
        if before is not None and (
            before.providers != desired.providers
            or before.role != desired.role
            or before.split_point != desired.split_point
        ):
            await self._serve_from_disk(desired, desired.version)
            await asyncio.to_thread(self._store.update_settings, desired)
            self._emit(
                ModelEvent(desired.name, desired.version, "loaded", "reloaded with new settings")
            )
            return
        if before != desired:
            if self._configure is not None:
                try:
                    self._configure(desired)
                except Exception as exc:  # the old settings stay in force
                    raise self._failure(desired, exc, what="new batching settings") from exc
            await asyncio.to_thread(self._store.update_settings, desired)
            log.info(
                "%s v%d: batching now %d requests / %.1f ms",
                desired.name,
                desired.version,
                desired.max_batch_size,
                desired.max_batch_wait_ms,
            )

    async def _deploy(self, desired: DesiredModel) -> None:
        name, version = desired.name, desired.version
        staging = await asyncio.to_thread(self._store.staging_dir, name, version)
        self._emit(ModelEvent(name, version, "downloading", desired.artifact_url))
        try:
            manifest = await self._fetch(
                desired.artifact_url,
                staging,
                min_version=version,
                expected_manifest_sha256=desired.manifest_sha256,
                on_progress=self._progress(name, version),
            )
            _check_matches(manifest, desired)
            path = await asyncio.to_thread(self._store.install, staging, manifest, desired)
        except FetchError as exc:  # network: keep the partial download to resume it
            raise self._refusal(desired, "failed", exc.message, temporary=True) from exc
        except Exception as exc:  # every failure must leave the old model serving
            await asyncio.to_thread(self._store.clear_staging, name, version)
            raise self._failure(desired, exc) from exc
        try:
            model = await self._load_and_warm(path, manifest, desired)
        except _Refused:
            await asyncio.to_thread(self._store.discard, name, version)
            raise
        old_version = self._serving.get(name)
        previous = self._table.swap(model)
        self._serving[name] = version
        try:
            await asyncio.to_thread(self._store.activate, name, version)
        except Exception as exc:  # put the old model back, whatever went wrong
            if previous is not None:
                self._table.swap(previous)
                if old_version is not None:
                    self._serving[name] = old_version
            else:
                self._table.remove(name)
                self._serving.pop(name, None)
            await asyncio.to_thread(self._store.discard, name, version)
            raise self._failure(desired, exc) from exc
        kept = self._store.get(name)
        rollback = kept.previous if kept is not None else None
        self._emit(
            ModelEvent(
                name,
                version,
                "loaded",
                f"serving v{version}"
                + (f"; v{rollback} kept for rollback" if rollback is not None else ""),
            )
        )

    # ------------------------------------------------------------------ restore

    async def _restore_one(self, record: InstalledModel) -> None:
        name, current, settings = record.name, record.current, record.settings
        if current is None or settings is None:
            return
        try:
            await self._serve_from_disk(settings, current)
        except _Refused as exc:
            self._emit(exc.event)
            tampered = exc.event.step == "rejected"
            previous, prev_settings = record.previous, record.previous_settings
            if previous is None or prev_settings is None:
                if tampered:
                    await asyncio.to_thread(self._store.drop, name, current)
                return
            try:
                await self._serve_from_disk(prev_settings, previous)
            except _Refused as exc2:
                self._emit(exc2.event)
                if tampered:
                    await asyncio.to_thread(self._store.drop, name, current)
                return
            await asyncio.to_thread(self._store.rollback, name)
            self._emit(
                ModelEvent(
                    name, previous, "restored", f"v{current} failed; fell back to v{previous}"
                )
            )
            return
        self._emit(ModelEvent(name, current, "restored", "serving the installed copy"))

    async def _serve_from_disk(self, settings: DesiredModel, version: int) -> None:
        """Verify the installed copy of ``version``, load it, warm it up and swap it in."""
        name = settings.name
        path = self._store.path(name, version)
        self._emit(ModelEvent(name, version, "verifying", str(path)))
        try:
            manifest = await asyncio.to_thread(
                verify, path, self._keys, min_version=version, limits=self._limits
            )
            _check_matches(manifest, settings)
        except Exception as exc:  # reported; the caller falls back
            raise self._failure(settings, exc) from exc
        model = await self._load_and_warm(path, manifest, settings)
        self._table.swap(model)
        self._serving[name] = version

    async def _load_and_warm(self, path: Path, manifest: Manifest, desired: DesiredModel) -> M:
        self._emit(ModelEvent(desired.name, manifest.version, "loading", str(path)))
        try:
            model = await asyncio.to_thread(self._loader, path, manifest, desired)
        except Exception as exc:  # a model that does not load is reported
            raise self._failure(desired, exc, what="load failed") from exc
        self._emit(ModelEvent(desired.name, manifest.version, "warming"))
        try:
            result = await asyncio.to_thread(model.warm_up)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # a model that fails warm-up is never served
            raise self._failure(desired, exc, what="warm-up failed") from exc
        return model

    # ------------------------------------------------------------------ helpers

    def _refusal(
        self,
        desired: DesiredModel,
        step: Step,
        detail: str,
        *,
        reason: RejectReason | None = None,
        temporary: bool = False,
    ) -> _Refused:
        served = self._serving.get(desired.name)
        if step == "failed" and served is not None and served != desired.version:
            detail += f" (v{served} keeps serving)"
        return _Refused(
            ModelEvent(desired.name, desired.version, step, detail, reason, temporary=temporary),
            temporary=temporary,
        )

    def _failure(self, desired: DesiredModel, exc: BaseException, *, what: str = "") -> _Refused:
        prefix = f"{what}: " if what else ""
        if isinstance(exc, _Refused):
            return exc
        if isinstance(exc, ArtifactRejected):
            return self._refusal(desired, "rejected", exc.detail, reason=exc.reason)
        if isinstance(exc, EdgefedError):
            return self._refusal(desired, "failed", prefix + exc.message, temporary=exc.retryable)
        return self._refusal(desired, "failed", f"{prefix}{type(exc).__name__}: {exc}")

    def _progress(self, name: str, version: int) -> ProgressCallback:
        last_decile = -1
        verifying = False

        def on_progress(done: int, total: int) -> None:
            nonlocal last_decile, verifying
            decile = 10 if total <= 0 else done * 10 // total
            if decile > last_decile:
                last_decile = decile
                self._emit(
                    ModelEvent(
                        name,
                        version,
                        "downloading",
                        f"{done} of {total} bytes",
                        bytes_done=done,
                        bytes_total=total,
                    )
                )
            if done >= total and not verifying:
                verifying = True
                self._emit(ModelEvent(name, version, "verifying", "checking every file's hash"))

        return on_progress

    def _emit(self, event: ModelEvent) -> None:
        level = logging.WARNING if event.step in ("failed", "rejected") else logging.INFO
        if event.step != "downloading" or event.bytes_done is None:
            log.log(
                level,
                "%s v%s %s%s%s",
                event.model,
                event.version,
                event.step,
                f" ({event.reason})" if event.reason else "",
                f": {event.detail}" if event.detail else "",
            )
        try:
            self._report(event)
        except Exception:  # a broken reporter must not stop reconciliation
            log.exception("reporting %s failed", event)


def _check_matches(manifest: Manifest, desired: DesiredModel) -> None:
    """The artifact must be the model, version and split side the desired state names."""
    problem = None
    if manifest.name != desired.name or manifest.version != desired.version:
        problem = (
            f"the artifact is {manifest.name} v{manifest.version}, the desired state asks for "
            f"{desired.name} v{desired.version}"
        )
    elif desired.role == "full" and manifest.split is not None:
        problem = f"the desired role is full but the artifact is a {manifest.split.role}"
    elif desired.role != "full" and (
        manifest.split is None
        or manifest.split.role != desired.role
        or (desired.split_point is not None and manifest.split.split_point != desired.split_point)
    ):
        have = (
            "a full model"
            if manifest.split is None
            else f"a {manifest.split.role} split at {manifest.split.split_point}"
        )
        problem = (
            f"the desired role is {desired.role} split at {desired.split_point}, "
            f"the artifact is {have}"
        )
    if problem is not None:
        raise ArtifactRejected(RejectReason.MALFORMED_MANIFEST, problem)


def _digest(state: DesiredState) -> str:
    """Digest of what a desired state asks for (agent, generation, models, placements; not its
    timestamp). Placements count only when there are some, so digests recorded before they
    existed still match."""
    body: dict[str, object] = {
        "agent_id": state.agent_id,
        "generation": state.generation,
        "models": [m.model_dump(mode="json") for m in state.models],
    }
    if state.placements:
        body["placements"] = {
            name: p.model_dump(mode="json") for name, p in sorted(state.placements.items())
        }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
