"""A simulated fleet: a broker, the cloud, and N real device agents.

``SimFleet`` starts a private Mosquitto (with persistence, so retained desired
states survive a broker restart), the cloud service as a process, and N
device agents, each provisioned with its own data dir, device id (= MQTT
client id) and trust anchor, fed by a ``ControlledSensor`` whose drift
follows ``<workdir>/control/drift.json``.

Devices run as processes (``mode="process"``: they can be SIGKILLed and put in
a network namespace) or as ``Agent`` objects in threads of this process
(``mode="thread"``: cheap, for large N). Everything started is stopped, and
every namespace and mount removed, on exit, whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.broker import MosquittoProcess, free_port
from device.config import provision
from firmware_sim._system import Ledger, SimError, StartStop
from firmware_sim.api import CloudAPI, start_cloud
from firmware_sim.control import ControlledSensor, control_dir
from firmware_sim.disk import SmallDisk
from firmware_sim.netlab import NetLab
from firmware_sim.procs import ProcessGroup, python_cmd
from firmware_sim.scenario import device_id_for
from firmware_sim.watch import read_state

__all__ = ["FleetOptions", "SimFleet"]

log = logging.getLogger(__name__)


@dataclass
class FleetOptions:
    """How to build a fleet."""

    devices: int = 3
    mode: str = "process"  # "process" | "thread"
    telemetry_interval: float = 1.0
    inference_interval: float = 0.01
    #: Devices that get their own network namespace (process mode; needs root).
    netns_devices: frozenset[str] = frozenset()
    #: Devices whose data dir is a small tmpfs (full-disk faults; needs root): id -> MB.
    small_disks: dict[str, int] = field(default_factory=dict)
    #: A cloud data dir with releases already published, copied instead of starting empty.
    cloud_template: Path | None = None
    online_timeout: float = 120.0
    #: Hardware tags per device id (``group:<name>`` puts a device in a group).
    hardware_tags: dict[str, list[str]] = field(default_factory=dict)
    #: More agent.toml settings for every device (``probation_s``, ``blob_source`` ...).
    agent_settings: dict[str, Any] = field(default_factory=dict)


class SimFleet(StartStop):
    """A context manager: ``with SimFleet(workdir, FleetOptions(...)) as fleet: ...``."""

    def __init__(self, workdir: Path, options: FleetOptions) -> None:
        if options.mode not in ("process", "thread"):
            raise SimError(f"unknown fleet mode {options.mode!r}: use process or thread")
        if options.netns_devices and options.mode != "process":
            raise SimError("network namespaces need process devices (mode=process)")
        self.workdir = Path(workdir)
        self.options = options
        self.device_ids = [device_id_for(i) for i in range(1, options.devices + 1)]
        self.procs = ProcessGroup(self.workdir / "logs")
        # If this process is killed outright, `edgefleet-sim cleanup` kills the
        # broker, cloud and devices it left: every one names a path in the workdir.
        self.ledger = Ledger(f"fleet-{uuid.uuid4().hex[:8]}")
        self.lab: NetLab | None = None
        self.disks: dict[str, SmallDisk] = {}
        self.agents: dict[str, Any] = {}  # thread mode: device id -> device.agent.Agent
        self.broker: MosquittoProcess | None = None
        self.cloud: CloudAPI | None = None
        self._device_cmds: dict[str, list[str]] = {}
        self.powered_off: set[str] = set()

    # -- paths ---------------------------------------------------------------------
    def data_dir(self, device_id: str) -> Path:
        return self.workdir / "devices" / device_id

    @property
    def drift_file(self) -> Path:
        return control_dir(self.workdir) / "drift.json"

    def state(self, device_id: str) -> str | None:
        """The update state ``device_id`` last persisted (``update.json``)."""
        return read_state(self.data_dir(device_id))

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        opts = self.options
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ledger.add("workdirs", str(self.workdir.resolve()))
        control_dir(self.workdir).mkdir(parents=True, exist_ok=True)
        port = free_port()
        extra: list[str] = []
        if opts.netns_devices:
            self.lab = NetLab().open()
            extra.append(f"listener {port} {self.lab.host_ip}")
        self.broker = MosquittoProcess(
            self.workdir / "broker", port=port, persist=True, extra_lines=extra
        ).start()
        self.cloud = self._start_cloud()
        root = self.cloud.cloud_dir / "repository" / "metadata" / "root.json"
        for i, device_id in enumerate(self.device_ids):
            self._provision(device_id, root)
            self._start_device(device_id, seed=i)
        self.wait_online(self.device_ids, opts.online_timeout)

    def _start_cloud(self) -> CloudAPI:
        assert self.broker is not None
        return start_cloud(
            self.procs,
            self.workdir / "cloud",
            self.broker.port,
            free_port(),
            template=self.options.cloud_template,
            host=self.lab.host_ip if self.lab else "127.0.0.1",
        )

    def _provision(self, device_id: str, root: Path) -> None:
        assert self.broker is not None and self.cloud is not None
        data = self.data_dir(device_id)
        if device_id in self.options.small_disks:
            disk = SmallDisk(data, self.options.small_disks[device_id])
            self.disks[device_id] = disk
            disk.open()
        host = "127.0.0.1"
        if self.lab is not None and device_id in self.options.netns_devices:
            self.lab.add_device(device_id)
            host = self.lab.host_ip
        http = self.cloud.api.rsplit(":", 1)[1]
        provision(
            data,
            device_id=device_id,
            root_file=root,
            broker_host=host,
            broker_port=self.broker.port,
            repo_url=f"http://{self.cloud_host}:{http}/tuf/",
            inference_interval=self.options.inference_interval,
            telemetry_interval=self.options.telemetry_interval,
            hardware_tags=self.options.hardware_tags.get(device_id, []),
            **self.options.agent_settings,
        )

    @property
    def cloud_host(self) -> str:
        return self.lab.host_ip if self.lab else "127.0.0.1"

    def _start_device(self, device_id: str, seed: int) -> None:
        if self.options.mode == "thread":
            from device.agent import Agent
            from device.config import load_config

            sensor = ControlledSensor(device_id, self.drift_file, seed=seed)
            agent = Agent(load_config(self.data_dir(device_id)), sensor)
            agent.start()
            self.agents[device_id] = agent
            return
        cmd = python_cmd(
            "firmware_sim.cli",
            "--log-level",
            "INFO",
            "device",
            "--data-dir",
            str(self.data_dir(device_id)),
            "--seed",
            str(seed),
            "--drift-file",
            str(self.drift_file),
        )
        if self.lab is not None and device_id in self.lab.links:
            cmd = self.lab.exec_prefix(device_id) + cmd
        self._device_cmds[device_id] = cmd
        self.procs.start(device_id, cmd)

    def wait_online(self, device_ids: list[str], timeout: float) -> None:
        assert self.cloud is not None
        want = set(device_ids)
        self.cloud.wait_for(
            lambda devs: want <= {d["device_id"] for d in devs if d["online"]},
            f"devices online: {sorted(want)}",
            timeout,
            check=self.check_alive,
        )

    def check_alive(self) -> None:
        """Raise if the cloud or a powered device process died on its own."""
        for name, proc in self.procs.procs.items():
            if proc.poll() is not None:
                raise SimError(
                    f"{name} exited with code {proc.returncode}:\n{self.procs.log_tail(name)}"
                )

    def close(self) -> None:
        """Stop everything and remove every namespace and mount (never raises)."""
        for device_id, agent in list(self.agents.items()):
            try:
                agent.stop()
            except Exception:
                log.exception("stopping %s failed", device_id)
        self.agents.clear()
        with contextlib.suppress(Exception):
            self.procs.stop_all()
        self.ledger.remove("workdirs", str(self.workdir.resolve()))
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        for disk in self.disks.values():
            with contextlib.suppress(Exception):
                disk.close()
        if self.lab is not None:
            with contextlib.suppress(Exception):
                self.lab.close()

    # -- faults ----------------------------------------------------------------------
    def power_cut(self, device_id: str) -> str | None:
        """SIGKILL a process device; returns the update state it had persisted."""
        if device_id not in self._device_cmds:
            raise SimError(f"{device_id} is not a process device: only processes lose power")
        self.procs.kill(device_id)
        self.powered_off.add(device_id)
        state = self.state(device_id)
        log.info("power cut %s in state %s", device_id, state)
        return state

    def power_on(self, device_id: str) -> None:
        """Boot a device whose power was cut (same command, same data dir)."""
        if device_id not in self.powered_off:
            raise SimError(f"{device_id} is not powered off")
        self.powered_off.discard(device_id)
        self.procs.start(device_id, self._device_cmds[device_id])
        log.info("power restored to %s", device_id)

    def disk(self, device_id: str) -> SmallDisk:
        try:
            return self.disks[device_id]
        except KeyError:
            raise SimError(
                f"{device_id} has no small disk: list it in the fleet's small disks before starting"
            ) from None

    def net(self) -> NetLab:
        if self.lab is None:
            raise SimError(
                "this fleet has no network lab: name the device among the "
                "fleet's netns devices before starting"
            )
        return self.lab

    def restart_broker(self, downtime: float = 1.0) -> None:
        assert self.broker is not None
        self.broker.stop()
        time.sleep(downtime)
        self.broker.start()
        log.info("broker restarted after %.1fs down", downtime)
