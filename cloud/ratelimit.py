"""Token buckets per client: the arithmetic of the operator API's rate limit.

No HTTP and no clock here (``cloud.api.ratelimit`` decides who a client is and
answers 429; callers pass ``now``), so the limiter is tested with explicit
times. Each client has a bucket of ``burst`` tokens that refills at ``rate``
tokens per second; a request takes one token or is refused with the time until
one is available.

Memory is bounded two ways. A bucket left alone for ``burst / rate`` seconds is
full again, which is exactly the state of a bucket never seen, so such idle
buckets are dropped without changing any answer. And at most ``max_clients``
buckets are kept at all: beyond that the least recently used one is forgotten,
which can only ever hand that client a fresh burst, never refuse anyone more.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

__all__ = ["MAX_CLIENTS", "TokenBucketLimiter"]

log = logging.getLogger(__name__)

#: Buckets kept at most (about 150 bytes each): bounds memory under a flood of
#: distinct clients (addresses, or made-up tokens).
MAX_CLIENTS = 50_000


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens, self.stamp = tokens, stamp


class TokenBucketLimiter:
    """Thread-safe token buckets keyed by a client string."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = MAX_CLIENTS) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("a token bucket needs rate > 0, burst >= 1 and max_clients >= 1")
        self.rate, self.burst, self.max_clients = float(rate), int(burst), max_clients
        #: Seconds after which an untouched bucket is full, i.e. forgettable.
        self.idle_after = self.burst / self.rate
        #: Buckets by client, least recently touched first.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self._last_sweep = float("-inf")
        #: Buckets forgotten because ``max_clients`` was reached (not idle ones).
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def acquire(self, key: str, now: float) -> float:
        """Take one token from ``key``'s bucket at time ``now`` (seconds, monotonic).

        Returns 0.0 when the request is admitted, else the seconds until the
        bucket holds a token again (the request is refused and takes nothing).
        """
        with self._lock:
            self._sweep(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
                self._bound()
            else:
                # A clock that went backwards (it should not: monotonic) refills nothing.
                elapsed = max(0.0, now - bucket.stamp)
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
                bucket.stamp = max(bucket.stamp, now)
                self._buckets.move_to_end(key)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def _sweep(self, now: float) -> None:
        # Oldest first: the first bucket touched within idle_after ends the sweep, so
        # the cost is proportional to what is dropped. Once per idle_after at most.
        if now - self._last_sweep < self.idle_after:
            return
        self._last_sweep = now
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if now - bucket.stamp < self.idle_after:
                break
            del self._buckets[key]

    def _bound(self) -> None:
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 10_000 == 0:
                log.warning(
                    "rate limiter holds %d clients, its maximum: forgetting the least recent",
                    self.max_clients,
                    extra={"evicted": self.evicted},
                )
