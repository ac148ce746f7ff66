"""The operator API's rate limit: a token bucket per API token, else per address.

The buckets' arithmetic with explicit times (``cloud.ratelimit``), then the real
service (uvicorn, broker session) with a small limit: a burst, then 429 with
``Retry-After`` and a reason; the bucket refills; tokens and addresses have
buckets of their own, made-up tokens are charged to the address; and what
devices and monitoring use (TUF files, enrollment, ``/healthz``, ``/metrics``)
is never limited.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import httpx
import pytest

from cloud import ratelimit
from cloud.config import CloudSettings
from cloud.ratelimit import TokenBucketLimiter, _Bucket

pytestmark = pytest.mark.integration

RATE, BURST = 2.0, 5


# -- the buckets ---------------------------------------------------------------------
def test_burst_then_refused_with_the_wait_then_refilled() -> None:
    lim = TokenBucketLimiter(rate=2.0, burst=3)
    assert [lim.acquire("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.acquire("a", 100.0) == pytest.approx(0.5)
    assert lim.acquire("a", 100.25) == pytest.approx(0.25)  # refused requests take nothing
    assert lim.acquire("a", 100.5) == 0.0
    assert lim.acquire("a", 100.5) > 0
    # Never more than the burst, however long the wait.
    assert [lim.acquire("a", 10_000.0) for _ in range(4)][3] > 0


def test_each_key_has_its_own_bucket() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=2)
    assert lim.acquire("a", 0.0) == lim.acquire("a", 0.0) == 0.0
    assert lim.acquire("a", 0.0) > 0
    assert lim.acquire("b", 0.0) == 0.0


def test_idle_buckets_are_forgotten() -> None:
    lim = TokenBucketLimiter(rate=10.0, burst=5)  # full again after 0.5 s
    for i in range(1000):
        lim.acquire(f"client-{i}", 0.0)
    assert len(lim) == 1000
    lim.acquire("late", 0.6)
    assert len(lim) == 1
    assert lim.evicted == 0  # dropped as idle, not for lack of room


def test_a_flood_of_clients_is_bounded() -> None:
    lim = TokenBucketLimiter(rate=1.0, burst=1, max_clients=100)
    for i in range(1000):
        assert lim.acquire(f"made-up-{i}", 0.0) == 0.0
    assert len(lim) == 100 and lim.evicted == 900
    # The most recent clients are still remembered, and still limited.
    assert lim.acquire("made-up-999", 0.0) > 0


class _SlowBucket(_Bucket):
    """A bucket that yields the interpreter on every read of its tokens, so that an
    unlocked read-modify-write would be interleaved by the other threads."""

    __slots__ = ("_tokens",)

    @property
    def tokens(self) -> float:
        time.sleep(0)
        return self._tokens

    @tokens.setter
    def tokens(self, value: float) -> None:
        self._tokens = value


def test_buckets_are_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    # The middleware runs on the event loop, the auth dependency in a thread pool.
    monkeypatch.setattr(ratelimit, "_Bucket", _SlowBucket)
    lim = TokenBucketLimiter(rate=1e-9, burst=200)
    admitted = [0] * 8
    start = threading.Barrier(8)

    def hammer(i: int) -> None:
        start.wait()
        for _ in range(100):
            if lim.acquire("shared", 1.0) == 0.0:
                admitted[i] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 200  # 800 tries, exactly the burst let through


# -- over HTTP -----------------------------------------------------------------------
def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _drain(
    client: httpx.Client,
    url: str,
    headers: dict[str, str],
    *,
    rate: float = RATE,
    spent: int = 0,
    since: float | None = None,
) -> httpx.Response:
    """Call ``url`` until refused; the 429, after checking how many got through
    (``spent`` calls of this client came before, the first at ``since``)."""
    t0, passed = since or time.monotonic(), 0
    for _ in range(10 * BURST):
        r = client.get(url, headers=headers)
        if r.status_code == 429:
            # Exactly the burst, plus what refilled while we called.
            refilled = int((time.monotonic() - t0) * rate)
            assert BURST - spent <= passed <= BURST - spent + refilled, (passed, refilled)
            return r
        assert r.status_code in (200, 401), r.text
        passed += 1
    raise AssertionError(f"{passed} calls to {url} and no 429")


@pytest.fixture
def limited(cloud_with: Any) -> Any:
    return cloud_with(api_rate_limit=RATE, api_rate_burst=BURST)


def test_burst_then_429_with_retry_after_then_refill(limited: Any) -> None:
    url = f"{limited.url}/api/v1/devices"
    with httpx.Client() as client:
        r = _drain(client, url, limited.headers("viewer"))
        assert r.headers["content-type"] == "application/json"
        detail = r.json()["detail"]
        assert detail.startswith("rate limit exceeded: 2 requests/s with bursts of 5 per API token")
        retry_after = int(r.headers["Retry-After"])
        assert retry_after == 1  # one token takes 0.5 s; whole seconds, rounded up
        time.sleep(retry_after)
        assert client.get(url, headers=limited.headers("viewer")).status_code == 200


def test_separate_clients_have_separate_buckets(limited: Any) -> None:
    url = f"{limited.url}/api/v1/devices"
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with httpx.Client() as client, other:
        _drain(client, url, limited.headers("viewer"))
        # Another token, and the same address without a token, are untouched.
        assert client.get(url, headers=limited.headers("operator")).status_code == 200
        first = time.monotonic()
        assert client.get(url).status_code == 401
        # An address without a token has a bucket of its own ...
        r = _drain(client, url, {}, spent=1, since=first)
        assert "per client address" in r.json()["detail"]
        # ... which is not another address's, nor any token's.
        assert other.get(url).status_code == 401
        assert client.get(url, headers=limited.headers("admin")).status_code == 200


def test_made_up_tokens_are_charged_to_the_address(limited: Any) -> None:
    url = f"{limited.url}/api/v1/devices"
    with httpx.Client() as client:
        refused = None
        for _ in range(10 * BURST):
            r = client.get(url, headers=_bearer(f"efk_{secrets.token_urlsafe(32)}"))
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]
        assert refused is not None, "a fresh made-up token per request was never limited"
        assert "per client address" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert client.get(url).status_code == 429  # the address is out, token or not
        assert client.get(url, headers=limited.headers("viewer")).status_code == 200


def test_device_and_monitoring_paths_are_not_limited(cloud_with: Any) -> None:
    slow = 0.1  # nothing refills while this test runs: the last call shows the limit held
    running = cloud_with(api_rate_limit=slow, api_rate_burst=BURST)
    viewer = running.headers("viewer")
    with httpx.Client(base_url=running.url) as client:
        _drain(client, "/api/v1/devices", viewer, rate=slow)
        _drain(client, "/api/v1/devices", {}, rate=slow)
        for _ in range(3 * BURST):
            assert client.get("/healthz").status_code == 200
            assert client.get("/tuf/metadata/timestamp.json").status_code == 200
            assert client.get("/tuf/metadata/root.json").status_code == 200
            assert client.get("/metrics", headers=viewer).status_code == 200
            assert client.get("/dashboard/").status_code == 200
            # Enrollment refuses this (no CA, no valid bootstrap token), but never with 429.
            r = client.post("/api/v1/enroll", json={"token": "efb_x", "csr": "x"})
            assert r.status_code in (401, 422, 503), r.text
        assert client.get("/api/v1/devices", headers=viewer).status_code == 429


def test_defaults_leave_room_for_dashboards_and_simulators(cloud: Any) -> None:
    defaults = CloudSettings()
    # The dashboard polls about a dozen routes per refresh (at most every 0.5 s);
    # simulated fleets poll the device list every 0.3 s.
    assert defaults.api_rate_limit >= 30 and defaults.api_rate_burst >= 100
    with httpx.Client(base_url=cloud.url, headers=cloud.headers("viewer")) as client:
        codes = {client.get("/api/v1/devices").status_code for _ in range(100)}
    assert codes == {200}


def test_limit_off_with_zero(cloud_with: Any) -> None:
    running = cloud_with(api_rate_limit=0, api_rate_burst=1)
    with httpx.Client(base_url=running.url, headers=running.headers("viewer")) as client:
        codes = {client.get("/api/v1/devices").status_code for _ in range(20)}
    assert codes == {200}
