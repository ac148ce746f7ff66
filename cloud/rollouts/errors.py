"""Why the rollout service refuses a request (the API maps each to a status), and
the checks its parts share to refuse one.

Every refusal is raised before the service writes anything, so a refused
request leaves the rollouts as they were.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from cloud.rollouts.tables import Rollout
from shared.errors import EdgefleetError

__all__ = [
    "RolloutConflictError",
    "RolloutNotFoundError",
    "SelectionError",
    "get_rollout",
    "require_state",
]


class RolloutNotFoundError(EdgefleetError):
    code = "rollout_not_found"


class RolloutConflictError(EdgefleetError):
    """The request clashes with the state of a rollout (overlap, wrong state)."""

    code = "rollout_conflict"


class SelectionError(EdgefleetError):
    """The selection names no device that could take the release."""

    code = "empty_selection"


def get_rollout(s: Session, rid: str) -> Rollout:
    r = s.get(Rollout, rid)
    if r is None:
        raise RolloutNotFoundError(f"no rollout {rid!r}")
    return r


def require_state(r: Rollout, states: tuple[str, ...], action: str) -> None:
    """Refuse ``action`` (a verb: "pauses") on a rollout in none of ``states``."""
    if r.state not in states:
        raise RolloutConflictError(
            f"rollout {r.id} is {r.state}; only a {' or '.join(states)} one {action}"
        )
