"""The decision log of rollouts: every decision the service takes is an event row
(what operators read back), a log line and a count by kind (for ``/metrics``).

Shared by the operations, the controller's judging and rollbacks, so that all
of them word and count their decisions alike.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from cloud.rollouts.tables import RolloutEvent

__all__ = ["DETAIL_DEVICES", "Journal", "summarize"]

log = logging.getLogger(__name__)

#: Devices named in one event's detail at most.
DETAIL_DEVICES = 50


def summarize(reasons: dict[str, str], limit: int = 3) -> str:
    """``N x why (e.g. device)`` for the commonest reasons, so that a reason line
    stays short however many devices it speaks of."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for device, why in reasons.items():
        by_reason[why].append(device)
    parts = [
        f"{len(ids)} x {why} (e.g. {ids[0]})"
        for why, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:limit]
    ]
    return "; ".join(parts)


class Journal:
    """Writes decision events into the caller's session (they commit with the
    change they explain) and counts them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        #: Decisions made (for ``/metrics``): kind -> count.
        self.decisions: Counter[str] = Counter()

    def record(
        self,
        s: Session,
        rid: str,
        kind: str,
        reason: str,
        *,
        wave: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.decisions[kind] += 1
        s.add(
            RolloutEvent(
                rollout_id=rid,
                ts=self.clock(),
                kind=kind,
                wave=wave,
                reason=reason,
                detail=detail or {},
            )
        )
        log.info("rollout %s: %s: %s", rid, kind, reason)
