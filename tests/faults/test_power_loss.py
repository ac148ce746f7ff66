"""Power loss at any instant of an update never leaves a device without a valid model.

Real agent processes (forked from ``agent_zygote.py``: same code as
``edgefleet-device run``, started in milliseconds) update through releases
signed into a real TUF repository, served over HTTP with ``Range`` and a
throttle (so a cut lands mid-download), with a real Mosquitto carrying the
desired state. Each release cycle picks random update states; when a device's
journal (``update.json``) shows one, the test waits a random moment (inside
the state's ``EDGEFLEET_FAULT_DELAY_<STATE>`` pause, or into the work that
follows it) and SIGKILLs the agent. After every kill:

* every slot that claims to be valid is (its ``slot.json`` matches the model's
  SHA-256), and the slot pointer names only valid slots;
* the restarted agent serves a valid model (a telemetry window of the new
  process counts inferences of the old or the new release);
* and the update then completes (journal idle, the pointer on the new
  release) or is cleanly abandoned (``failed``/``rolled_back`` with a reason,
  the old release serving).

``EDGEFLEET_POWER_LOSS_KILLS`` (default 200) sets how many kills in all.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloud.broker import MosquittoProcess
from cloud.tuf_repo import ReleaseRepository
from device.config import provision
from device.store import SLOTS, SlotStore
from shared.messages import EventKind
from tests.faults.harness import PROXY_VARS, Controller, RangeServer, controller, publish_release

pytestmark = [pytest.mark.slow]

KILLS = int(os.environ.get("EDGEFLEET_POWER_LOSS_KILLS", "200"))
DEVICES = 2
SEEDS = 3
#: Pause at each state entry, long enough for the test to see it and aim into it.
DELAY_S = 0.03
KILL_STATES = [
    "offered",
    "downloading",
    "verified",
    "staged",
    "selftest",
    "swapped",
    "probation",
    "committed",
]
MODEL_STATES = {"staged", "selftest", "swapped", "probation"}
ZYGOTE = Path(__file__).with_name("agent_zygote.py")


class Zygote:
    """Client of ``agent_zygote.py`` (one per device: they run in parallel)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env["OPENBLAS_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def call(self, **cmd: object) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the agent fork server died"
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@dataclass
class Device:
    device_id: str
    data_dir: Path
    zygote: Zygote
    log: Path
    pid: int | None = None
    kills: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)

    def start(self) -> None:
        env = {f"EDGEFLEET_FAULT_DELAY_{s.upper()}": str(DELAY_S) for s in KILL_STATES}
        self.pid = int(
            self.zygote.call(op="start", data_dir=str(self.data_dir), log=str(self.log), env=env)[
                "pid"
            ]
        )  # type: ignore[arg-type]

    def kill(self) -> None:
        assert self.pid is not None
        self.zygote.call(op="kill", pid=self.pid)
        self.pid = None

    def stop(self) -> None:
        if self.pid is not None:
            self.zygote.call(op="stop", pid=self.pid)
            self.pid = None

    def journal(self) -> dict[str, object]:
        try:
            return dict(json.loads((self.data_dir / "update.json").read_bytes()))
        except (OSError, ValueError):
            return {}

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


def check_disk(dev: Device) -> int | None:
    """No slot claims validity it does not have; the pointer names valid slots only.
    Returns the release the pointer's active slot holds."""
    store = SlotStore(dev.data_dir)
    for slot in SLOTS:
        meta = dev.data_dir / "slots" / slot / "slot.json"
        if meta.exists():
            assert store.read(slot) is not None, f"{dev.device_id}: slot {slot} is corrupt"
    pointer = store.state()
    held = None
    for role, slot in (("active", pointer.active), ("previous", pointer.previous)):
        if slot is not None:
            contents = store.read(slot)
            assert contents is not None, (
                f"{dev.device_id}: the pointer's {role} slot {slot} is not valid"
            )
            if role == "active":
                held = contents.manifest.release
    return held


def wait_serving(dev: Device, ctl: Controller, since: float, releases: set[int]) -> None:
    """The restarted process serves one of ``releases`` (its own telemetry says so)."""
    try:
        ctl.wait(
            "serving after restart",
            lambda lg: any(
                t.window_end >= since and t.inferences > 0 and t.release in releases
                for t in lg.telemetry
            ),
            dev.device_id,
            timeout=20,
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{dev.tail()}") from None


def wait_state(dev: Device, index: int, release: int, timeout: float = 20.0) -> int | None:
    """Wait until the journal is in ``KILL_STATES[index]`` for ``release``; returns the
    index reached, or None if the update ended (or passed the state) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = dev.journal()
        target = j.get("target") or {}
        state = j.get("state")
        if isinstance(target, dict) and target.get("release") == release and state in KILL_STATES:
            at = KILL_STATES.index(str(state))
            if at >= index:
                return at
        elif state in ("idle", "failed", "rolled_back") and finished(dev, release):
            return None
        time.sleep(0.002)
    raise AssertionError(
        f"{dev.device_id} never reached {KILL_STATES[index]} of release "
        f"{release}; journal {dev.journal()}\n{dev.tail()}"
    )


def finished(dev: Device, release: int) -> str | None:
    """``committed`` / ``abandoned`` once the update to ``release`` is over."""
    j = dev.journal()
    target = j.get("target") or {}
    state = j.get("state")
    if state == "idle" and check_disk(dev) == release:
        return "committed"
    if (
        state in ("failed", "rolled_back")
        and isinstance(target, dict)
        and target.get("release") == release
        and check_disk(dev) != release
    ):
        # (A rollback persists its state first, then moves the pointer back.)
        assert j.get("reason"), "an abandoned update names its reason"
        return "abandoned"
    return None


def run_device(
    dev: Device, ctl: Controller, kills: int, first: int, last: int, rng: random.Random
) -> None:
    dev.start()
    ctl.deploy(dev.device_id, 1)
    deadline = time.monotonic() + 30
    while finished(dev, 1) != "committed":
        assert time.monotonic() < deadline, f"release 1 not installed\n{dev.tail()}"
        time.sleep(0.02)
    serving = 1
    release = first
    while sum(dev.kills.values()) < kills:
        assert release <= last, "ran out of releases"
        ctl.deploy(dev.device_id, release)
        plan = sorted(rng.sample(range(len(KILL_STATES)), rng.randint(1, 4)))
        for index in plan:
            if sum(dev.kills.values()) >= kills:
                break
            at = wait_state(dev, index, release)
            if at is None:
                break
            time.sleep(rng.uniform(0, DELAY_S * 1.6))
            state = str(dev.journal().get("state"))
            dev.kill()
            dev.kills[state] += 1
            held = check_disk(dev)
            assert held in (serving, release), f"pointer on release {held}"
            since = time.time()
            dev.start()
            wait_serving(dev, ctl, since, {serving, release})
        deadline = time.monotonic() + 30
        while (outcome := finished(dev, release)) is None:
            assert time.monotonic() < deadline, (
                f"release {release} neither completed nor abandoned: {dev.journal()}\n{dev.tail()}"
            )
            time.sleep(0.01)
        dev.outcomes[outcome] += 1
        if outcome == "committed":
            serving = release
        assert check_disk(dev) == serving
        release += 1
    dev.stop()


@pytest.fixture
def fleet_repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    for release in range(1, 2 + KILLS // DEVICES + 2):
        publish_release(repo, release, seed=release % SEEDS)
    return repo


def provision_devices(
    tmp_path: Path, broker: MosquittoProcess, repo: ReleaseRepository, url: str
) -> list[Path]:
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes())
    dirs = []
    for i in range(DEVICES):
        data = tmp_path / f"dev-{i}"
        provision(
            data,
            device_id=f"dev-pl-{i}",
            root_file=root,
            broker_host="127.0.0.1",
            broker_port=broker.port,
            repo_url=url,
            inference_interval=0.002,
            telemetry_interval=0.1,
            inference_threads=2,
            probation_s=0.15,
            probation_min_inferences=10,
            probation_max_s=2.0,
            # Latency is not what this test is about: a busy CI machine must
            # not turn into rollbacks.
            probation_max_latency_ratio=1000.0,
        )
        dirs.append(data)
    return dirs


@pytest.fixture
def zygotes() -> Iterator[list[Zygote]]:
    zs = [Zygote() for _ in range(DEVICES)]
    try:
        yield zs
    finally:
        for z in zs:
            z.close()


def test_power_loss_in_every_state_never_corrupts_or_strands(
    tmp_path: Path,
    broker: MosquittoProcess,
    fleet_repo: ReleaseRepository,
    zygotes: list[Zygote],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with RangeServer(fleet_repo.repo_dir, rate=40_000) as served, controller(broker.port) as ctl:
        dirs = provision_devices(tmp_path, broker, fleet_repo, served.url)
        devices = [
            Device(f"dev-pl-{i}", d, zygotes[i], tmp_path / f"dev-{i}.log")
            for i, d in enumerate(dirs)
        ]
        per = KILLS // DEVICES
        errors: list[BaseException] = []
        t0 = time.monotonic()

        def worker(i: int) -> None:
            try:
                run_device(
                    devices[i],
                    ctl,
                    per + (KILLS % DEVICES if i == 0 else 0),
                    2,
                    2 + KILLS // DEVICES + 1,
                    random.Random(1000 + i),
                )
            except BaseException as e:  # reported below, with the device's log
                errors.append(e)
                devices[i].stop()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(DEVICES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        kills = sum((d.kills for d in devices), Counter())
        outcomes = sum((d.outcomes for d in devices), Counter())
        elapsed = time.monotonic() - t0
        print(
            f"\n{sum(kills.values())} power cuts in {elapsed:.0f} s: {dict(kills)}; "
            f"updates {dict(outcomes)}"
        )
        assert sum(kills.values()) >= KILLS
        assert all(kills[s] > 0 for s in KILL_STATES), f"states never hit: {dict(kills)}"
        assert outcomes["committed"] > outcomes["abandoned"]


def test_model_that_kills_the_process_on_load_is_refused(
    tmp_path: Path,
    broker: MosquittoProcess,
    zygotes: list[Zygote],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dying three times with the new model loading is blamed on the model: the
    release fails with ``model_crashed`` and the old release keeps serving."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    publish_release(repo, 1, seed=0)
    publish_release(repo, 2, seed=1)
    with RangeServer(repo.repo_dir) as served, controller(broker.port) as ctl:
        data = provision_devices(tmp_path, broker, repo, served.url)[0]
        dev = Device("dev-pl-0", data, zygotes[0], tmp_path / "dev.log")
        try:
            dev.start()
            ctl.deploy(dev.device_id, 1)
            deadline = time.monotonic() + 30
            while finished(dev, 1) != "committed":
                assert time.monotonic() < deadline, dev.tail()
                time.sleep(0.02)
            ctl.deploy(dev.device_id, 2)
            for _ in range(3):  # a model whose load takes the process down
                assert wait_state(dev, KILL_STATES.index("staged"), 2) is not None
                dev.kill()
                since = time.time()
                dev.start()
                wait_serving(dev, ctl, since, {1})
            event = ctl.wait_event(dev.device_id, EventKind.FAILED, 2)
            assert event.reason is not None and event.reason.code == "model_crashed"
            assert finished(dev, 2) == "abandoned" and check_disk(dev) == 1
            wait_serving(dev, ctl, time.time(), {1})
        finally:
            dev.stop()
