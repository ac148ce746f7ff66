"""Delta updates: the cloud publishes signed bsdiff4+zstd deltas, the device patches
its running model, checks the result against the full model's signed hashes, and
falls back to the full download whenever the delta does not work out."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.broker import MosquittoProcess
from cloud.deltas import add_deltas, delta_target, make_delta
from cloud.tuf_repo import ReleaseRepository
from device._delta import patch_bytes
from device.agent import Agent
from device.config import load_config, provision
from device.inputs import RandomSource
from shared.manifest import DeltaBase
from shared.messages import EventKind
from tests.faults.harness import (
    MODEL,
    PROXY_VARS,
    Controller,
    RangeServer,
    controller,
    manifest_for,
    model_bytes,
    publish_release,
)
from tests.helpers_models import mutate_tflite

pytestmark = pytest.mark.integration
DEVICE = "dev-delta"


def tweaked(seed: int) -> bytes:
    """The model of ``seed`` with one weight changed: what a fine-tune often is."""

    def change(tree: Any, schema: Any) -> None:
        buf = max(tree.buffers, key=lambda b: 0 if b.data is None else len(b.data))
        data = buf.data.copy()
        data[len(data) // 2] ^= 0x01
        buf.data = data

    return mutate_tflite(model_bytes(seed), change)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    publish_release(repo, 1, seed=0)
    return repo


@pytest.fixture
def device(
    tmp_path: Path, broker: MosquittoProcess, repo: ReleaseRepository
) -> Iterator[tuple[Agent, Controller, RangeServer]]:
    with RangeServer(repo.repo_dir) as served, controller(broker.port) as ctl:
        root = tmp_path / "root.json"
        root.write_bytes(repo.root_bytes())
        data = tmp_path / "device"
        provision(
            data,
            device_id=DEVICE,
            root_file=root,
            broker_host="127.0.0.1",
            broker_port=broker.port,
            repo_url=served.url,
            inference_interval=0.002,
            telemetry_interval=3600.0,
            probation_s=0.2,
            probation_min_inferences=10,
        )
        agent = Agent(dataclasses.replace(load_config(data), retry_min=0.2), RandomSource())
        agent.start()
        try:
            ctl.deploy(DEVICE, 1)
            ctl.wait_event(DEVICE, EventKind.COMMITTED, 1)
            yield agent, ctl, served
        finally:
            agent.stop()


def _model_requests(served: RangeServer, release: int) -> list[str]:
    return [p for p, _ in served.requests if f"/{release}/" in p and p.endswith(".model.tflite")]


def test_cloud_publishes_small_deltas_from_earlier_releases(repo: ReleaseRepository) -> None:
    new = tweaked(0)
    manifest, files = add_deltas(repo, manifest_for(2, 0), new)
    assert [d.from_release for d in manifest.deltas] == [1]
    delta = files[delta_target(MODEL, 2, 1)]
    assert len(delta) < len(new) // 4
    assert patch_bytes(model_bytes(0), delta, len(new)) == new
    # Nothing to diff against: no deltas, and no error.
    manifest, files = add_deltas(repo, manifest_for(9, 0), new, bases=2)
    assert manifest.deltas == [] and files == {}


def test_device_patches_running_model_instead_of_downloading(
    device: tuple[Agent, Controller, RangeServer], repo: ReleaseRepository
) -> None:
    agent, ctl, served = device
    new = tweaked(0)
    path = delta_target(MODEL, 2, 1)
    publish_release(
        repo,
        2,
        seed=0,
        model=new,
        extra={path: make_delta(model_bytes(0), new)},
        deltas=[DeltaBase(from_release=1, target=path)],
    )
    ctl.deploy(DEVICE, 2)
    ctl.wait_event(DEVICE, EventKind.COMMITTED, 2)
    assert any(p.endswith(".model.from-1.bsdiff4.zst") for p, _ in served.requests)
    assert _model_requests(served, 2) == [], "the full model must not be downloaded"
    assert agent._running is not None and agent._running.model_path.read_bytes() == new


def test_broken_delta_falls_back_to_the_full_model(
    device: tuple[Agent, Controller, RangeServer], repo: ReleaseRepository
) -> None:
    agent, ctl, served = device
    new = tweaked(0)
    path = delta_target(MODEL, 2, 1)
    wrong = make_delta(model_bytes(1), new)  # signed, but against another base
    publish_release(
        repo,
        2,
        seed=0,
        model=new,
        extra={path: wrong},
        deltas=[DeltaBase(from_release=1, target=path)],
    )
    ctl.deploy(DEVICE, 2)
    ctl.wait_event(DEVICE, EventKind.COMMITTED, 2)
    assert len(_model_requests(served, 2)) == 1, "fell back to the full model"
    assert "failed" not in ctl.kinds(DEVICE, 2)
    assert agent._running is not None and agent._running.model_path.read_bytes() == new
