"""The update journal: where the device is in the update state machine, on disk.

``<data dir>/update.json`` is rewritten atomically (temp file, fsync, rename,
directory fsync: ``device.fsutil``) *before* the agent acts on a step, so a
power cut at any instant leaves the last step it committed to. Next to the
state it keeps what recovery needs: the release being installed, the slot it
goes to and the one to roll back to, the previous model's latency (the
probation's reference), and how often the process died while the new model
was loaded (a model that kills the interpreter must not crash-loop the
device). The rejected releases and the message sequence numbers live here too.

Reading is tolerant: a missing file is a fresh device; a corrupt one is
reported (``JournalStore.load`` returns the reason) and replaced by an empty
journal; the slot pointer, not the journal, decides what boots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from device.fsutil import atomic_write_json, read_json
from device.store import SLOTS, Slot
from shared.errors import StorageError
from shared.messages import Desired, ErrorInfo, UpdateState

__all__ = ["JOURNAL_NAME", "MAX_REJECTED", "Journal", "JournalStore", "release_key"]

log = logging.getLogger(__name__)

JOURNAL_NAME = "update.json"
#: Rejected releases remembered (so a bad release is not retried forever).
MAX_REJECTED = 64

#: States in which the new model is loaded in this process: dying there may be its fault.
MODEL_STATES = frozenset(
    {UpdateState.STAGED, UpdateState.SELFTEST, UpdateState.SWAPPED, UpdateState.PROBATION}
)
#: States before the slot pointer names the new slot.
PRE_SWAP_STATES = frozenset(
    {
        UpdateState.OFFERED,
        UpdateState.DOWNLOADING,
        UpdateState.VERIFIED,
        UpdateState.STAGED,
        UpdateState.SELFTEST,
    }
)


def release_key(model: str, release: int) -> str:
    return f"{model}/{release}"


@dataclass(frozen=True)
class Journal:
    """One persisted snapshot of the update state machine."""

    state: UpdateState = UpdateState.IDLE
    #: The desired state being applied (``None`` when idle).
    target: Desired | None = None
    #: The slot the target is staged into / swapped to.
    slot: Slot | None = None
    #: The slot that served before the swap: the automatic-rollback target.
    previous: Slot | None = None
    #: p99 latency of the previous model before the swap (probation reference).
    prev_p99_ms: float | None = None
    #: Why the last update failed or rolled back.
    reason: ErrorInfo | None = None
    #: Times the process died with the target's model loaded (boots that found
    #: the journal in a ``MODEL_STATES`` state), for this target.
    crashes: int = 0
    #: "<model>/<release>" -> issued_at of the desired state it was rejected under.
    rejected: dict[str, float] = field(default_factory=dict)
    event_seq: int = 0
    telemetry_seq: int = 0

    def evolve(self, **changes: Any) -> Journal:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        rejected = dict(list(self.rejected.items())[-MAX_REJECTED:])
        return {
            "state": self.state.value,
            "target": self.target.model_dump(mode="json", by_alias=True) if self.target else None,
            "slot": self.slot,
            "previous": self.previous,
            "prev_p99_ms": self.prev_p99_ms,
            "reason": self.reason.model_dump() if self.reason else None,
            "crashes": self.crashes,
            "rejected": rejected,
            "event_seq": self.event_seq,
            "telemetry_seq": self.telemetry_seq,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Journal:
        """Parse a journal; ``ValueError`` naming the field if it is malformed."""
        if not isinstance(raw, dict):
            raise ValueError("the journal is not a JSON object")
        try:
            state = UpdateState(raw.get("state", "idle"))
            target = Desired.model_validate(raw["target"]) if raw.get("target") else None
            reason = ErrorInfo.model_validate(raw["reason"]) if raw.get("reason") else None
            slot, previous = raw.get("slot"), raw.get("previous")
            if slot not in (None, *SLOTS) or previous not in (None, *SLOTS):
                raise ValueError(f"unknown slots {slot!r} / {previous!r}")
            p99 = raw.get("prev_p99_ms")
            return cls(
                state=state,
                target=target,
                slot=slot,
                previous=previous,
                prev_p99_ms=float(p99) if p99 is not None else None,
                reason=reason,
                crashes=int(raw.get("crashes", 0)),
                rejected={str(k): float(v) for k, v in dict(raw.get("rejected", {})).items()},
                event_seq=int(raw.get("event_seq", 0)),
                telemetry_seq=int(raw.get("telemetry_seq", 0)),
            )
        except (KeyError, TypeError, ValidationError) as e:
            raise ValueError(f"the journal is malformed: {e}") from e

    def is_rejected(self, desired: Desired) -> bool:
        return self.rejected.get(release_key(desired.model, desired.release)) == desired.issued_at


class JournalStore:
    """Reads and atomically rewrites ``update.json``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / JOURNAL_NAME

    def load(self) -> tuple[Journal, str | None]:
        """The persisted journal, and why it was discarded if it was unreadable."""
        if not self.path.exists():
            return Journal(), None
        try:
            return Journal.from_json(read_json(self.path)), None
        except (StorageError, ValueError) as e:
            log.error("update journal %s unreadable (%s); starting a new one", self.path, e)
            return Journal(), f"the update journal was corrupt and was reset: {e}"

    def save(self, journal: Journal) -> None:
        """Persist ``journal``; ``StorageError`` (disk full ...) leaves the old file."""
        atomic_write_json(self.path, journal.to_json())
