"""Candidate builds on a background thread, for the HTTP API.

A build converts and evaluates a model several times (seconds to minutes),
far longer than an HTTP request should take. ``BuildQueue`` runs queued
candidates one at a time on one daemon thread: TensorFlow conversion uses
every core by itself, so running two builds at once would only make both
slower. The job's state (queued, running with progress, ready, failed with
the reason) lives on the candidate row, so any API worker can report it and
it survives the process; a build cut short by a restart is marked failed by
``Registry.recover_interrupted``.
"""

from __future__ import annotations

import logging
import queue
import threading

from cloud.registry.errors import QueueFullError
from cloud.registry.service import Registry

__all__ = ["DEFAULT_MAX_QUEUED", "BuildQueue"]

log = logging.getLogger(__name__)

#: Builds waiting beyond this are refused (HTTP 429) rather than queued for hours.
DEFAULT_MAX_QUEUED = 16


class BuildQueue:
    """Runs ``Registry.run`` for submitted candidates, in order, on one thread."""

    def __init__(self, registry: Registry, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.registry = registry
        self._queue: queue.Queue[int | None] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, candidate_id: int) -> None:
        """Queue a candidate that ``Registry.submit`` recorded; ``QueueFullError`` if full."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="model-builds", daemon=True)
                self._thread.start()
            # Cleared before the put, so a build that finishes at once still sets it.
            self._idle.clear()
            try:
                self._queue.put_nowait(candidate_id)
            except queue.Full:
                raise QueueFullError(
                    f"{self._queue.maxsize} builds are already waiting; try again later"
                ) from None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no build is queued or running (for tests and shutdown)."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Let the running build finish, then end the worker (queued builds stay queued)."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is not None and thread.is_alive():
            # Drop what is waiting so the sentinel is seen next.
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            candidate_id = self._queue.get()
            if candidate_id is None:
                return
            try:
                self.registry.run(candidate_id)
            except Exception:
                # The reason is on the candidate row; the worker lives on.
                log.info("build failed", extra={"candidate": candidate_id}, exc_info=True)
            finally:
                if self._queue.empty():
                    self._idle.set()
