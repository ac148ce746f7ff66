"""Run-time control of a simulated fleet through files in its work dir.

A running fleet (``edgefleet-sim fleet``) is steered by files, so any shell,
test or second ``edgefleet-sim`` process can change it without a network
endpoint of its own:

* ``<workdir>/control/drift.json``: drift per device, ``{"*": {...},
  "dev-002": {"mode": "rotation", "amount": 25}}``. Every simulated sensor
  (process or thread) re-reads it when its modification time changes, at most
  every ``CHECK_INTERVAL`` seconds; a device's own entry beats ``"*"``.
* ``<workdir>/control/requests/<n>.json``: one fault request each
  (``{"kind": "power_cut", "device": "dev-003", "on_state": "downloading"}``);
  the fleet process executes it and writes ``<n>.result.json`` beside it.

Both are written atomically (temp file + rename), so a reader never sees half.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware_sim.sensors import DRIFT_MODES, DigitsSensor, Drift
from shared.errors import ConfigError

__all__ = [
    "CHECK_INTERVAL",
    "ControlledSensor",
    "control_dir",
    "read_drift",
    "submit_request",
    "take_requests",
    "write_drift",
    "write_result",
]

log = logging.getLogger(__name__)

#: How often a sensor looks at the drift file (seconds).
CHECK_INTERVAL = 0.5
#: Largest control file read (a bound on untrusted input).
MAX_CONTROL_BYTES = 1 << 20


def control_dir(workdir: Path) -> Path:
    return Path(workdir) / "control"


def _atomic_write(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read(path: Path) -> Any:
    with path.open("rb") as f:
        data = f.read(MAX_CONTROL_BYTES + 1)
    if len(data) > MAX_CONTROL_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONTROL_BYTES} bytes")
    return json.loads(data)


def _drift_from(value: Any) -> Drift:
    if not isinstance(value, dict) or set(value) - {"mode", "amount"}:
        raise ValueError(f"a drift setting is {{'mode': ..., 'amount': ...}}, got {value!r}")
    return Drift(str(value.get("mode", "none")), float(value.get("amount", 0.0)))


def read_drift(path: Path, device_id: str) -> Drift | None:
    """The drift ``device_id`` should have per the file (None: no file or no entry)."""
    try:
        table = _read(path)
    except FileNotFoundError:
        return None
    if not isinstance(table, dict):
        raise ValueError(f"{path} must hold an object of device id -> drift")
    entry = table.get(device_id, table.get("*"))
    return None if entry is None else _drift_from(entry)


def write_drift(workdir: Path, mode: str, amount: float, device: str | None = None) -> Path:
    """Set the drift of one device (or of every device: ``device=None``)."""
    if mode not in DRIFT_MODES:
        raise ConfigError(f"unknown drift mode {mode!r}; use one of {', '.join(DRIFT_MODES)}")
    path = control_dir(workdir) / "drift.json"
    try:
        table = _read(path)
    except FileNotFoundError:
        table = {}
    except ValueError as e:
        raise ConfigError(f"{path} is corrupt ({e}); delete it") from e
    table[device or "*"] = {"mode": mode, "amount": amount}
    if device is None:  # "every device" overrides earlier per-device settings
        table = {"*": table["*"]}
    _atomic_write(path, table)
    return path


class ControlledSensor:
    """A ``DigitsSensor`` whose drift follows the fleet's drift file."""

    def __init__(
        self, device_id: str, drift_file: Path | None, seed: int = 0, drift: Drift | None = None
    ) -> None:
        self.device_id = device_id
        self.sensor = DigitsSensor(seed=seed, drift=drift)
        self._file = drift_file
        self._next_check = 0.0
        self._mtime: int | None = None
        self._lock = threading.Lock()

    @property
    def drift(self) -> Drift:
        return self.sensor.drift

    def poll(self) -> None:
        """Apply a changed drift file now (the sensor also does this on its own)."""
        if self._file is None:
            return
        try:
            mtime = self._file.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            drift = read_drift(self._file, self.device_id)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable drift file %s: %s", self._file, e)
            return
        if drift is not None and drift != self.sensor.drift:
            log.info("%s: drift now %s %g", self.device_id, drift.mode, drift.amount)
            self.sensor.set_drift(drift)

    def next(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        now = time.monotonic()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + CHECK_INTERVAL
                self.poll()
            finally:
                self._lock.release()
        return self.sensor.next(shape)


# -- fault requests -----------------------------------------------------------------


def submit_request(workdir: Path, request: dict[str, Any]) -> Path:
    """Queue a fault request for a running fleet; returns the result file to wait for."""
    reqs = control_dir(workdir) / "requests"
    reqs.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}-{os.getpid()}"
    _atomic_write(reqs / f"{name}.json", request)
    return reqs / f"{name}.result.json"


def take_requests(workdir: Path) -> list[tuple[Path, dict[str, Any] | str]]:
    """Pending requests, oldest first, each removed from the queue.

    A request that cannot be read comes back as an error string.
    """
    reqs = control_dir(workdir) / "requests"
    out: list[tuple[Path, dict[str, Any] | str]] = []
    if not reqs.is_dir():
        return out
    for path in sorted(reqs.glob("*.json")):
        if path.name.endswith(".result.json") or path.name.startswith("."):
            continue
        result = path.with_name(path.name[:-5] + ".result.json")
        try:
            value = _read(path)
            out.append((result, value if isinstance(value, dict) else "not a JSON object"))
        except (OSError, ValueError) as e:
            out.append((result, f"unreadable request: {e}"))
        with contextlib.suppress(OSError):
            path.unlink()
    return out


def write_result(path: Path, ok: bool, message: str) -> None:
    _atomic_write(path, {"ok": ok, "message": message})
