"""The update state machine of one device (DESIGN.md), persisted at every step.

::

    idle -> offered -> downloading -> verified -> staged -> selftest -> swapped
         -> probation -> committed -> idle          (or rolled_back / failed(reason))

Each step is written to the journal (``device._journal``) *before* the agent
acts on it, then published (event + retained ``reported``); what a boot does
with each persisted state is tabled in ``device._recovery``. A release that is
bad (verification, manifest, compatibility, self-test, probation, or it keeps
killing the process) is rejected and never retried under the same desired
state; a transfer or storage error is retried with backoff. The running model
serves throughout; after a swap the previous one stays loaded until commit.

Fault-test hook: ``EDGEFLEET_FAULT_DELAY_<STATE>=<seconds>`` (``STATE`` an
``UpdateState`` name, e.g. ``EDGEFLEET_FAULT_DELAY_STAGED=0.5``) makes the
updater wait that long right after persisting ``<state>``, so a test can cut
the power in every state. Unset (as in production) it costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device import __version__, _recovery
from device._journal import (
    PRE_SWAP_STATES,
    Journal,
    JournalStore,
    release_key,
)
from device._probation import Outcome, ProbationPolicy, ProbationWindow, judge
from device._recovery import ModelCrashError, rejecting
from device.runtime import LoadedModel, supported_builtin_ops
from device.store import SlotContents, StoreState
from shared.errors import (
    EdgefleetError,
    ReleaseError,
    StorageError,
    TransferError,
    VerificationError,
)
from shared.manifest import ReleaseManifest, check_compatible
from shared.messages import Desired, ErrorInfo, Event, EventKind, UpdateState

if TYPE_CHECKING:
    from device.agent import Agent
    from device.blob_fetcher import BlobFetcher
    from device.http_fetcher import ResumableHttpFetcher
    from device.mqtt_fetcher import MqttFetcher
    from device.tuf_client import ReleaseClient, VerifiedRelease

__all__ = ["FAULT_DELAY_ENV", "UpdateMachine", "fault_delays"]

log = logging.getLogger(__name__)

FAULT_DELAY_ENV = "EDGEFLEET_FAULT_DELAY_"
#: How often the probation verdict is re-evaluated.
PROBATION_TICK_S = 0.05
#: Download progress events: one per this fraction of the release.
PROGRESS_STEP = 0.25

_EVENT_OF = {
    UpdateState.OFFERED: EventKind.OFFERED,
    UpdateState.DOWNLOADING: EventKind.DOWNLOADING,
    UpdateState.VERIFIED: EventKind.VERIFIED,
    UpdateState.STAGED: EventKind.STAGED,
    UpdateState.SELFTEST: EventKind.SELFTEST,
    UpdateState.SWAPPED: EventKind.SWAPPED,
    UpdateState.COMMITTED: EventKind.COMMITTED,
    UpdateState.ROLLED_BACK: EventKind.ROLLED_BACK,
    UpdateState.FAILED: EventKind.FAILED,
}


class DowngradeError(ReleaseError):
    code = "downgrade_refused"


def fault_delays(environ: dict[str, str] | None = None) -> dict[UpdateState, float]:
    """``EDGEFLEET_FAULT_DELAY_<STATE>`` settings (test hook; see the module doc)."""
    env = os.environ if environ is None else environ
    out: dict[UpdateState, float] = {}
    for state in UpdateState:
        raw = env.get(FAULT_DELAY_ENV + state.name)
        if raw:
            try:
                out[state] = max(0.0, float(raw))
            except ValueError:
                log.warning("ignoring %s%s=%r: not a number", FAULT_DELAY_ENV, state.name, raw)
    if out:
        log.warning("fault-test delays active: %s", {s.value: d for s, d in out.items()})
    return out


class UpdateMachine:
    """Walks the update state machine for one ``Agent`` (its ``updater`` thread)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.journals = JournalStore(cfg.data_dir)
        self.j = Journal()
        self._lock = threading.Lock()
        self.policy = ProbationPolicy(
            duration_s=cfg.probation_s,
            min_inferences=cfg.probation_min_inferences,
            max_duration_s=max(cfg.probation_max_s, cfg.probation_s),
            max_error_rate=cfg.probation_max_error_rate,
            max_latency_ratio=cfg.probation_max_latency_ratio,
        )
        self.download_dir = cfg.data_dir / "download"
        self._fetcher: ResumableHttpFetcher | MqttFetcher | None = None
        self._blobs: BlobFetcher | None = None
        self._delays = fault_delays()
        #: The model that served before the swap, kept loaded during probation.
        self._previous_model: LoadedModel | None = None
        self._resume_probation = False
        self._deferred: list[tuple[EventKind, ErrorInfo | None]] = []

    # -- journal ---------------------------------------------------------------
    @property
    def state(self) -> UpdateState:
        return self.j.state

    def next_telemetry_seq(self) -> int:
        with self._lock:
            self.j = self.j.evolve(telemetry_seq=self.j.telemetry_seq + 1)
            return self.j.telemetry_seq

    def _persist(self, state: UpdateState | None = None, **changes: Any) -> None:
        """Write the journal with ``changes`` (raises ``StorageError``), then the test delay."""
        with self._lock:
            if state is not None:
                changes["state"] = state
            self.j = self.j.evolve(**changes)
            snapshot = self.j
        self.journals.save(snapshot)
        delay = self._delays.get(snapshot.state) if state is not None else None
        if delay:
            self.agent._stop.wait(delay)

    def _announce(
        self, kind: EventKind, *, progress: float | None = None, reason: ErrorInfo | None = None
    ) -> None:
        target = self.j.target
        if target is None:
            return
        with self._lock:
            self.j = self.j.evolve(event_seq=self.j.event_seq + 1)
            seq = self.j.event_seq
        a = self.agent
        a.session.publish_event(
            Event(
                device_id=a.cfg.device_id,
                seq=seq,
                ts=a.clock(),
                kind=kind,
                model=target.model,
                release=target.release,
                rollout_id=target.rollout_id,
                progress=progress,
                reason=reason,
            )
        )
        a._report()

    def _enter(self, state: UpdateState, **changes: Any) -> None:
        progress = changes.pop("progress", None)
        reason = changes.get("reason")
        self._persist(state, **changes)
        self._announce(_EVENT_OF[state], progress=progress, reason=reason)

    # -- boot ------------------------------------------------------------------------
    def recover(self) -> None:
        """Before the agent boots a slot: load the journal, make the pointer agree."""
        _recovery.recover(self)

    def after_boot(self) -> None:
        """After the agent booted a slot: decide how to go on with the journal's update."""
        _recovery.after_boot(self)

    def _load_slot(self, slot: Any) -> LoadedModel | None:
        contents = self.agent.store.read(slot)
        if contents is None:
            return None
        try:
            return self.agent._load_and_test(contents)
        except EdgefleetError as e:
            log.error("previous slot %s cannot be preloaded for a rollback: %s", slot, e)
            return None

    def _save_quietly(self) -> None:
        try:
            self.journals.save(self.j)
        except StorageError as e:
            log.error("cannot persist the update journal: %s", e)

    # -- the updater thread ----------------------------------------------------------
    def run(self) -> None:
        a = self.agent
        for kind, reason in self._deferred:
            self._announce(kind, reason=reason)
        self._deferred.clear()
        if self._resume_probation:
            self._resume_probation = False
            self._guarded(self._continue_probation)
        delay = a.cfg.retry_min
        while not a._stop.is_set():
            a._wake.wait(timeout=delay if self.j.state == UpdateState.FAILED else 5.0)
            a._wake.clear()
            if a._stop.is_set():
                return
            desired = a._needs_update()
            if desired is None:
                continue
            ok, transient = self._guarded(functools.partial(self.apply, desired))
            delay = a.cfg.retry_min if ok or not transient else min(delay * 2, a.cfg.retry_max)

    def _guarded(self, step: Callable[[], None]) -> tuple[bool, bool]:
        """Run ``step``; map errors onto failed/rolled back. Returns (ok, transient)."""
        try:
            step()
            return True, False
        except TransferError as e:
            self._fail(e, reject=False)
        except ReleaseError as e:
            self._fail(e, reject=True)
            return False, False
        except EdgefleetError as e:  # storage, config: retry later
            self._fail(e, reject=False)
        except Exception as e:  # a bug must not kill the updater
            log.exception("update failed unexpectedly")
            self._fail(EdgefleetError(f"internal error: {e!r}"), reject=False)
        return False, True

    @property
    def fetcher(self) -> ResumableHttpFetcher | MqttFetcher:
        """The transport (created, with TUF and urllib3, at the first update: an
        agent that is not updating does not carry them in memory).

        ``repo_url`` ``mqtt://edgefleet-repo/`` selects TUF over MQTT 5 on the
        agent's own broker connection (devices without HTTP); anything else is
        HTTP(S) with Range resumption.
        """
        if self._fetcher is None and self.agent.cfg.repo_url.startswith("mqtt://"):
            from device.mqtt_fetcher import MqttFetcher

            self._fetcher = MqttFetcher.for_session(self.agent.session)
        if self._fetcher is None:
            from device.http_fetcher import ResumableHttpFetcher
            from device.tuf_client import HTTP_TIMEOUT_S

            self._fetcher = ResumableHttpFetcher(
                self.download_dir / "partial",
                timeout=HTTP_TIMEOUT_S,
                user_agent=f"edgefleet-device/{__version__}",
            )
        return self._fetcher

    @property
    def blobs(self) -> BlobFetcher | None:
        """Release files from the broker's retained blobs on the agent's own
        connection (``blob_source`` ``auto`` or ``mqtt``), or ``None`` (``http``)."""
        source = self.agent.cfg.blob_source
        if self._blobs is None and source != "http":
            from device.blob_fetcher import BlobFetcher

            self._blobs = BlobFetcher.for_session(
                self.agent.session, self.download_dir / "partial", mode=source
            )
        return self._blobs

    def _discard_partials(self) -> None:
        self.fetcher.discard_partials()
        if self.blobs is not None:
            self.blobs.discard_partials()

    def _client(self) -> ReleaseClient:
        from device.tuf_client import ReleaseClient

        cfg = self.agent.cfg
        return ReleaseClient(
            cfg.data_dir / "tuf",
            cfg.root_path,
            cfg.repo_url,
            fetcher=self.fetcher,
            blobs=self.blobs,
        )

    # -- one update ----------------------------------------------------------------
    def apply(self, desired: Desired) -> None:
        a = self.agent
        running = a._running
        if (
            running is not None
            and running.manifest.model == desired.model
            and desired.release < running.manifest.release
        ):
            self._persist(target=desired, slot=None, previous=None, reason=None, crashes=0)
            raise DowngradeError(
                f"release {desired.release} is older than the running release "
                f"{running.manifest.release}; versions only go up"
            )
        j = self.j
        resume = j.target == desired and j.state in PRE_SWAP_STATES
        resumed_from = j.state if resume else UpdateState.IDLE
        if resume:
            log.info(
                "resuming the update to %s/%s from %s",
                desired.model,
                desired.release,
                resumed_from.value,
            )
        self._enter(
            UpdateState.OFFERED,
            target=desired,
            slot=None,
            previous=None,
            prev_p99_ms=None,
            reason=None,
            crashes=j.crashes if resume else 0,
        )
        client = self._client()
        manifest = client.get_manifest(desired.model, desired.release)
        check_compatible(
            manifest,
            agent_version=__version__,
            runtime_ops=supported_builtin_ops(),
            hardware_tags=frozenset(a.cfg.hardware_tags),
            runtime=a.runtime_name,
        )
        dest = self.download_dir / f"{desired.model}-{desired.release}"
        self._clean_downloads(keep=dest)
        self._enter(UpdateState.DOWNLOADING, progress=0.0)
        verified = self._download(client, manifest, running, dest)

        pointer = a.store.state()
        slot = a.store.other(pointer.active)
        self._enter(UpdateState.VERIFIED, slot=slot)
        contents = None
        if resumed_from in (UpdateState.STAGED, UpdateState.SELFTEST):
            contents = a.store.read(slot)
            if (
                contents is None
                or contents.model_sha256 != verified.model_sha256
                or contents.manifest != manifest
            ):
                contents = None
        if contents is None:
            if pointer.previous == slot:  # its release stops being a rollback target
                a.store.set_state(StoreState(active=pointer.active, previous=None))
            contents = a.store.stage(
                slot,
                manifest,
                verified.model_path.read_bytes(),
                verified.selftest_path.read_bytes(),
                verified.baseline_path.read_bytes() if verified.baseline_path else None,
            )
        self._enter(UpdateState.STAGED)
        if self.j.crashes >= a.cfg.max_update_crashes:
            raise ModelCrashError(
                f"the agent died {self.j.crashes} times loading or testing "
                f"release {desired.release}; refused"
            )
        model = a._load_and_test(contents)
        try:
            self._enter(UpdateState.SELFTEST)
            prev_p99 = a._latency.p99_ms()
            self._persist(UpdateState.SWAPPED, previous=pointer.active, prev_p99_ms=prev_p99)
            a.store.set_state(StoreState(active=slot, previous=pointer.active))
        except BaseException:
            model.close()
            raise
        self._previous_model = a._install(contents, model, keep_old=True)
        self._announce(EventKind.SWAPPED)
        self._continue_probation()

    def _download(
        self,
        client: ReleaseClient,
        manifest: ReleaseManifest,
        running: SlotContents | None,
        dest: Path,
    ) -> VerifiedRelease:
        a = self.agent
        if (
            a.cfg.use_deltas
            and running is not None
            and running.manifest.model == manifest.model
            and manifest.deltas
        ):
            try:
                base = running.model_path.read_bytes()
            except OSError:
                base = None
            if base is not None:
                from device._delta import apply_delta

                apply_delta(
                    manifest=manifest,
                    base_release=running.manifest.release,
                    base_model=base,
                    dest_dir=dest,
                    metadata_dir=a.cfg.data_dir / "tuf",
                    root=a.cfg.root_path.read_bytes(),
                    repo_url=a.cfg.repo_url,
                    fetcher=self.fetcher,
                )
        last = [0.0]

        def progress(done: int, total: int) -> None:
            frac = done / total if total else 1.0
            if frac - last[0] >= PROGRESS_STEP and frac < 1.0:
                last[0] = frac
                with contextlib.suppress(StorageError):
                    self._persist()
                self._announce(EventKind.DOWNLOADING, progress=round(frac, 3))

        self.fetcher.used_partial = False
        if self.blobs is not None:
            self.blobs.used_partial = False
        try:
            # The metadata was refreshed a moment ago for this manifest: one refresh
            # per update, not two (a fleet of a thousand refreshes a thousand times).
            return client.fetch_release(
                manifest.model, manifest.release, dest, progress, reuse_metadata=True
            )
        except VerificationError:
            if not (self.fetcher.used_partial or (self.blobs and self.blobs.used_partial)):
                raise
            # Bytes kept from an earlier attempt may be what failed: not the release's fault.
            log.warning("verification failed on a resumed download; downloading afresh")
            self._discard_partials()
            shutil.rmtree(dest, ignore_errors=True)
            return client.fetch_release(manifest.model, manifest.release, dest, progress)

    # -- probation ---------------------------------------------------------------------
    def _continue_probation(self) -> None:
        a = self.agent
        model = a.server.current
        if model is None:
            raise EdgefleetError("probation without a serving model")
        if self.j.previous is not None:
            # A first install has nothing to roll back to: no probation then.
            self._persist(UpdateState.PROBATION)
            a._report()
            window = ProbationWindow(model)
            a._probe = window
            try:
                while True:
                    verdict = judge(window, self.policy, self.j.prev_p99_ms)
                    if verdict.outcome != Outcome.PENDING:
                        break
                    if a._stop.wait(PROBATION_TICK_S):
                        return  # shutting down: the next boot starts a new window
            finally:
                a._probe = None
            if verdict.outcome == Outcome.FAILED:
                log.error("probation failed: %s", verdict.detail)
                self.rollback(ErrorInfo(code=verdict.code, message=verdict.detail[:1000]))
                return
            log.info("probation passed: %s", verdict.detail)
            self._announce(EventKind.PROBATION_PASSED)
        self._enter(UpdateState.COMMITTED)
        old, self._previous_model = self._previous_model, None
        if old is not None:
            old.close(a.server.drain_timeout)
        self._clean_downloads(keep=None)
        self._discard_partials()
        with self._lock:
            a._last_error = None
        self._persist(
            UpdateState.IDLE,
            target=None,
            slot=None,
            previous=None,
            prev_p99_ms=None,
            crashes=0,
            reason=None,
        )
        a._report()
        running = a._running
        if running is not None:
            log.info("committed release %s of %s", running.manifest.release, running.manifest.model)

    def settle(self) -> None:
        """End a failed or rolled-back update whose target is no longer wanted: the
        device runs what it is told to run. Its refusal stays in the journal."""
        a = self.agent
        with self._lock:
            a._last_error = None
        self._persist(UpdateState.IDLE, target=None, slot=None, previous=None, reason=None)
        a._report()

    def rollback(self, reason: ErrorInfo) -> None:
        """Serve the previous slot again; the release on probation is rejected."""
        a = self.agent
        j = rejecting(self.j, UpdateState.ROLLED_BACK, reason)
        with self._lock:
            a._last_error = reason
        self._persist(UpdateState.ROLLED_BACK, reason=reason, rejected=j.rejected)
        old, self._previous_model = self._previous_model, None
        contents = a.store.read(j.previous) if j.previous is not None else None
        if contents is not None and old is None:
            old = self._load_slot(contents.slot)
        if contents is not None and old is not None:
            a._install(contents, old)  # instant: the previous model is loaded and warm
            _recovery.repoint_previous(self, j)
        else:
            if old is not None:
                old.close(0)
            log.error(
                "the previous slot %s does not serve; the new model keeps serving", j.previous
            )
        self._announce(EventKind.ROLLED_BACK, reason=reason)
        log.warning("rolled back to slot %s: %s", j.previous, reason.message)

    # -- failures ---------------------------------------------------------------------
    def _fail(self, error: EdgefleetError, *, reject: bool) -> None:
        a = self.agent
        info = ErrorInfo(code=error.code, message=str(error)[:1000])
        j = self.j
        target = j.target
        log.error(
            "update to %s failed (%s): %s",
            f"{target.model}/{target.release}" if target else "?",
            error.code,
            error,
        )
        with self._lock:
            a._last_error = info
        rejected = dict(j.rejected)
        if reject and target is not None:
            rejected[release_key(target.model, target.release)] = target.issued_at
        try:
            pointer = a.store.state()
            if (
                j.slot is not None
                and j.slot != pointer.active
                and j.state in (UpdateState.VERIFIED, UpdateState.STAGED, UpdateState.SELFTEST)
            ):
                a.store.clear(j.slot)  # a refused release never sits valid on disk
            if reject and target is not None:
                shutil.rmtree(
                    self.download_dir / f"{target.model}-{target.release}", ignore_errors=True
                )
                self._discard_partials()
        except (OSError, StorageError) as e:
            log.error("cleaning up after the failed update: %s", e)
        try:
            self._persist(UpdateState.FAILED, reason=info, rejected=rejected, slot=None)
        except StorageError as e:
            log.error("cannot persist the failure: %s", e)
            with self._lock:
                self.j = self.j.evolve(state=UpdateState.FAILED, reason=info, rejected=rejected)
        self._announce(EventKind.FAILED, reason=info)

    # -- files -------------------------------------------------------------------------
    def _clean_downloads(self, keep: Path | None) -> None:
        """Remove downloads of other releases (kept partials stay: they are content-named)."""
        if not self.download_dir.is_dir():
            return
        for p in self.download_dir.iterdir():
            if p.is_dir() and p.name != "partial" and p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        old, self._previous_model = self._previous_model, None
        if old is not None:
            old.close(0)
        if self._fetcher is not None:
            self._fetcher.close()
        if self._blobs is not None:
            self._blobs.close()
