"""Crash recovery: what a booting agent does with the update journal it finds.

``recover`` runs before the agent loads a slot, ``after_boot`` once it serves
one. A state is persisted *before* the agent acts on it, so each row says
what may or may not have happened after the last write:

============ ======================================= ==================================
state        the device was ...                      a boot after a power cut ...
============ ======================================= ==================================
offered      reading the signed manifest             starts the update again
downloading  fetching the release (partial files)    resumes: kept bytes + HTTP Range
verified     writing the inactive slot               restages (the slot is invalid
                                                     until its ``slot.json`` is written)
staged       loading + self-testing the new model    re-tests the staged slot (its hash
                                                     is checked), counts a crash
selftest     about to switch                         re-tests and switches, counts a crash
swapped      switching the slot pointer              pointer switched: probation again;
                                                     not switched: back to selftest
probation    serving the new model on probation      probation again (a new window), the
                                                     previous model preloaded; counts a
                                                     crash; new slot does not boot:
                                                     rolled back
committed    cleaning up                             finishes (idle)
rolled_back  (terminal) serving the previous slot    re-points to the previous slot if
                                                     the switch back was cut short
failed       (terminal) serving what it served       retries if the error was transient
============ ======================================= ==================================

Dying ``max_update_crashes`` times with the new model loaded (staged ..
probation) is blamed on the model: before the switch the release fails
(``model_crashed``), after it the device rolls back. A corrupt journal is
reported (``journal_corrupt``) and replaced; the slot pointer decides what boots.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from device._journal import MODEL_STATES, PRE_SWAP_STATES, Journal, release_key
from device.store import StoreState
from shared.errors import ReleaseError
from shared.messages import ErrorInfo, EventKind, UpdateState

if TYPE_CHECKING:
    from device._updater import UpdateMachine

__all__ = ["ModelCrashError", "after_boot", "clean_temp_files", "recover", "rejecting"]

log = logging.getLogger(__name__)


class ModelCrashError(ReleaseError):
    """The process kept dying while the release's model was loaded."""

    code = "model_crashed"


def rejecting(j: Journal, state: UpdateState, reason: ErrorInfo | None) -> Journal:
    """``j`` moved to ``state`` with its target remembered as rejected."""
    rejected = dict(j.rejected)
    if j.target is not None:
        rejected[release_key(j.target.model, j.target.release)] = j.target.issued_at
    return j.evolve(state=state, reason=reason, rejected=rejected)


def recover(m: UpdateMachine) -> None:
    """Before the agent boots a slot: load the journal, make the slot pointer agree."""
    a = m.agent
    j, problem = m.journals.load()
    if problem is not None:
        a._last_error = ErrorInfo(code="journal_corrupt", message=problem[:1000])
    pointer = a.store.state()
    limit = a.cfg.max_update_crashes
    invalidate_staged = False
    if j.state in MODEL_STATES and j.target is not None:
        j = j.evolve(crashes=j.crashes + 1)
        log.warning(
            "the agent died in state %s (%d time(s) with the new model loaded)",
            j.state.value,
            j.crashes,
        )
    if j.state in (UpdateState.SWAPPED, UpdateState.PROBATION):
        if j.slot is None or pointer.active != j.slot:
            # The pointer never switched: the previous slot serves; test again.
            j = j.evolve(state=UpdateState.SELFTEST)
        elif j.crashes >= limit and j.target is not None:
            reason = ErrorInfo(
                code=ModelCrashError.code,
                message=f"the agent died {j.crashes} times with release "
                f"{j.target.release} serving; rolled back to slot {j.previous}",
            )
            j = rejecting(j, UpdateState.ROLLED_BACK, reason)
            m._deferred.append((EventKind.ROLLED_BACK, reason))
    if j.state in (UpdateState.STAGED, UpdateState.SELFTEST) and j.crashes >= limit:
        assert j.target is not None
        reason = ErrorInfo(
            code=ModelCrashError.code,
            message=f"the agent died {j.crashes} times loading or testing release "
            f"{j.target.release}; refused",
        )
        j = rejecting(j, UpdateState.FAILED, reason)
        invalidate_staged = True
        m._deferred.append((EventKind.FAILED, reason))
    if j.state == UpdateState.COMMITTED:
        j = j.evolve(
            state=UpdateState.IDLE,
            target=None,
            slot=None,
            previous=None,
            crashes=0,
            reason=None,
        )
    if j.state in (UpdateState.ROLLED_BACK, UpdateState.FAILED) and j.reason is not None:
        a._last_error = j.reason
    m.j = j
    m._save_quietly()
    # Disk changes only after the journal says why, so a cut here redoes them.
    if j.state == UpdateState.ROLLED_BACK:
        repoint_previous(m, j)
    if invalidate_staged and j.slot is not None and j.slot != pointer.active:
        a.store.clear(j.slot)
    if j.state == UpdateState.IDLE:
        m._clean_downloads(keep=None)
    clean_temp_files(m)


def repoint_previous(m: UpdateMachine, j: Journal) -> None:
    """Point the store at the previous slot and invalidate the rejected one."""
    store = m.agent.store
    if j.previous is not None and store.state().active != j.previous:
        store.set_state(StoreState(active=j.previous, previous=None))
    if j.slot is not None and j.slot != store.state().active:
        store.clear(j.slot)


def after_boot(m: UpdateMachine) -> None:
    """After the agent booted a slot: decide how to go on with the journal's update."""
    a = m.agent
    j = m.j
    running = a._running
    if j.state in (UpdateState.SWAPPED, UpdateState.PROBATION):
        if running is not None and running.slot == j.slot:
            m._resume_probation = True
            if j.previous is not None:
                m._previous_model = m._load_slot(j.previous)
        else:
            # The new slot did not boot (invalid, or its model fails now): the
            # boot fell back to the previous slot.
            reason = ErrorInfo(
                code="probation_boot_failed",
                message=f"slot {j.slot} did not boot during probation; rolled back",
            )
            m.j = rejecting(j, UpdateState.ROLLED_BACK, reason)
            a._last_error = reason
            m._save_quietly()
            repoint_previous(m, m.j)
            m._deferred.append((EventKind.ROLLED_BACK, reason))
    elif j.state in PRE_SWAP_STATES and j.target is not None:
        a._resume(j.target)


def clean_temp_files(m: UpdateMachine) -> None:
    """Delete temp files a killed process left (``.*.part`` downloads, ``.*.tmp`` writes)."""
    roots = [m.download_dir, m.agent.cfg.data_dir, m.agent.store.root]
    for root in roots:
        if not root.is_dir():
            continue
        for p in root.rglob(".*"):
            if p.is_file() and (p.name.endswith(".part") or p.name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    p.unlink()
