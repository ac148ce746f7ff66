"""A thousand simulated devices on one small machine, with a byte meter on every device socket.

``MassFleet`` starts a private Mosquitto, the cloud service and N real
``device.agent.Agent`` objects split over a few *worker processes* (one
Python process per core: a single process of hundreds of agents is bound by
its GIL). Each worker runs its agents as threads, started at a bounded rate so
the broker and the cloud never see a connect storm, and answers commands on
its stdin (``firmware_sim._massworker``).

Measuring, not trusting: every worker wraps ``socket.socket``'s send and
receive calls and counts the bytes of each TCP connection to the broker or the
cloud's HTTP port, per device (``ByteMeter``: TCP payload, both directions,
TUF metadata and MQTT protocol overhead included). ``FleetMonitor``
subscribes to the devices' ``reported``/``events``/``status`` topics and to the
broker's ``$SYS/broker/bytes/*`` counters, so the bench knows when each device
committed a release and how many bytes the broker received from the cloud.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.broker import MosquittoProcess, free_port
from device.config import provision
from firmware_sim._bytemeter import ByteMeter, raise_fd_limit
from firmware_sim._fleetmonitor import DeviceTrack, FleetMonitor
from firmware_sim._system import Ledger, SimError, StartStop
from firmware_sim.api import CloudAPI, start_cloud
from firmware_sim.procs import ProcessGroup, python_cmd

__all__ = [
    "MAX_AGENTS_PER_WORKER",
    "ByteMeter",
    "DeviceTrack",
    "FleetMonitor",
    "MassFleet",
    "MassOptions",
    "device_ids",
    "proc_stats",
    "raise_fd_limit",
]

log = logging.getLogger(__name__)

#: Agents one worker process holds at most. paho-mqtt's network loop watches its
#: sockets with select(), which cannot take a descriptor >= 1024 (measured: in one
#: process, agents past the ~340th never connect); an agent holds three (its MQTT
#: socket and paho's wake-up socket pair), plus an HTTP connection and files while
#: it updates.
MAX_AGENTS_PER_WORKER = 250
#: Largest reply line read from a worker (a status of 10,000 devices fits).
_MAX_REPLY = 64 * 1024 * 1024


def device_ids(n: int) -> list[str]:
    """``dev-0001`` ... : all of one width, so no id is a prefix of another."""
    width = max(4, len(str(n)))
    return [f"dev-{i:0{width}d}" for i in range(1, n + 1)]


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user + system), RSS and peak RSS (MB) of a process from ``/proc``."""
    out = {"cpu_s": 0.0, "rss_mb": 0.0, "peak_mb": 0.0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_mb"] = int(value.split()[0]) / 1024
            elif key == "VmHWM":
                out["peak_mb"] = int(value.split()[0]) / 1024
    return out


# -- the fleet ----------------------------------------------------------------------------


@dataclass
class MassOptions:
    """How to build a mass fleet (the defaults suit a 1,000-device bench on 2 cores)."""

    devices: int = 100
    #: Worker processes the agents are split over (one per core), at least enough
    #: for ``MAX_AGENTS_PER_WORKER`` each.
    workers: int = 2
    #: Agent ``blob_source`` ("http", "mqtt", "auto"); ``None`` leaves the agent default.
    blob_source: str | None = None
    #: Seconds between two inferences of one device (low: a thousand share two cores).
    inference_interval: float = 5.0
    #: Long: telemetry is not what the bench measures.
    telemetry_interval: float = 3600.0
    #: Short probation: committed once the new model served one inference for a second.
    probation_s: float = 1.0
    probation_min_inferences: int = 1
    probation_max_s: float = 60.0
    #: Agents each worker starts per second.
    start_rate: float = 50.0
    cloud_template: Path | None = None
    #: Extra ``EDGEFLEET_*`` settings of the cloud process.
    cloud_env: dict[str, str] = field(default_factory=dict)
    online_timeout: float = 300.0
    #: Cores each simulated device reports (``os.cpu_count()`` inside the workers), which
    #: sizes the agent's interpreter pool; ``None``: this host's.
    device_cores: int | None = 1
    #: ``sys.setswitchinterval`` of the workers (seconds; ``None``: Python's 5 ms).
    switch_interval: float | None = 0.02
    #: Worker log level (agents log a lot at INFO with a thousand of them).
    log_level: str = "WARNING"


class MassFleet(StartStop):
    """``with MassFleet(workdir, MassOptions(...)) as fleet: ...``; stops everything on exit."""

    def __init__(self, workdir: Path, options: MassOptions) -> None:
        if options.devices < 1 or options.workers < 1:
            raise SimError("a mass fleet needs at least one device and one worker")
        self.workdir = Path(workdir)
        self.options = options
        self.ids = device_ids(options.devices)
        self.procs = ProcessGroup(self.workdir / "logs")
        self.ledger = Ledger(f"massfleet-{uuid.uuid4().hex[:8]}")
        self.broker: MosquittoProcess | None = None
        self.cloud: CloudAPI | None = None
        self.monitor: FleetMonitor | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._worker_ids: list[list[str]] = []
        self._io_lock = threading.Lock()
        self.meter: ByteMeter | None = None

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        assert self.cloud is not None
        return int(self.cloud.api.rsplit(":", 1)[1])

    def start(self) -> None:
        opts = self.options
        raise_fd_limit()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ledger.add("workdirs", str(self.workdir.resolve()))
        self.broker = MosquittoProcess(
            self.workdir / "broker",
            extra_lines=[
                "sys_interval 1",  # fresh $SYS byte counters for the bench
                "max_connections -1",
            ],
        ).start()
        self.cloud = self._start_cloud()
        root = self.cloud.cloud_dir / "repository" / "metadata" / "root.json"
        extra: dict[str, Any] = {
            "inference_interval": opts.inference_interval,
            "telemetry_interval": opts.telemetry_interval,
            "probation_s": opts.probation_s,
            "probation_min_inferences": opts.probation_min_inferences,
            "probation_max_s": opts.probation_max_s,
        }
        if opts.blob_source is not None:
            extra["blob_source"] = opts.blob_source
        for device_id in self.ids:
            provision(
                self.data_dir(device_id),
                device_id=device_id,
                root_file=root,
                broker_host="127.0.0.1",
                broker_port=self.broker.port,
                repo_url=f"{self.cloud.api}/tuf/",
                **extra,
            )
        # The bench's own connections (monitor, API calls) are counted too, so
        # they can be told apart from the cloud's in the broker's totals.
        self.meter = ByteMeter(
            {self.broker.port: "mqtt", self.http_port: "http"}, default_owner="bench"
        ).install()
        self.monitor = FleetMonitor("127.0.0.1", self.broker.port, self.ids).start()
        self._start_workers()
        ok = self.monitor.wait(
            lambda m: m.online() >= len(self.ids), opts.online_timeout, check=self.check_alive
        )
        if not ok:
            raise SimError(
                f"only {self.monitor.online()} of {len(self.ids)} devices came online in "
                f"{opts.online_timeout:g}s"
            )

    def data_dir(self, device_id: str) -> Path:
        return self.workdir / "devices" / device_id

    def _start_cloud(self) -> CloudAPI:
        assert self.broker is not None
        return start_cloud(
            self.procs,
            self.workdir / "cloud",
            self.broker.port,
            free_port(),
            template=self.options.cloud_template,
            log_level="WARNING",
            env=self.options.cloud_env,
        )

    @property
    def worker_count(self) -> int:
        """Worker processes: as asked, but enough to keep each under its socket limit."""
        need = -(-len(self.ids) // MAX_AGENTS_PER_WORKER)
        return min(max(self.options.workers, need), len(self.ids))

    def _start_workers(self) -> None:
        assert self.broker is not None
        n = self.worker_count
        for w in range(n):
            ids = self.ids[w::n]
            spec = {
                "devices": ids,
                "data_root": str(self.workdir / "devices"),
                "ports": {str(self.broker.port): "mqtt", str(self.http_port): "http"},
                "start_rate": self.options.start_rate,
                "seed_base": w * 100_000,
                "log_level": self.options.log_level,
                "device_cores": self.options.device_cores,
                "switch_interval": self.options.switch_interval,
            }
            spec_path = self.workdir / f"worker-{w}.json"
            spec_path.write_text(json.dumps(spec))
            log_path = self.workdir / "logs" / f"worker-{w}.log"
            with log_path.open("ab") as err:
                proc = subprocess.Popen(  # noqa: S603 - our own module
                    python_cmd("firmware_sim._massworker", str(spec_path)),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env={
                        **os.environ,
                        "OPENBLAS_NUM_THREADS": "1",
                        "OMP_NUM_THREADS": "1",
                        # Release-sized buffers (2-3 MB, freed after each step) are
                        # mmapped and handed back, not left to fragment a heap
                        # shared by hundreds of agents.
                        "MALLOC_MMAP_THRESHOLD_": "262144",
                    },
                )
            self.workers.append(proc)
            self._worker_ids.append(ids)

    def check_alive(self) -> None:
        """Raise if the cloud or a worker died on its own."""
        for name, proc in self.procs.procs.items():
            if proc.poll() is not None:
                raise SimError(f"{name} exited ({proc.returncode}):\n{self.procs.log_tail(name)}")
        for w, proc in enumerate(self.workers):
            if proc.poll() is not None:
                tail = (self.workdir / "logs" / f"worker-{w}.log").read_text(errors="replace")
                raise SimError(f"worker {w} exited ({proc.returncode}):\n{tail[-3000:]}")

    # -- commands to the workers -------------------------------------------------------------
    def _ask(self, cmd: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Send ``cmd`` to every worker, then read each one's one-line JSON reply."""
        with self._io_lock:
            for proc in self.workers:
                assert proc.stdin is not None
                proc.stdin.write((json.dumps({"cmd": cmd}) + "\n").encode())
                proc.stdin.flush()
            replies = []
            for w, proc in enumerate(self.workers):
                assert proc.stdout is not None
                line = _readline(proc, timeout)
                if not line:
                    self.check_alive()
                    raise SimError(f"worker {w} gave no answer to {cmd!r}")
                replies.append(json.loads(line))
        return replies

    def device_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes per device (and ``"?"`` for connections no device claimed) so far."""
        out: dict[str, dict[str, int]] = {}
        for reply in self._ask("bytes"):
            for owner, counts in reply["bytes"].items():
                into = out.setdefault(owner, {})
                for k, v in counts.items():
                    into[k] = into.get(k, 0) + int(v)
        return out

    def device_status(self) -> dict[str, dict[str, Any]]:
        """Per device, from inside its worker: release served, state, and whether a
        test inference on the serving model just succeeded."""
        out: dict[str, dict[str, Any]] = {}
        for reply in self._ask("status", timeout=300):
            out.update(reply["status"])
        return out

    def base_rss_mb(self) -> float:
        """The workers' resident memory before they started any agent (MB, summed)."""
        return sum(float(r["base_rss_mb"]) for r in self._ask("info"))

    def process_stats(self) -> dict[str, dict[str, float]]:
        """CPU seconds and memory of the broker, the cloud and each worker."""
        out: dict[str, dict[str, float]] = {}
        if self.broker is not None and self.broker._proc is not None:
            out["broker"] = proc_stats(self.broker._proc.pid)
        cloud = self.procs.procs.get("cloud")
        if cloud is not None:
            out["cloud"] = proc_stats(cloud.pid)
        for w, proc in enumerate(self.workers):
            out[f"worker-{w}"] = proc_stats(proc.pid)
        return out

    # -- operator actions ----------------------------------------------------------------
    def deploy(self, model: str, release: int) -> float:
        """Desired state for every device through the REST API; returns the call's start
        (``time.monotonic()``)."""
        assert self.cloud is not None
        t0 = time.monotonic()
        self.cloud.deploy(model, release, self.ids)
        return t0

    def wait_release(self, release: int, timeout: float) -> bool:
        """Until every device reported ``release`` running and idle (or ``timeout``)."""
        assert self.monitor is not None
        n = len(self.ids)
        return self.monitor.wait(lambda m: m.done(release) >= n, timeout, check=self.check_alive)

    def close(self) -> None:
        """Stop the workers (agents say goodbye), the monitor, the cloud, the broker."""
        for proc in self.workers:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b'{"cmd": "stop"}\n')
                proc.stdin.close()
        for proc in self.workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(Exception):
                assert proc.stdout is not None
                proc.stdout.close()
        self.workers.clear()
        if self.monitor is not None:
            self.monitor.stop()
        if self.meter is not None:
            self.meter.uninstall()
            self.meter = None
        with contextlib.suppress(Exception):
            self.procs.stop_all()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        self.ledger.remove("workdirs", str(self.workdir.resolve()))


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line from ``proc``'s stdout, or b"" if it died or ``timeout`` passed."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b""
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            if proc.poll() is not None:
                return b""
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b""
        buf += chunk
        if buf.endswith(b"\n"):
            return bytes(buf)
        if len(buf) > _MAX_REPLY:
            raise SimError("a worker reply is oversized")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use bench/fanout.py or firmware_sim._massworker")
