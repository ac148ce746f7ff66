"""The device-under-attack harness: releases, the attacker's repository server,
and a real device agent with the cloud's MQTT session watching it.

Fixtures that build these live in ``conftest.py``; tests import the helpers
from here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cloud.mqtt_bridge import CloudMqtt
from cloud.tuf_repo import ReleaseRepository
from device.agent import Agent
from device.config import create_csr, install_certificate, load_config, provision
from device.inputs import RandomSource
from device.runtime import LoadedModel, model_ops
from shared.manifest import SELFTEST_FILE, ReleaseManifest, RuntimeNeeds, SelfTestSpec, target_path
from shared.messages import Desired, ErrorInfo, Event, EventKind, Message
from shared.selftest import pack_vectors
from tests.attacks.secure_env import SecureBroker
from tests.helpers_models import custom_op_tflite, tiny_tflite

MODEL = "tiny"
DEVICE_ID = "dev-victim"
SELFTEST_COUNT = 8
PROXY_VARS = ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]


# -- releases ---------------------------------------------------------------------------


@functools.cache
def model_bytes(kind: str) -> bytes:
    """``good-0``/``good-1``/``good-2``: three float32 models of one signature;
    ``custom-op``: one whose first op no runtime has."""
    if kind == "custom-op":
        return custom_op_tflite("float32")
    return tiny_tflite("float32", seed=int(kind.rsplit("-", 1)[1]))


@functools.cache
def selftest_for(kind: str) -> bytes:
    """Signed self-test vectors: inputs and the outputs ``kind`` gives on them."""
    inputs = np.random.default_rng(7).random((SELFTEST_COUNT, 8, 8, 1), dtype=np.float32)
    with LoadedModel(model_bytes(kind)) as m:
        return pack_vectors(inputs, m.run_batch(inputs))


def publish_release(
    repo: ReleaseRepository,
    release: int,
    *,
    model: str = "good-0",
    vectors_of: str | None = None,
    now: datetime | None = None,
) -> ReleaseManifest:
    """Sign and publish release ``release`` of ``MODEL``: ``model``'s bytes with the
    self-test vectors of ``vectors_of`` (default: the same model)."""
    with LoadedModel(model_bytes("good-0")) as ref:  # every kind shares this signature
        in_spec, out_spec = ref.input_spec, ref.output_spec
    ops = model_ops(model_bytes(model)) or frozenset()
    manifest = ReleaseManifest(
        model=MODEL,
        release=release,
        created_at=time.time(),
        quantization="float32",
        input=in_spec,
        output=out_spec,
        runtime=RuntimeNeeds(ops=sorted(ops)),
        selftest=SelfTestSpec(
            target=target_path(MODEL, release, SELFTEST_FILE),
            count=SELFTEST_COUNT,
            atol=1e-4,
            rtol=1e-4,
        ),
    )
    repo.publish(
        {
            manifest.model_target: model_bytes(model),
            manifest.selftest.target: selftest_for(vectors_of or model),
        },
        {manifest.model_target: manifest.to_custom()},
        now=now,
    )
    return manifest


def blob_path(
    repo_dir: Path, repo: ReleaseRepository, release: int, name: str = "model.tflite"
) -> Path:
    """Where target ``<MODEL>/<release>/<name>`` lies under a copy ``repo_dir`` of the repo."""
    info = repo.list_targets()[target_path(MODEL, release, name)]
    return repo_dir / "targets" / MODEL / str(release) / f"{info.hashes['sha256']}.{name}"


# -- the attacker's repository server ---------------------------------------------------


class RepoServer:
    """Serves ``root`` (a copy of the repository) over HTTP; the attacker edits it.

    ``replace[path] = bytes`` answers ``path`` with other bytes; ``cut[path] = n``
    announces the whole file but closes the connection after ``n`` bytes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.replace: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.lstrip("/").split("?")[0]
                server.requests.append(path)
                data = server.replace.get(path)
                if data is None:
                    file = (server.root / path).resolve()
                    if not file.is_relative_to(server.root.resolve()) or not file.is_file():
                        self.send_error(404)
                        return
                    data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                n = server.cut.get(path)
                self.wfile.write(data if n is None else data[:n])
                if n is not None:
                    self.close_connection = True

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a device hanging up on a hostile stream is the point, not noise

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def sync(self, repo: ReleaseRepository) -> None:
        """Mirror the cloud's repository as it is now."""
        shutil.copytree(repo.repo_dir, self.root, dirs_exist_ok=True)

    def tamper(self, path: Path, change: Callable[[bytes], bytes]) -> None:
        path.write_bytes(change(path.read_bytes()))


# -- the device under attack ------------------------------------------------------------


@dataclass
class CloudSession:
    """The cloud's MQTT session and who listens to what it ingests."""

    mqtt: CloudMqtt
    listeners: list[Callable[[Message, float], None]] = field(default_factory=list)

    def dispatch(self, msg: Message, ts: float) -> None:
        for listener in list(self.listeners):
            listener(msg, ts)


@dataclass
class DeviceUnderAttack:
    agent: Agent
    cloud: CloudMqtt
    data_dir: Path
    device_id: str = DEVICE_ID
    messages: list[Message] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, msg: Message, ts: float) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def deploy(self, release: int) -> Desired:
        """The cloud sets the device's desired release (retained, as in production)."""
        desired = Desired(
            device_id=self.device_id, model=MODEL, release=release, issued_at=time.time()
        )
        self.cloud.publish_desired(desired)
        return desired

    def wait_event(self, kind: EventKind, release: int, timeout: float = 60.0) -> Event:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.messages:
                    if isinstance(m, Event) and m.kind == kind and m.release == release:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [
                        (m.kind.value, m.release) for m in self.messages if isinstance(m, Event)
                    ]
                    raise AssertionError(
                        f"no {kind.value} event for release {release} in {timeout}s; events: {seen}"
                    )
                self.cond.wait(left)

    def install(self, release: int) -> None:
        self.deploy(release)
        self.wait_event(EventKind.COMMITTED, release)
        manifest = self.agent.running_manifest
        assert manifest is not None and manifest.release == release

    def attack(self, release: int) -> ErrorInfo:
        """Deploy ``release`` and return the reason the device gives for refusing it."""
        self.deploy(release)
        event = self.wait_event(EventKind.FAILED, release)
        assert event.reason is not None, "a refusal must carry its reason"
        return event.reason

    def snapshot(self) -> dict[str, str]:
        """SHA-256 of every file of the A/B slots and of the slot pointer."""
        files = sorted(p for p in (self.data_dir / "slots").rglob("*") if p.is_file())
        pointer = self.data_dir / "slots.json"
        if pointer.exists():
            files.append(pointer)
        return {
            str(p.relative_to(self.data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files
        }

    def assert_still_serving(self, release: int, more: int = 20, timeout: float = 10.0) -> None:
        """The running release is unchanged and keeps answering inferences."""
        manifest = self.agent.running_manifest
        assert manifest is not None and manifest.release == release, (
            f"running {manifest and manifest.release}, expected release {release}"
        )
        start = self.agent.server.inferences
        deadline = time.monotonic() + timeout
        while self.agent.server.inferences < start + more:
            assert time.monotonic() < deadline, "inferences stopped"
            time.sleep(0.02)

    def assert_untouched(self, before: dict[str, str], release: int) -> None:
        """The device still serves ``release`` and nothing in its slots changed."""
        self.assert_still_serving(release)
        assert self.snapshot() == before, "the slots or the slot pointer changed on disk"


def start_device(
    tmp: Path,
    *,
    port: int,
    repo: ReleaseRepository,
    repo_url: str,
    cloud: CloudSession,
    secure: SecureBroker | None,
    device_id: str = DEVICE_ID,
) -> DeviceUnderAttack:
    """Provision (and, on a secure broker, enroll) a device and start its agent."""
    data_dir = tmp / "device"
    root = tmp / "root.json"
    root.write_bytes(repo.root_bytes())
    provision(
        data_dir,
        device_id=device_id,
        root_file=root,
        broker_host="127.0.0.1",
        broker_port=port,
        repo_url=repo_url,
        inference_interval=0.002,
        telemetry_interval=3600.0,
    )
    if secure is not None:
        cert = secure.ca.sign_device_csr(create_csr(data_dir), device_id=device_id)
        install_certificate(data_dir, cert, secure.ca.ca_cert_pem())
    cfg = load_config(data_dir)
    # Quick retries and a short probation keep the suite fast (fields the agent has).
    fast = {
        "retry_min": 0.2,
        "retry_max": 1.0,
        "probation_s": 0.3,
        "probation_min_inferences": 5,
        "probation_max_s": 5.0,
    }
    names = {f.name for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fast.items() if k in names})
    dev = DeviceUnderAttack(
        agent=Agent(cfg, RandomSource()), cloud=cloud.mqtt, data_dir=data_dir, device_id=device_id
    )
    cloud.listeners.append(dev.on_message)
    dev.agent.start()
    return dev


def cloud_session(port: int, *, tls: dict[str, str] | None = None) -> CloudSession:
    """A started cloud MQTT session that sees every device message (no share group)."""
    session = CloudSession(mqtt=None)  # type: ignore[arg-type]
    session.mqtt = CloudMqtt(
        "127.0.0.1",
        port,
        on_message=session.dispatch,
        tls=tls,
        client_id="edgefleet-cloud",
        share_group=None,
    )
    session.mqtt.start()
    return session
