"""The device agent walking the update state machine against a real Mosquitto, a
real TUF repository served over HTTP and real LiteRT models.

Each test starts an in-process ``Agent`` (its own data dir, broker and
repository); the ``Controller`` plays the cloud. Probation is shortened to
fractions of a second through the agent's config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import device.agent as agent_mod
from cloud.broker import MosquittoProcess
from cloud.tuf_repo import ReleaseRepository
from device.agent import Agent
from device.config import load_config, provision
from device.inputs import RandomSource
from device.runtime import LoadedModel
from device.store import SlotStore
from shared.errors import StorageError
from shared.messages import EventKind, UpdateState
from tests.faults.harness import (
    MODEL,
    PROXY_VARS,
    Controller,
    RangeServer,
    controller,
    publish_release,
)

pytestmark = pytest.mark.integration

DEVICE = "dev-agent"
FULL_CYCLE = [
    "offered",
    "downloading",
    "verified",
    "staged",
    "selftest",
    "swapped",
    "probation_passed",
    "committed",
]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    publish_release(repo, 1, seed=0)
    publish_release(repo, 2, seed=1)
    return repo


@pytest.fixture
def served(repo: ReleaseRepository) -> Iterator[RangeServer]:
    with RangeServer(repo.repo_dir) as server:
        yield server


@pytest.fixture
def ctl(broker: MosquittoProcess) -> Iterator[Controller]:
    with controller(broker.port) as c:
        yield c


def make_agent(
    tmp_path: Path, broker: MosquittoProcess, repo: ReleaseRepository, url: str, **overrides: Any
) -> Agent:
    data = tmp_path / "device"
    if not (data / "agent.toml").exists():
        root = tmp_path / "root.json"
        root.write_bytes(repo.root_bytes())
        provision(
            data,
            device_id=DEVICE,
            root_file=root,
            broker_host="127.0.0.1",
            broker_port=broker.port,
            repo_url=url,
            inference_interval=0.001,
            telemetry_interval=0.5,
            inference_threads=2,
        )
    settings: dict[str, Any] = {
        "retry_min": 0.2,
        "retry_max": 1.0,
        "probation_s": 0.5,
        "probation_min_inferences": 50,
        "probation_max_s": 5.0,
    }
    settings.update(overrides)
    cfg = dataclasses.replace(load_config(data), **settings)
    return Agent(cfg, RandomSource(seed=1))


@pytest.fixture
def running(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
) -> Iterator[Agent]:
    """An agent serving release 1."""
    agent = make_agent(tmp_path, broker, repo, served.url)
    agent.start()
    try:
        ctl.deploy(DEVICE, 1)
        ctl.wait_event(DEVICE, EventKind.COMMITTED, 1)
        yield agent
    finally:
        agent.stop()


def wait_inferences(agent: Agent, more: int = 30, timeout: float = 10.0) -> None:
    start = agent.server.inferences
    deadline = time.monotonic() + timeout
    while agent.server.inferences < start + more:
        assert time.monotonic() < deadline, "inferences stopped"
        time.sleep(0.01)


def test_update_walks_every_state_with_probation_and_commits(
    running: Agent, ctl: Controller, tmp_path: Path
) -> None:
    # A first install has nothing to roll back to: no probation.
    assert ctl.kinds(DEVICE, 1) == [k for k in FULL_CYCLE if k != "probation_passed"]
    ctl.deploy(DEVICE, 2)
    ctl.wait_event(DEVICE, EventKind.COMMITTED, 2)
    assert ctl.kinds(DEVICE, 2) == FULL_CYCLE
    assert running.running_manifest is not None and running.running_manifest.release == 2
    assert running.server.errors == 0
    states = [r.state.value for r in ctl.log(DEVICE).reported if r.target_release == 2]
    assert "probation" in states
    ctl.wait(
        "idle report",
        lambda lg: lg.reported[-1].state == UpdateState.IDLE and lg.reported[-1].release == 2,
        DEVICE,
    )
    journal = json.loads((tmp_path / "device" / "update.json").read_text())
    assert journal["state"] == "idle" and journal["target"] is None
    pointer = json.loads((tmp_path / "device" / "slots.json").read_text())
    assert pointer["previous"] is not None and pointer["active"] != pointer["previous"]
    assert not any((tmp_path / "device" / "download").glob("tiny-*"))
    wait_inferences(running)


class _Failing(LoadedModel):
    """Release 2 passes its self-test but fails (or crawls) on real traffic."""

    mode = "errors"

    def _try_run(self, x: np.ndarray) -> np.ndarray | None:
        if self.meta.release == 2:
            if _Failing.mode == "errors":
                raise RuntimeError("simulated kernel failure")
            time.sleep(0.01)
        return super()._try_run(x)


@pytest.mark.parametrize(
    "mode,code", [("errors", "probation_errors"), ("slow", "probation_latency")]
)
def test_failed_probation_rolls_back_and_rejects_the_release(
    running: Agent,
    ctl: Controller,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    code: str,
) -> None:
    wait_inferences(running, 200)  # a latency reference for the previous model
    monkeypatch.setattr(agent_mod, "LoadedModel", _Failing)
    monkeypatch.setattr(_Failing, "mode", mode)
    slot_v1 = running._running.slot  # type: ignore[union-attr]
    ctl.deploy(DEVICE, 2)
    event = ctl.wait_event(DEVICE, EventKind.ROLLED_BACK, 2, timeout=30)
    assert event.reason is not None and event.reason.code == code, event.reason
    assert "probation_passed" not in ctl.kinds(DEVICE, 2)
    assert running.running_manifest is not None and running.running_manifest.release == 1
    assert running.state == UpdateState.ROLLED_BACK
    store = SlotStore(tmp_path / "device")
    assert store.state().active == slot_v1
    assert store.read(store.other(slot_v1)) is None, "the rolled-back slot is invalidated"
    ctl.wait(
        "rolled_back report",
        lambda lg: (
            lg.reported[-1].state == UpdateState.ROLLED_BACK
            and lg.reported[-1].last_error is not None
            and lg.reported[-1].last_error.code == code
        ),
        DEVICE,
    )
    # The same desired state is not retried ...
    time.sleep(1.0)
    assert ctl.kinds(DEVICE, 2).count("offered") == 1
    wait_inferences(running)
    # ... a re-issued one is.
    monkeypatch.setattr(agent_mod, "LoadedModel", LoadedModel)
    ctl.deploy(DEVICE, 2)
    ctl.wait(
        "a second attempt",
        lambda lg: sum(e.kind == EventKind.COMMITTED and e.release == 2 for e in lg.events) == 1,
        DEVICE,
        timeout=30,
    )


def test_downgrade_refused_and_model_keeps_serving(running: Agent, ctl: Controller) -> None:
    ctl.deploy(DEVICE, 2)
    ctl.wait_event(DEVICE, EventKind.COMMITTED, 2)
    ctl.deploy(DEVICE, 1)
    event = ctl.wait_event(DEVICE, EventKind.FAILED, 1)
    assert event.reason is not None and event.reason.code == "downgrade_refused"
    assert running.running_manifest is not None and running.running_manifest.release == 2
    wait_inferences(running)


def test_incompatible_ops_refused_before_download(
    running: Agent, ctl: Controller, repo: ReleaseRepository, served: RangeServer
) -> None:
    publish_release(repo, 3, seed=1, ops=["CONV_2D", "EDGEFLEET_NO_SUCH_OP"])
    ctl.deploy(DEVICE, 3)
    event = ctl.wait_event(DEVICE, EventKind.FAILED, 3)
    assert event.reason is not None and event.reason.code == "incompatible"
    assert "EDGEFLEET_NO_SUCH_OP" in event.reason.message
    assert "downloading" not in ctl.kinds(DEVICE, 3)
    assert not any("/3/" in p and "model.tflite" in p for p, _ in served.requests)


def test_full_disk_fails_softly_then_the_retry_succeeds(
    running: Agent, ctl: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    import device.store as store_mod

    real = store_mod.atomic_write_bytes
    full = {"on": True}

    def write(path: Path, data: bytes) -> None:
        if full["on"] and path.name == "model.tflite":
            raise StorageError(f"could not write {path}: disk full")
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", write)
    ctl.deploy(DEVICE, 2)
    event = ctl.wait_event(DEVICE, EventKind.FAILED, 2)
    assert event.reason is not None and event.reason.code == "storage_failed"
    assert "disk full" in event.reason.message
    assert running.running_manifest is not None and running.running_manifest.release == 1
    wait_inferences(running)
    full["on"] = False  # space freed: the retry (backoff) installs it
    ctl.wait_event(DEVICE, EventKind.COMMITTED, 2, timeout=30)


def test_link_cut_mid_download_resumes_with_range(
    running: Agent, ctl: Controller, served: RangeServer
) -> None:
    served.cut_after["model.tflite"] = 2000
    ctl.deploy(DEVICE, 2)
    ctl.wait_event(DEVICE, EventKind.COMMITTED, 2)
    ranged = [(p, r) for p, r in served.requests if "/2/" in p and p.endswith("model.tflite")]
    assert ranged[-1][1] == "bytes=2000-", served.requests
    assert running.updater.fetcher.resumed_bytes == 0  # resumed mid-stream, not from disk


def test_restart_resumes_download_from_partial_file(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
) -> None:
    agent = make_agent(tmp_path, broker, repo, served.url)
    info = repo.list_targets()[f"{MODEL}/1/model.tflite"]
    blob = repo.targets_dir / MODEL / "1" / f"{info.hashes['sha256']}.model.tflite"
    partial = agent.updater.fetcher.partial_path(f"{served.url}targets/{MODEL}/1/{blob.name}")
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(blob.read_bytes()[:3000])  # what a power cut left
    agent.start()
    try:
        ctl.deploy(DEVICE, 1)
        ctl.wait_event(DEVICE, EventKind.COMMITTED, 1)
        assert agent.updater.fetcher.resumed_bytes == 3000
        assert (f"targets/{MODEL}/1/{blob.name}", "bytes=3000-") in served.requests
        assert not partial.exists()
    finally:
        agent.stop()


def test_corrupt_partial_file_is_dropped_and_fetched_again(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
) -> None:
    agent = make_agent(tmp_path, broker, repo, served.url)
    info = repo.list_targets()[f"{MODEL}/1/model.tflite"]
    name = f"{info.hashes['sha256']}.model.tflite"
    partial = agent.updater.fetcher.partial_path(f"{served.url}targets/{MODEL}/1/{name}")
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\x00" * 3000)  # garbage, not the model's first bytes
    agent.start()
    try:
        ctl.deploy(DEVICE, 1)
        ctl.wait_event(DEVICE, EventKind.COMMITTED, 1)
        assert "failed" not in ctl.kinds(DEVICE, 1)
    finally:
        agent.stop()


def test_telemetry_windows_carry_histograms_not_inputs(running: Agent, ctl: Controller) -> None:
    log = ctl.wait(
        "telemetry with histograms",
        lambda lg: any(t.input_rows() and t.inferences > 20 for t in lg.telemetry),
        DEVICE,
    )
    t = next(t for t in log.telemetry if t.input_rows() and t.inferences > 20)
    assert t.model == MODEL and t.release == 1
    assert t.latency is not None and t.latency.p50_ms <= t.latency.p95_ms <= t.latency.p99_ms
    assert t.cpu_percent is not None and t.rss_bytes and t.rss_bytes > 0
    # Sent packed (the agent's default), one byte per count for a window this small.
    assert t.input_hist is None and t.input_hist_packed is not None
    assert t.input_hist_packed.dtype in ("u1", "u2")
    rows = t.input_rows()
    assert rows is not None and len(rows) == 64 and all(len(row) == 8 for row in rows)
    # Real-valued uniform [0, 1) inputs on a baseline of the same distribution: every
    # bin gets samples (a histogram of quantized int8 values would not).
    counts = np.asarray(rows)
    assert counts.sum(axis=1).min() > 0 and (counts > 0).mean() > 0.9
    assert t.output_hist is not None and sum(t.output_hist) > 0
    fields = set(t.model_dump())
    assert not fields & {"inputs", "x", "samples"}
