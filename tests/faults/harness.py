"""Test harness for the device agent: signed releases, a Range-capable HTTP server
for the TUF repository, and an MQTT controller playing the cloud.

* ``publish_release`` signs a release of ``MODEL`` into a real
  ``cloud.tuf_repo.ReleaseRepository``: a tiny int8 LiteRT model
  (``tests.helpers_models.tiny_tflite``, one signature for every seed),
  self-test vectors computed with the device runtime, and a drift baseline on
  real-valued inputs.
* ``RangeServer`` serves the repository directory like a CDN would: ``Range``
  requests (206), an optional throttle (so a kill lands mid-download) and
  link cuts after ``n`` bytes.
* ``Controller`` publishes retained desired states and collects every event,
  ``reported`` and telemetry message of the devices it watches.
"""

from __future__ import annotations

import functools
import http.server
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from cloud.tuf_repo import ReleaseRepository
from device.runtime import LoadedModel, model_ops
from shared.drift import build_baseline, extract_features, pack_baseline
from shared.manifest import (
    BASELINE_FILE,
    SELFTEST_FILE,
    DeltaBase,
    DriftSpec,
    ReleaseManifest,
    RuntimeNeeds,
    SelfTestSpec,
    target_path,
)
from shared.messages import (
    Desired,
    Event,
    EventKind,
    Message,
    Reported,
    Telemetry,
    decode_device_message,
    encode,
)
from shared.selftest import pack_vectors
from shared.topics import Channel, device_topic
from tests.helpers_models import tiny_tflite

MODEL = "tiny"
SELFTEST_COUNT = 8
DRIFT_BINS = 8
PROXY_VARS = ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]


# -- releases -------------------------------------------------------------------------


@functools.cache
def model_bytes(seed: int) -> bytes:
    return tiny_tflite("int8", seed=seed)


def real_inputs(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


def selftest_for(seed: int) -> bytes:
    """Vectors in the model's input dtype and the outputs this runtime gives on them."""
    return selftest_of(model_bytes(seed))


@functools.cache
def selftest_of(model: bytes) -> bytes:
    with LoadedModel(model) as m:
        inputs = np.concatenate([m.quantize(x) for x in real_inputs(SELFTEST_COUNT)])
        return pack_vectors(inputs, m.run_batch(inputs))


@functools.cache
def baseline_bytes() -> bytes:
    """A drift baseline built on *real* inputs, as the cloud pipeline builds it."""
    return pack_baseline(
        build_baseline(extract_features(real_inputs(512, 3), "flatten"), DRIFT_BINS)
    )


def manifest_for(
    release: int, seed: int, *, deltas: list[DeltaBase] | None = None, ops: list[str] | None = None
) -> ReleaseManifest:
    with LoadedModel(model_bytes(seed)) as m:
        in_spec, out_spec = m.input_spec, m.output_spec
    return ReleaseManifest(
        model=MODEL,
        release=release,
        created_at=1.7e9 + release,
        quantization="int8",
        input=in_spec,
        output=out_spec,
        runtime=RuntimeNeeds(
            ops=ops if ops is not None else sorted(model_ops(model_bytes(seed)) or ())
        ),
        selftest=SelfTestSpec(
            target=target_path(MODEL, release, SELFTEST_FILE),
            count=SELFTEST_COUNT,
            atol=2 * (out_spec.scale or 1e-4),
        ),
        drift=DriftSpec(
            target=target_path(MODEL, release, BASELINE_FILE),
            features="flatten",
            n_features=64,
            bins=DRIFT_BINS,
            n_classes=10,
        ),
        deltas=deltas or [],
    )


def publish_release(
    repo: ReleaseRepository,
    release: int,
    seed: int,
    *,
    vectors_of: int | None = None,
    model: bytes | None = None,
    ops: list[str] | None = None,
    extra: dict[str, bytes] | None = None,
    deltas: list[DeltaBase] | None = None,
) -> ReleaseManifest:
    """Sign release ``release`` of ``MODEL`` with the model of ``seed`` (or ``model``)."""
    manifest = manifest_for(release, seed, deltas=deltas, ops=ops)
    files = {
        manifest.model_target: model if model is not None else model_bytes(seed),
        manifest.selftest.target: selftest_for(vectors_of)
        if vectors_of is not None
        else selftest_of(model if model is not None else model_bytes(seed)),
        target_path(MODEL, release, BASELINE_FILE): baseline_bytes(),
        **(extra or {}),
    }
    repo.publish(files, {manifest.model_target: manifest.to_custom()})
    return manifest


# -- the repository over HTTP -----------------------------------------------------------

_RANGE = re.compile(r"^bytes=(\d+)-$")


class RangeServer:
    """Serves ``root`` over HTTP/1.1 with ``Range`` support, a throttle and link cuts.

    ``rate`` (bytes/s) slows target files; ``cut_after[name] = n`` closes the
    connection after ``n`` bytes of the next response for a path ending in
    ``name`` (once); ``requests`` logs ``(path, range header)``.
    """

    def __init__(self, root: Path, *, rate: float | None = None) -> None:
        self.root = Path(root)
        self.rate = rate
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.lstrip("/").split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                file = (server.root / path).resolve()
                if not file.is_relative_to(server.root.resolve()) or not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                start = 0
                m = _RANGE.match(rng or "")
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = next((k for k in server.cut_after if path.endswith(k)), None)
                limit = server.cut_after.pop(cut) if cut is not None else None
                if limit is not None:
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                slow = server.rate is not None and "/targets/" in f"/{path}"
                step = 512 if slow else len(body) or 1
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    if slow:
                        time.sleep(step / server.rate)  # type: ignore[operator]

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A client killed mid-response is the point of these tests, not an error.
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


# -- the cloud side of MQTT -------------------------------------------------------------


@dataclass
class DeviceLog:
    events: list[Event] = field(default_factory=list)
    reported: list[Reported] = field(default_factory=list)
    telemetry: list[Telemetry] = field(default_factory=list)


class Controller:
    """Publishes desired states and records what devices say (thread-safe)."""

    def __init__(self, port: int, client_id: str = "test-cloud") -> None:
        self.logs: dict[str, DeviceLog] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("edgefleet/v1/devices/+/+", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/desired") or not msg.payload:
            return
        try:
            m: Message = decode_device_message(msg.topic, bytes(msg.payload))
        except Exception:
            return
        with self.cond:
            log = self.logs.setdefault(m.device_id, DeviceLog())
            if isinstance(m, Event):
                log.events.append(m)
            elif isinstance(m, Reported):
                log.reported.append(m)
            elif isinstance(m, Telemetry):
                log.telemetry.append(m)
            self.cond.notify_all()

    def deploy(self, device_id: str, release: int, model: str = MODEL) -> Desired:
        desired = Desired(device_id=device_id, model=model, release=release, issued_at=time.time())
        self.client.publish(
            device_topic(device_id, Channel.DESIRED), encode(desired), qos=1, retain=True
        ).wait_for_publish(timeout=5)
        return desired

    def log(self, device_id: str) -> DeviceLog:
        with self.cond:
            return self.logs.setdefault(device_id, DeviceLog())

    def wait(
        self,
        what: str,
        predicate: Callable[[DeviceLog], bool],
        device_id: str,
        timeout: float = 30.0,
    ) -> DeviceLog:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                log = self.logs.setdefault(device_id, DeviceLog())
                if predicate(log):
                    return log
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [(e.kind.value, e.release) for e in log.events[-20:]]
                    last = log.reported[-1] if log.reported else None
                    raise AssertionError(
                        f"timed out waiting for {what} on {device_id}; "
                        f"events {kinds}; last reported {last}"
                    )
                self.cond.wait(min(left, 0.2))

    def wait_event(
        self, device_id: str, kind: EventKind, release: int, timeout: float = 30.0
    ) -> Event:
        log = self.wait(
            f"{kind.value} of release {release}",
            lambda lg: any(e.kind == kind and e.release == release for e in lg.events),
            device_id,
            timeout,
        )
        return next(e for e in log.events if e.kind == kind and e.release == release)

    def kinds(self, device_id: str, release: int) -> list[str]:
        """Event kinds for ``release`` in order, repeated progress events folded."""
        with self.cond:
            kinds = [e.kind.value for e in self.log(device_id).events if e.release == release]
        return [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]


@contextmanager
def controller(port: int) -> Iterator[Controller]:
    c = Controller(port)
    try:
        yield c
    finally:
        c.close()
