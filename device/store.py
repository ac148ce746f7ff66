"""A/B model slots on the device's disk.

Two slot directories, ``slots/a`` and ``slots/b``. A new release is staged
into the slot that is not serving; ``state.json`` names the active slot and the
previous one (the automatic-rollback target). A slot is valid only when its
``slot.json`` exists and the model's SHA-256 matches it: ``slot.json`` is
removed first and written last, so a power cut mid-staging leaves an invalid
slot, never a half-written model that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from device.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from shared.errors import ManifestError, StorageError
from shared.manifest import ReleaseManifest

__all__ = ["SLOTS", "Slot", "SlotContents", "SlotStore", "StoreState"]

log = logging.getLogger(__name__)

Slot = Literal["a", "b"]
SLOTS: tuple[Slot, Slot] = ("a", "b")
MODEL_NAME = "model.tflite"
SELFTEST_NAME = "selftest.npz"
BASELINE_NAME = "baseline.npz"
SLOT_META = "slot.json"


@dataclass(frozen=True)
class SlotContents:
    """A valid slot: where its files are and what release they hold."""

    slot: Slot
    manifest: ReleaseManifest
    model_sha256: str
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

    @property
    def selftest_path(self) -> Path:
        return self.path / SELFTEST_NAME

    @property
    def baseline_path(self) -> Path | None:
        p = self.path / BASELINE_NAME
        return p if p.exists() else None


@dataclass(frozen=True)
class StoreState:
    """Which slot serves and which one to roll back to."""

    active: Slot | None = None
    previous: Slot | None = None

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SlotStore:
    """Reads and writes the A/B slots and the slot pointer of one device."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "slots"
        self.state_path = Path(data_dir) / "slots.json"
        for s in SLOTS:
            (self.root / s).mkdir(parents=True, exist_ok=True)

    # -- pointer ---------------------------------------------------------
    def state(self) -> StoreState:
        """The slot pointer; a missing or corrupt pointer is rebuilt from the slots."""
        if self.state_path.exists():
            try:
                raw = read_json(self.state_path)
                active, previous = raw.get("active"), raw.get("previous")
                if active in (None, *SLOTS) and previous in (None, *SLOTS):
                    return StoreState(active=active, previous=previous)
                log.warning("slot pointer names unknown slots; rebuilding", extra={"raw": raw})
            except (StorageError, AttributeError) as e:
                log.warning("slot pointer unreadable (%s); rebuilding from slots", e)
        # Recovery: serve the newest valid slot.
        valid = [c for c in (self.read(s) for s in SLOTS) if c is not None]
        valid.sort(key=lambda c: c.manifest.release, reverse=True)
        return StoreState(
            active=valid[0].slot if valid else None,
            previous=valid[1].slot if len(valid) > 1 else None,
        )

    def set_state(self, state: StoreState) -> None:
        atomic_write_json(self.state_path, state.to_json())

    @staticmethod
    def other(slot: Slot | None) -> Slot:
        return "b" if slot == "a" else "a"

    # -- slots -----------------------------------------------------------
    def read(self, slot: Slot, *, check_hash: bool = True) -> SlotContents | None:
        """The slot's contents if it is valid, else ``None`` (with the reason logged)."""
        path = self.root / slot
        meta_path = path / SLOT_META
        if not meta_path.exists():
            return None
        try:
            meta = read_json(meta_path)
            manifest = ReleaseManifest.model_validate(meta["manifest"])
            sha = str(meta["model_sha256"])
            if check_hash and _sha256(path / MODEL_NAME) != sha:
                log.error("slot %s model does not match its recorded hash", slot)
                return None
        except (StorageError, ManifestError, KeyError, TypeError, ValueError, OSError) as e:
            log.error("slot %s is invalid: %s", slot, e)
            return None
        return SlotContents(slot=slot, manifest=manifest, model_sha256=sha, path=path)

    def invalidate(self, slot: Slot) -> None:
        """Mark a slot empty before overwriting it (its meta goes first)."""
        meta = self.root / slot / SLOT_META
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta)
            fsync_dir(meta.parent)

    def clear(self, slot: Slot) -> None:
        """Invalidate ``slot`` and delete its files (a refused release is not kept)."""
        self.invalidate(slot)
        path = self.root / slot
        for name in (MODEL_NAME, SELFTEST_NAME, BASELINE_NAME):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / name)
        with contextlib.suppress(OSError):
            fsync_dir(path)

    def stage(
        self,
        slot: Slot,
        manifest: ReleaseManifest,
        model: bytes,
        selftest: bytes,
        baseline: bytes | None,
    ) -> SlotContents:
        """Write a verified release into ``slot``; the slot becomes valid last."""
        self.invalidate(slot)
        path = self.root / slot
        atomic_write_bytes(path / MODEL_NAME, model)
        atomic_write_bytes(path / SELFTEST_NAME, selftest)
        if baseline is not None:
            atomic_write_bytes(path / BASELINE_NAME, baseline)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / BASELINE_NAME)
        sha = hashlib.sha256(model).hexdigest()
        atomic_write_json(
            path / SLOT_META,
            {
                "manifest": manifest.model_dump(mode="json", by_alias=True, exclude_none=True),
                "model_sha256": sha,
            },
        )
        return SlotContents(slot=slot, manifest=manifest, model_sha256=sha, path=path)
