"""The device registry: every device the cloud has heard of, kept in SQL.

Devices register themselves: the first ``status`` or ``reported`` message of an
id creates its row; later ones keep its facts current (hardware, runtime, agent
version, running release, update state, online, last seen). Operators add what
devices cannot know about themselves: a group and labels. The history table
keeps each device's update events and every change of the release it runs, so
"which devices ever ran release 7?" has an answer after they moved on.

``DeviceRegistry`` is fed by the cloud's broker connection (``FleetView``
listeners) from the paho thread; it only queues there, and a writer thread
stores a batch every ``flush_interval`` seconds, so the broker connection never
waits for the database.

A device's *group* is the one an operator assigned, else the one its agent
announces with a hardware tag ``group:<name>``, else ``default``. Its *tags*
are its hardware tags plus the operator's labels.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud.db import Base, Database
from shared.messages import Event, Message, Reported, Status

__all__ = [
    "DEFAULT_GROUP",
    "DeviceHistory",
    "DeviceRecord",
    "DeviceRegistry",
    "device_dict",
    "device_group_of",
    "devices_that_ran",
    "get_device",
    "history",
    "list_devices",
    "set_labels",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP = "default"
_GROUP_PREFIXES = ("group:", "group=")
#: Labels an operator may put on one device.
MAX_LABELS = 32
#: History rows a query returns at most.
MAX_HISTORY = 5000
#: Update states in which a device runs its release as its settled model.
SETTLED_STATES = frozenset({"idle", "committed"})


class DeviceRecord(Base):
    """One device: facts it reports, labels operators give it."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Operator-assigned group (``None``: from the hardware tag, else ``default``).
    assigned_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    hw_tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    machine: Mapped[str | None] = mapped_column(String(64), nullable=True)
    system: Mapped[str | None] = mapped_column(String(64), nullable=True)
    runtime: Mapped[str | None] = mapped_column(String(128), nullable=True)
    agent_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    target_release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    last_error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def group(self) -> str:
        return self.assigned_group or device_group_of(self.hw_tags)

    @property
    def tags(self) -> list[str]:
        return sorted(set(self.hw_tags or []) | set(self.labels or []))


class DeviceHistory(Base):
    """An update event of a device, or a change of the release it runs."""

    __tablename__ = "device_history"
    __table_args__ = (
        UniqueConstraint("device_id", "kind", "seq", "ts", name="uq_device_history"),
        Index("ix_device_history_device", "device_id", "ts"),
        Index("ix_device_history_release", "model", "release"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    #: An event kind (``swapped``, ``rolled_back`` ...), or ``running`` (the
    #: device reported running a release it did not run before).
    kind: Mapped[str] = mapped_column(String(24))
    seq: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


def device_group_of(tags: list[str] | None) -> str:
    """The group a device's own hardware tags put it in."""
    for tag in tags or []:
        for prefix in _GROUP_PREFIXES:
            if tag.startswith(prefix) and len(tag) > len(prefix):
                return tag[len(prefix) :]
    return DEFAULT_GROUP


def device_dict(r: DeviceRecord) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "group": r.group,
        "tags": r.tags,
        "labels": list(r.labels or []),
        "hardware": {
            "machine": r.machine,
            "system": r.system,
            "runtime": r.runtime,
            "tags": list(r.hw_tags or []),
        },
        "agent_version": r.agent_version,
        "first_seen": r.first_seen,
        "last_seen": r.last_seen,
        "online": r.online,
        "model": r.model,
        "release": r.release,
        "state": r.state,
        "target_release": r.target_release,
        "rollout_id": r.rollout_id,
        "last_error": (
            {"code": r.last_error_code, "message": r.last_error} if r.last_error_code else None
        ),
    }


def _insert_ignore(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT rows, skipping those that clash with a unique constraint (SQLite, PostgreSQL)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(table).on_conflict_do_nothing(), rows)


@dataclass(frozen=True)
class _Item:
    msg: Message
    received_at: float


class DeviceRegistry:
    """Stores what the device streams say, in batches, on its own thread."""

    def __init__(self, db: Database, *, flush_interval: float = 0.5) -> None:
        self.db = db
        self.flush_interval = flush_interval
        self._queue: deque[_Item] = deque(maxlen=200_000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        self.dropped = 0
        self.write_errors = 0

    # -- feeding (any thread) ------------------------------------------------------
    def observe(self, msg: Message, received_at: float) -> None:
        if isinstance(msg, (Status, Reported, Event)):
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(_Item(msg, received_at))

    def start(self) -> DeviceRegistry:
        self._thread = threading.Thread(target=self._run, name="device-registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except Exception:
                self.write_errors += 1
                log.exception("device registry write failed; retrying with the next batch")

    # -- writing -------------------------------------------------------------------
    def flush(self) -> int:
        """Store everything queued so far; returns the number of messages stored."""
        with self._flush_lock:
            items: list[_Item] = []
            while self._queue:
                items.append(self._queue.popleft())
            if not items:
                return 0
            try:
                self._write(items)
            except Exception:
                # Put them back in order: nothing the broker gave us is lost to a DB hiccup.
                self._queue.extendleft(reversed(items))
                raise
            return len(items)

    def _write(self, items: list[_Item]) -> None:
        ids = sorted({i.msg.device_id for i in items})
        with self.db.session() as s:
            existing = {
                r.device_id: r
                for r in s.scalars(select(DeviceRecord).where(DeviceRecord.device_id.in_(ids)))
            }
            history: list[dict[str, Any]] = []
            for item in items:
                msg, now = item.msg, item.received_at
                rec = existing.get(msg.device_id)
                if rec is None:
                    rec = DeviceRecord(
                        device_id=msg.device_id,
                        labels=[],
                        hw_tags=[],
                        first_seen=now,
                        last_seen=now,
                        online=False,
                    )
                    s.add(rec)
                    existing[msg.device_id] = rec
                rec.last_seen = max(rec.last_seen, now)
                if isinstance(msg, Status):
                    rec.online = msg.online
                    rec.agent_version = msg.agent_version or rec.agent_version
                elif isinstance(msg, Reported):
                    history += self._apply_reported(rec, msg, now)
                elif isinstance(msg, Event):
                    history.append(
                        {
                            "device_id": msg.device_id,
                            "ts": msg.ts,
                            "kind": msg.kind.value,
                            "seq": msg.seq,
                            "model": msg.model,
                            "release": msg.release,
                            "rollout_id": msg.rollout_id,
                            "reason_code": msg.reason.code if msg.reason else None,
                            "reason": msg.reason.message if msg.reason else None,
                        }
                    )
            s.flush()
            _insert_ignore(s, DeviceHistory.__table__, history)

    @staticmethod
    def _apply_reported(rec: DeviceRecord, msg: Reported, now: float) -> list[dict[str, Any]]:
        out = []
        if msg.model is not None and (msg.model, msg.release) != (rec.model, rec.release):
            out.append(
                {
                    "device_id": msg.device_id,
                    "ts": now,
                    "kind": "running",
                    "seq": 0,
                    "model": msg.model,
                    "release": msg.release,
                    "rollout_id": msg.rollout_id,
                    "reason_code": None,
                    "reason": None,
                }
            )
        hw = msg.hardware
        rec.agent_version = msg.agent_version
        rec.machine, rec.system, rec.runtime = hw.machine, hw.system, hw.runtime
        rec.hw_tags = list(hw.tags)
        rec.model, rec.release = msg.model, msg.release
        rec.state = msg.state.value
        rec.target_release = msg.target_release
        rec.rollout_id = msg.rollout_id
        rec.last_error_code = msg.last_error.code if msg.last_error else None
        rec.last_error = msg.last_error.message if msg.last_error else None
        return out


# -- queries -----------------------------------------------------------------------


def list_devices(
    db: Database,
    *,
    group: str | None = None,
    tag: str | None = None,
    model: str | None = None,
    release: int | None = None,
    online: bool | None = None,
    limit: int = 100_000,
) -> list[DeviceRecord]:
    """Devices matching every given filter, by id."""
    q = select(DeviceRecord).order_by(DeviceRecord.device_id)
    if model is not None:
        q = q.where(DeviceRecord.model == model)
    if release is not None:
        q = q.where(DeviceRecord.release == release)
    if online is not None:
        q = q.where(DeviceRecord.online == online)
    with db.session() as s:
        rows = list(s.scalars(q))
    if group is not None:
        rows = [r for r in rows if r.group == group]
    if tag is not None:
        rows = [r for r in rows if tag in r.tags]
    return rows[:limit]


def get_device(db: Database, device_id: str) -> DeviceRecord | None:
    with db.session() as s:
        rec = s.get(DeviceRecord, device_id)
        if rec is not None:
            s.expunge(rec)
        return rec


def history(db: Database, device_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """A device's history, newest first."""
    H = DeviceHistory
    with db.session() as s:
        rows = s.scalars(
            select(H)
            .where(H.device_id == device_id)
            .order_by(H.ts.desc(), H.id.desc())
            .limit(min(limit, MAX_HISTORY))
        ).all()
        return [
            {
                "ts": r.ts,
                "kind": r.kind,
                "model": r.model,
                "release": r.release,
                "rollout_id": r.rollout_id,
                "reason": {"code": r.reason_code, "message": r.reason} if r.reason_code else None,
            }
            for r in rows
        ]


#: History kinds that mean "this device ran (or served with) that release".
_RAN_KINDS = ("running", "swapped", "probation_passed", "committed")


def devices_that_ran(db: Database, model: str, release: int) -> list[dict[str, Any]]:
    """Every device that ever ran ``model`` release ``release``: when first and last
    seen doing so, and whether it still does."""
    H = DeviceHistory
    with db.session() as s:
        rows = s.execute(
            select(H.device_id, func.min(H.ts), func.max(H.ts))
            .where(H.model == model, H.release == release, H.kind.in_(_RAN_KINDS))
            .group_by(H.device_id)
            .order_by(H.device_id)
        ).all()
        ids = [r[0] for r in rows]
        now = {
            d.device_id: d
            for d in s.scalars(select(DeviceRecord).where(DeviceRecord.device_id.in_(ids)))
        }
    out = []
    for device_id, first, last in rows:
        rec = now.get(device_id)
        out.append(
            {
                "device_id": device_id,
                "first_seen_running": first,
                "last_event": last,
                "running_now": bool(rec and rec.model == model and rec.release == release),
                "current_release": rec.release if rec else None,
                "online": bool(rec and rec.online),
            }
        )
    return out


def set_labels(
    db: Database,
    device_id: str,
    *,
    group: str | None = None,
    clear_group: bool = False,
    add: list[str] | None = None,
    remove: list[str] | None = None,
) -> DeviceRecord | None:
    """Change a device's operator group and labels; ``None`` if the device is unknown."""
    with db.session() as s:
        rec = s.get(DeviceRecord, device_id)
        if rec is None:
            return None
        if clear_group:
            rec.assigned_group = None
        elif group is not None:
            rec.assigned_group = group
        labels = [x for x in (rec.labels or []) if x not in set(remove or [])]
        labels += [x for x in (add or []) if x not in labels]
        if len(labels) > MAX_LABELS:
            raise ValueError(f"a device carries at most {MAX_LABELS} labels ({len(labels)} given)")
        rec.labels = labels
        s.flush()
        s.expunge(rec)
        return rec
