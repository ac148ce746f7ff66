"""HTTP transport for TUF that resumes interrupted target downloads with ``Range``.

python-tuf's ngclient downloads a file in one go and has no notion of
resuming. ``ResumableHttpFetcher`` is a ``FetcherInterface`` (plug it into
``ReleaseClient(fetcher=...)``) that keeps what it received of each *target*
in ``<partial dir>/<url basename>.partial``. After a link cut (or a power cut:
the file survives a reboot) the next fetch of the same URL first asks the
server for the rest only (``Range: bytes=<n>-``), then yields the kept bytes
followed by the new ones, so ngclient sees, length-checks and hash-verifies
the *whole* target as always. Nothing here is trusted: a wrong kept byte
makes verification fail (the caller then drops the partials and downloads
from scratch: ``discard_partials``).

Only content-addressed target URLs (basename ``<sha256>.<name>``, the layout
of the cloud repository with ``prefix_targets_with_hash``) are resumed: their
bytes can never change under the same URL. Metadata is fetched whole.

Within one fetch a cut stream is also resumed on the spot, up to
``max_resumes`` times, so a flaky link costs a reconnect, not a retry round.
A server that ignores ``Range`` (answers 200) is read from the start again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

__all__ = ["PARTIAL_SUFFIX", "ResumableHttpFetcher"]

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_CONTENT_ADDRESSED = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: Bytes of a partial file written between two fsyncs (bounds what a power cut loses).
FSYNC_EVERY = 1 << 20


class ResumableHttpFetcher(FetcherInterface):
    """urllib3 transport that resumes target downloads from a partial file."""

    def __init__(
        self,
        partial_dir: Path,
        *,
        timeout: float = 30.0,
        chunk_size: int = 64 * 1024,
        max_resumes: int = 3,
        resume_backoff_s: float = 0.2,
        user_agent: str = "edgefleet-device",
        max_partial_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.partial_dir = Path(partial_dir)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_resumes = max_resumes
        self.resume_backoff_s = resume_backoff_s
        self.max_partial_bytes = max_partial_bytes
        self._headers = {"User-Agent": user_agent}
        self._pools: dict[str | None, urllib3.PoolManager] = {}
        #: Bytes served from partial files / received over the network (tests, logs).
        self.resumed_bytes = 0
        self.received_bytes = 0
        #: Set when a fetch started from kept bytes (a verification failure may be
        #: theirs); the caller resets it.
        self.used_partial = False

    # -- partial files -------------------------------------------------------------
    def partial_path(self, url: str) -> Path | None:
        """Where the kept bytes of ``url`` live, or ``None`` if it is not resumable."""
        name = urlsplit(url).path.rpartition("/")[2]
        if not _CONTENT_ADDRESSED.match(name):
            return None
        return self.partial_dir / (name + PARTIAL_SUFFIX)

    def discard_partials(self) -> None:
        """Forget every kept partial download (after a failed verification, or a commit)."""
        if not self.partial_dir.is_dir():
            return
        for p in self.partial_dir.glob("*" + PARTIAL_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- transport ---------------------------------------------------------------
    def _pool(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy: str | None = None
        if parts.hostname and not urllib.request.proxy_bypass(parts.hostname):
            proxies = urllib.request.getproxies()
            proxy = proxies.get(parts.scheme) or proxies.get("all")
        pool = self._pools.get(proxy)
        if pool is None:
            pool = (
                urllib3.ProxyManager(proxy, headers=self._headers)
                if proxy
                else urllib3.PoolManager(headers=self._headers)
            )
            self._pools[proxy] = pool
        return pool

    def _request(self, url: str, start: int) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            response = self._pool(url).request(
                "GET",
                url,
                headers=headers,
                preload_content=False,
                enforce_content_length=False,
                timeout=urllib3.Timeout(self.timeout),
                # One retry covers a pooled keep-alive connection the server dropped.
                retries=urllib3.Retry(total=1, redirect=0, status=None, raise_on_status=False),
            )
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_errors.SlowRetrievalError(f"{url}: no answer in {self.timeout} s") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_errors.DownloadError(f"{url}: {e}") from e
        if response.status >= 400 and response.status != 416:
            # Its body was never read: back in the pool, that body would be taken for
            # the status line of the next response on the connection. Close it.
            response.close()
            raise tuf_errors.DownloadHTTPError(
                f"HTTP error {response.status} for {url}", response.status
            )
        return response

    def _fetch(self, url: str) -> Iterator[bytes]:
        partial = self.partial_path(url)
        if partial is None:
            response = self._request(url, 0)
            return self._stream(url, response)
        return self._resumable(url, partial)

    def _stream(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        whole = False
        # Content length is checked here, not by urllib3, whose IncompleteRead would
        # discard the last bytes received before a cut: those are worth keeping.
        announced = response.headers.get("Content-Length")
        expected = int(announced) if announced and announced.isdigit() else None
        got = 0
        try:
            for chunk in response.stream(self.chunk_size):
                got += len(chunk)
                self.received_bytes += len(chunk)
                yield chunk
            if expected is not None and got < expected:
                raise tuf_errors.DownloadError(
                    f"the transfer broke off after {got} of {expected} bytes"
                )
            whole = True
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_errors.SlowRetrievalError(f"{url}: stalled") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise tuf_errors.DownloadError(f"the transfer broke off: {e}") from e
        finally:
            if whole:
                response.release_conn()
            else:  # a broken or abandoned connection must not go back to the pool
                response.close()

    def _open_ranged(self, url: str, partial: Path) -> tuple[urllib3.BaseHTTPResponse, int]:
        """A response for the bytes after the kept ones, and how many kept bytes it follows."""
        have = partial.stat().st_size if partial.exists() else 0
        if have > self.max_partial_bytes:
            have = 0
        response = self._request(url, have)
        if have and response.status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                return response, have
            log.warning(
                "%s: asked for bytes=%d-, got %s; starting over",
                url,
                have,
                response.headers.get("Content-Range"),
            )
        elif have and response.status == 416:
            # The kept bytes reach or pass the end: nothing to add. Start over
            # rather than trust them (an over-long file never verifies).
            log.info("%s: kept %d bytes, the server has no more; refetching", url, have)
        elif have:
            log.info(
                "%s: the server ignores Range (status %d); starting over", url, response.status
            )
        if response.status != 200:
            response.release_conn()
            response = self._request(url, 0)
            if response.status != 200:
                response.release_conn()
                raise tuf_errors.DownloadHTTPError(
                    f"HTTP status {response.status} for {url}", response.status
                )
        with open(partial, "wb"):
            pass  # truncate: the kept bytes are replaced by the full response
        return response, 0

    def _resumable(self, url: str, partial: Path) -> Iterator[bytes]:
        partial.parent.mkdir(parents=True, exist_ok=True)
        response, have = self._open_ranged(url, partial)
        if have:
            self.used_partial = True
        # Opening the response first: an unreachable server raises here, in
        # fetch(), before anything was yielded.
        return self._resumable_chunks(url, partial, response, have)

    def _resumable_chunks(
        self, url: str, partial: Path, response: urllib3.BaseHTTPResponse, have: int
    ) -> Iterator[bytes]:
        if have:
            log.info("resuming %s after %d bytes", url, have)
            with open(partial, "rb") as f:
                for block in iter(lambda: f.read(self.chunk_size), b""):
                    self.resumed_bytes += len(block)
                    yield block
        resumes = 0
        with open(partial, "ab") as out:
            unsynced = 0
            while True:
                try:
                    for chunk in self._stream(url, response):
                        out.write(chunk)
                        unsynced += len(chunk)
                        if unsynced >= FSYNC_EVERY:
                            out.flush()
                            os.fsync(out.fileno())
                            unsynced = 0
                        yield chunk
                    break
                except tuf_errors.DownloadError as e:
                    out.flush()
                    if resumes >= self.max_resumes:
                        raise
                    resumes += 1
                    log.warning("%s: %s; resuming (%d/%d)", url, e, resumes, self.max_resumes)
                    time.sleep(self.resume_backoff_s * resumes)
                    response = self._resume_mid_stream(url, out.tell())
        # Whole: ngclient now holds every byte and verifies them. The partial is
        # not needed any more (if verification fails, a fresh download follows).
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()

    def _resume_mid_stream(self, url: str, have: int) -> urllib3.BaseHTTPResponse:
        response = self._request(url, have)
        if have == 0 and response.status == 200:
            return response  # nothing was handed on yet: a plain answer will do
        m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if response.status != 206 or not m or int(m.group(1)) != have:
            response.release_conn()
            # The bytes already handed on cannot be taken back: fail this fetch;
            # the kept file lets the next attempt try again.
            raise tuf_errors.DownloadError(
                f"{url}: the server cannot resume at byte {have} (status {response.status})"
            )
        return response

    def close(self) -> None:
        for pool in self._pools.values():
            pool.clear()
        self._pools.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
