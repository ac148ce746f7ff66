"""Fault machinery on its own: namespaces, links, disks, state watching, control files.

Namespace and mount tests need root and `ip netns`; elsewhere they skip with the reason."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from firmware_sim._system import SimError
from firmware_sim.control import (
    ControlledSensor,
    read_drift,
    submit_request,
    take_requests,
    write_drift,
)
from firmware_sim.disk import SmallDisk, mounts_unavailable
from firmware_sim.netlab import NetLab, netns_unavailable
from firmware_sim.watch import StateWatcher


def _journal(data: Path, state: str) -> None:
    tmp = data / ".update.json.tmp"
    tmp.write_text(json.dumps({"state": state}))
    tmp.replace(data / "update.json")


def test_state_watcher_wakes_on_the_persisted_state(tmp_path: Path) -> None:
    _journal(tmp_path, "idle")
    seen: list[tuple[str | None, float]] = []
    with StateWatcher(tmp_path) as w:
        assert w._fd >= 0, "inotify is available on Linux: the watcher must use it"
        t = threading.Thread(
            target=lambda: seen.append((w.wait({"downloading"}, timeout=10), time.monotonic()))
        )
        t.start()
        time.sleep(0.2)
        _journal(tmp_path, "offered")
        time.sleep(0.1)
        written = time.monotonic()
        _journal(tmp_path, "downloading")
        t.join(10)
    state, woke = seen[0]
    assert state == "downloading"
    # Milliseconds on an idle machine; generous here because CI runs tests in parallel.
    assert woke - written < 0.5, "the watcher must fire on the rename, not on a timeout"


def test_state_watcher_times_out(tmp_path: Path) -> None:
    with StateWatcher(tmp_path) as w:
        assert w.wait({"verified"}, timeout=0.3) is None


def test_drift_file_steers_one_sensor_or_all(tmp_path: Path) -> None:
    path = write_drift(tmp_path, "noise", 0.2, device="dev-002")
    assert read_drift(path, "dev-002").mode == "noise"  # type: ignore[union-attr]
    assert read_drift(path, "dev-001") is None
    sensor = ControlledSensor("dev-001", path)
    write_drift(tmp_path, "shift", 0.3)
    sensor.poll()
    assert sensor.drift.mode == "shift" and sensor.drift.amount == pytest.approx(0.3)
    x = sensor.next((8, 8, 1))
    assert x.shape == (8, 8, 1) and float(x.min()) >= 0.0
    with pytest.raises(Exception, match="unknown drift mode"):
        write_drift(tmp_path, "melt", 1.0)


def test_fault_requests_queue(tmp_path: Path) -> None:
    result = submit_request(tmp_path, {"kind": "link_cut", "device": "dev-001"})
    (tmp_path / "control" / "requests" / "junk.json").write_text("{not json")
    taken = take_requests(tmp_path)
    assert len(taken) == 2
    assert any(r == {"kind": "link_cut", "device": "dev-001"} for _, r in taken)
    assert any(isinstance(r, str) and "unreadable" in r for _, r in taken)
    assert result.name.endswith(".result.json")
    assert take_requests(tmp_path) == []


needs_netns = pytest.mark.skipif(bool(netns_unavailable()), reason=str(netns_unavailable()))


def _serve_once(host: str, port_box: list[int], got: list[bytes]) -> threading.Thread:
    srv = socket.create_server((host, 0))
    port_box.append(srv.getsockname()[1])

    def run() -> None:
        srv.settimeout(20)
        with srv:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(20)
                data = b""
                while len(data) < 256 * 1024:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _send(lab: NetLab, device: str, port: int, nbytes: int, timeout: float) -> float:
    code = (
        f"import socket,time; s=socket.create_connection(('{lab.host_ip}', {port}), "
        f"timeout={timeout}); t=time.monotonic(); s.sendall(b'x'*{nbytes}); s.close(); "
        "print(time.monotonic()-t)"
    )
    out = subprocess.run(
        [*lab.exec_prefix(device), "python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    if out.returncode != 0:
        raise SimError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return float(out.stdout)


@needs_netns
def test_netlab_link_cut_rate_and_loss_and_teardown() -> None:
    with NetLab() as lab:
        link = lab.add_device("dev-001")
        assert (
            link.netns
            in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True, check=True
            ).stdout
        )
        port: list[int] = []
        got: list[bytes] = []
        t = _serve_once(lab.host_ip, port, got)
        _send(lab, "dev-001", port[0], 64 * 1024, timeout=10)
        t.join(10)
        assert got and len(got[0]) == 64 * 1024

        lab.set_rate("dev-001", "256kbit")
        port.clear()
        t = _serve_once(lab.host_ip, port, got)
        # 256 kbit/s = 32 KB/s: 96 KB cannot cross in much under 2 s (burst aside).
        start = time.monotonic()
        _send(lab, "dev-001", port[0], 96 * 1024, timeout=30)
        t.join(30)
        assert time.monotonic() - start > 1.5
        lab.set_rate("dev-001", None)

        lab.set_link("dev-001", up=False)
        port.clear()
        t = _serve_once(lab.host_ip, port, got)
        with pytest.raises(SimError):
            _send(lab, "dev-001", port[0], 1024, timeout=2)
        lab.set_link("dev-001", up=True)
        _send(lab, "dev-001", port[0], 1024, timeout=10)
        t.join(10)

        lab.set_loss("dev-001", 50)
        rules = subprocess.run(
            [*lab.exec_prefix("dev-001"), "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "numgen random mod 100 < 50 drop" in rules
        lab.set_loss("dev-001", None)
        ns = link.netns
    left = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert ns not in left
    assert (
        lab.bridge
        not in subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    )


@needs_netns
def test_two_labs_at_once_get_different_subnets() -> None:
    with NetLab() as a, NetLab() as b:
        assert a.subnet != b.subnet


@pytest.mark.skipif(bool(mounts_unavailable()), reason=str(mounts_unavailable()))
def test_small_disk_fills_frees_and_unmounts(tmp_path: Path) -> None:
    from device.fsutil import atomic_write_bytes
    from shared.errors import StorageError

    data = tmp_path / "data"
    with SmallDisk(data, size_mb=2) as disk:
        atomic_write_bytes(data / "a", b"x" * 1000)
        disk.fill()
        with pytest.raises(StorageError, match="disk full"):
            atomic_write_bytes(data / "b", b"y" * 100_000)
        disk.free()
        atomic_write_bytes(data / "b", b"y" * 100_000)
    with open("/proc/self/mounts") as f:
        assert str(data) not in f.read()
