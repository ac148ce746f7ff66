"""Registry errors, on top of ``shared.errors`` (which routes map to HTTP codes).

* ``UnknownEntryError``  a model or candidate that does not exist (HTTP 404)
* ``ConflictError``      the request does not fit the current state, e.g. a
  candidate that is still running or already released (HTTP 409)
* ``QueueFullError``     too many builds are waiting; try later (HTTP 429)

``BlobTooLargeError`` (HTTP 413) lives with the blob store. All are
``ConfigError``: the person asking is the one who can fix it.
"""

from __future__ import annotations

from shared.errors import ConfigError

__all__ = ["ConflictError", "QueueFullError", "UnknownEntryError"]


class UnknownEntryError(ConfigError):
    """The named model or candidate is not in the registry."""

    code = "not_found"


class ConflictError(ConfigError):
    """The entry exists but is in a state that does not allow this."""

    code = "conflict"


class QueueFullError(ConfigError):
    """The build queue is full."""

    code = "queue_full"
