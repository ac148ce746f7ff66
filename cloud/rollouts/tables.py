"""Rollouts in SQL: the rollout, each device's place in it, and every decision.

The controller keeps no state of its own between ticks: it reads these rows,
decides, and writes them back, so a restarted cloud carries on where it was.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud.db import Base

__all__ = ["Rollout", "RolloutDevice", "RolloutEvent"]


class Rollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_state", "state"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    release: Mapped[int] = mapped_column(Integer)
    #: ``RolloutState``
    state: Mapped[str] = mapped_column(String(16))
    #: The ``RolloutSpec`` it was started with (JSON).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: Cumulative device counts per wave.
    wave_sizes: Mapped[list[int]] = mapped_column(JSON)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    wave_started_at: Mapped[float] = mapped_column(Float)
    #: When the current wave reached its success threshold (its soak started).
    wave_passed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline: Mapped[float] = mapped_column(Float)
    #: The last decision, in words.
    reason: Mapped[str] = mapped_column(Text, default="")
    #: After an abort: ``{"<model>/<from release>": <rollback release>}``.
    rollback: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    #: The latest health-gate figures (JSON), for the status view.
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_device", "device_id", "status"),)

    rollout_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: 0-based wave index; ``None`` for skipped devices.
    wave: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: ``DeviceStatus``
    status: Mapped[str] = mapped_column(String(16))
    from_model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    from_release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The rollback release this device was pointed at after an abort.
    revert_to: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    offered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class RolloutEvent(Base):
    __tablename__ = "rollout_events"
    __table_args__ = (Index("ix_rollout_events_rollout", "rollout_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(40), ForeignKey("rollouts.id"))
    ts: Mapped[float] = mapped_column(Float)
    #: started, wave_started, wave_passed, gate_failed, failure_threshold,
    #: timeout, paused, resumed, aborted, rollback, skipped, missed, completed ...
    kind: Mapped[str] = mapped_column(String(32))
    wave: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
