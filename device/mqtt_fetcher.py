"""A ``tuf.ngclient`` fetcher over MQTT 5, for devices that only speak MQTT.

``ReleaseClient(..., MQTT_REPO_URL, fetcher=MqttFetcher(...))`` fetches the
same repository files as over HTTP, one bounded chunk per request: the device
publishes a request (``shared.repo_wire``) on ``.../devices/<id>/repo/req``
with the MQTT 5 response topic ``.../devices/<id>/repo/resp`` and fresh
correlation data, and the cloud's ``MqttRepoServer`` answers there. The broker
ACL lets a device use only its own two repo topics.

Transport only: TUF verifies every byte. The fetcher still bounds what a
hostile server can make it do: each chunk is at most the size it asked for and
must start at the offset it asked for; the total a server announces may not
change nor exceed ``max_file_bytes``; ngclient's ``max_length`` is enforced
while streaming, by the ``FetcherInterface`` base. A cut link does not restart
a file: the fetcher waits for the connection to come back (paho reconnects by
itself) and asks again from the offset it reached; it gives up with a
``DownloadError`` once no byte has arrived for ``stall_timeout`` seconds.

Two ways to build one: ``MqttFetcher.for_session(session)`` shares the agent's
connection (a secure broker allows exactly one connection per device, as the
client id is forced to the certificate CN), ``MqttFetcher.connect(...)`` opens
its own (plain brokers, tools, tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from device.mqtt_session import MqttSession, TlsSettings, tls_context
from device.tuf_client import MAX_TARGET_BYTES
from shared.errors import MessageError
from shared.repo_wire import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    RepoRequest,
    RepoResponse,
    check_repo_path,
    decode_response,
    encode_request,
)
from shared.topics import repo_request_topic, repo_response_topic, validate_device_id

__all__ = ["DEFAULT_STALL_TIMEOUT_S", "MQTT_REPO_URL", "MqttFetcher"]

log = logging.getLogger(__name__)

#: The repository "URL" for ``ReleaseClient`` when fetching over MQTT; the
#: fetcher maps ``<this>/metadata/...`` and ``<this>/targets/...`` to requests.
MQTT_REPO_URL = "mqtt://edgefleet-repo/"
#: One request waits this long for its response before it is sent again.
DEFAULT_REQUEST_TIMEOUT_S = 5.0
#: A download fails once no byte has arrived for this long (link down, server gone).
DEFAULT_STALL_TIMEOUT_S = 60.0
_CORRELATION_BYTES = 16
_POLL_S = 0.05


class _Pending:
    """The slot one request's response lands in."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: RepoResponse | None = None
        self.error: str | None = None


class MqttFetcher(FetcherInterface):
    """Fetches TUF repository files over MQTT 5 request/response (see module doc)."""

    def __init__(
        self,
        client: mqtt.Client,
        device_id: str,
        *,
        base_url: str = MQTT_REPO_URL,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_file_bytes: int = MAX_TARGET_BYTES,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        owns_client: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self.device_id = validate_device_id(device_id)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.chunk_bytes = chunk_bytes
        self.max_file_bytes = max_file_bytes
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self._client = client
        self._owns_client = owns_client
        self._clock = clock
        self._req_topic = repo_request_topic(device_id)
        self._resp_topic = repo_response_topic(device_id)
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Pending] = {}
        self._generation = 0  # bumped on every (re)connect: subscriptions are per connection
        self._subscribed_generation = -1
        #: Counters for tests and telemetry.
        self.requests = 0
        self.retries = 0
        self.stray_responses = 0
        previous = client.on_connect

        def on_connect(*args: Any) -> None:
            with self._lock:
                self._generation += 1
            if previous is not None:
                previous(*args)

        client.on_connect = on_connect
        client.message_callback_add(self._resp_topic, self._on_response)

    # -- construction -----------------------------------------------------------
    @classmethod
    def for_session(cls, session: MqttSession, **options: Any) -> MqttFetcher:
        """A fetcher on the agent's own connection (required on a secure broker)."""
        return cls(session.mqtt_client, session.device_id, **options)

    @classmethod
    def connect(
        cls,
        device_id: str,
        host: str,
        port: int,
        *,
        tls: TlsSettings | None = None,
        client_id: str | None = None,
        timeout: float = 10.0,
        **options: Any,
    ) -> MqttFetcher:
        """A fetcher with its own connection; ``close()`` ends it."""
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id or f"{validate_device_id(device_id)}/repo",
            protocol=mqtt.MQTTv5,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if tls is not None:
            client.tls_set_context(tls_context(tls))
        fetcher = cls(client, device_id, owns_client=True, **options)
        client.connect_async(host, port, keepalive=30, clean_start=True)
        client.loop_start()
        deadline = time.monotonic() + timeout
        while not client.is_connected():
            if time.monotonic() > deadline:
                fetcher.close()
                raise tuf_errors.DownloadError(
                    f"MQTT repository fetcher could not connect to {host}:{port} in {timeout}s"
                )
            time.sleep(_POLL_S)
        return fetcher

    #: Interface of ``ResumableHttpFetcher`` (a drop-in for the agent): the MQTT
    #: fetcher resumes within a fetch and keeps nothing on disk between fetches.
    used_partial = False

    def discard_partials(self) -> None:
        """Nothing to discard: no partial download outlives a fetch."""

    def close(self) -> None:
        """Stop listening for responses; disconnect if the fetcher owns its client."""
        self._client.message_callback_remove(self._resp_topic)
        if self._owns_client:
            self._client.disconnect()
            self._client.loop_stop()

    # -- FetcherInterface ------------------------------------------------------------
    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(self.base_url):
            raise tuf_errors.DownloadHTTPError(
                f"{url} is not under the MQTT repository {self.base_url}", 404
            )
        try:
            path = check_repo_path(url[len(self.base_url) :])
        except MessageError as e:
            raise tuf_errors.DownloadHTTPError(f"{url}: {e}", 400) from e
        # Ask for the first chunk now, so a missing file raises from fetch() itself.
        first = self._chunk(path, 0)
        return self._stream(path, first)

    def _stream(self, path: str, first: RepoResponse) -> Iterator[bytes]:
        total, offset, resp = first.total, 0, first
        if total > self.max_file_bytes:
            raise tuf_errors.DownloadLengthMismatchError(
                f"{path}: the server announces {total} bytes, over this device's limit of "
                f"{self.max_file_bytes}"
            )
        while True:
            if resp.total != total:
                raise tuf_errors.DownloadError(
                    f"{path}: the server changed the file size from {total} to {resp.total} "
                    "mid-download"
                )
            if resp.data:
                offset += len(resp.data)
                yield resp.data
            elif offset < total:
                raise tuf_errors.DownloadError(f"{path}: empty chunk at offset {offset} of {total}")
            if offset >= total:
                return
            resp = self._chunk(path, offset)

    # -- one chunk ---------------------------------------------------------------------
    def _chunk(self, path: str, offset: int) -> RepoResponse:
        """Request ``path`` from ``offset`` until a valid answer arrives or the link stalls."""
        length = self.chunk_bytes
        payload = encode_request(RepoRequest(path=path, offset=offset, length=length))
        last_progress = self._clock()
        attempt = 0
        while True:
            if self._clock() - last_progress > self.stall_timeout:
                raise tuf_errors.SlowRetrievalError(
                    f"{path}: no answer from the MQTT repository for {self.stall_timeout:.0f} s "
                    f"at offset {offset} ({attempt} attempts)"
                )
            if attempt:
                self.retries += 1
            attempt += 1
            if not self._wait_connected(last_progress):
                continue
            resp = self._request(payload)
            if resp is None:
                continue  # timed out: the link may have dropped; ask again
            if resp.status == "busy":
                time.sleep(min(0.1 * attempt, 2.0))
                continue
            if resp.status == "not_found":
                raise tuf_errors.DownloadHTTPError(
                    f"{path}: not in the repository ({resp.message})", 404
                )
            if resp.status == "bad_request":
                raise tuf_errors.DownloadHTTPError(
                    f"{path}: refused by the repository ({resp.message})", 400
                )
            if resp.status != "ok":
                raise tuf_errors.DownloadError(f"{path}: repository error ({resp.message})")
            if resp.offset != offset or len(resp.data) > length:
                raise tuf_errors.DownloadError(
                    f"{path}: asked for {length} bytes at offset {offset}, got {len(resp.data)} "
                    f"at offset {resp.offset}"
                )
            return resp

    def _wait_connected(self, since: float) -> bool:
        """Wait (until the stall deadline) for a connection; subscribe on a new one."""
        while not self._client.is_connected():
            if self._clock() - since > self.stall_timeout:
                return False
            time.sleep(_POLL_S)
        with self._lock:
            generation = self._generation
        if generation != self._subscribed_generation:
            # SUBSCRIBE goes out before the request on the same connection, and the
            # broker handles one client's packets in order: no wait for SUBACK.
            result, _ = self._client.subscribe(self._resp_topic, qos=1)
            if result != mqtt.MQTT_ERR_SUCCESS:
                return False
            self._subscribed_generation = generation
        return True

    def _request(self, payload: bytes) -> RepoResponse | None:
        correlation = os.urandom(_CORRELATION_BYTES)
        slot = _Pending()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self._resp_topic
        props.CorrelationData = correlation
        with self._lock:
            self._pending[correlation] = slot
        try:
            self.requests += 1
            info = self._client.publish(self._req_topic, payload, qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                time.sleep(_POLL_S)
                return None
            if not slot.event.wait(self.request_timeout):
                return None
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        if slot.error is not None:
            raise tuf_errors.DownloadError(
                f"invalid response from the MQTT repository: {slot.error}"
            )
        return slot.response

    # -- paho network thread: never raise ------------------------------------------------
    def _on_response(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            slot = self._pending.get(bytes(correlation)) if correlation else None
        if slot is None:
            self.stray_responses += 1  # late answer to a retried request, or noise
            return
        try:
            slot.response = decode_response(bytes(message.payload))
        except MessageError as e:
            slot.error = str(e)
        slot.event.set()
