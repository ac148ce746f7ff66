"""Scenario files: a fleet, the faults to inject into it, and what must hold.

A scenario is TOML (see ``docs/SIMULATOR.md`` and ``firmware_sim/scenarios/``).
``load_scenario`` refuses anything it does not understand: an unknown table or
key, a wrong type, or an impossible value (a device index beyond the fleet, a
power cut in thread mode, a negative duration) raises ``ScenarioError`` whose
message starts with ``<file>:<line>:`` naming the offending line.

This module is pure: it parses text and returns frozen dataclasses.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.messages import UpdateState

__all__ = [
    "DEVICE_FAULTS",
    "FAULT_KINDS",
    "KILL_STATES",
    "NETNS_FAULTS",
    "Expectations",
    "FaultSpec",
    "FleetSpec",
    "ReleaseSpec",
    "Scenario",
    "ScenarioError",
    "device_id_for",
    "load_scenario",
    "parse_scenario",
]

#: Update states a fault can be timed on (persisted in ``update.json``).
KILL_STATES = tuple(s.value for s in UpdateState)
#: Faults that need the device in its own network namespace.
NETNS_FAULTS = frozenset({"link_cut", "slow_link", "packet_loss"})
#: Faults aimed at one device (every kind but the broker restart).
DEVICE_FAULTS = frozenset({"power_cut", "full_disk"}) | NETNS_FAULTS
FAULT_KINDS = DEVICE_FAULTS | {"broker_restart"}
MAX_DEVICES = 10_000
MAX_SECONDS = 24 * 3600.0
_RATE = re.compile(r"^[1-9][0-9]{0,8}(bit|kbit|mbit|gbit)$")


def device_id_for(index: int) -> str:
    """The id of the ``index``-th simulated device (1-based): ``dev-001``."""
    return f"dev-{index:03d}"


class ScenarioError(ConfigError):
    """A scenario file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class FleetSpec:
    devices: int = 3
    mode: str = "process"  # "process" | "thread"
    telemetry_interval: float = 1.0
    inference_interval: float = 0.01
    disk_mb: int = 8  # size of the tmpfs a full_disk device gets


@dataclass(frozen=True)
class ReleaseSpec:
    model: str = "digits"
    epochs: int = 2
    #: Devices first run release 1 (no faults); the faults then hit release 2.
    baseline: bool = False

    @property
    def target(self) -> int:
        return 2 if self.baseline else 1


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    line: int
    device: str | None = None  # device id; None for broker_restart
    at: float | None = None  # seconds after the rollout starts
    on_state: str | None = None  # ... or when ``device`` persists this update state
    duration: float | None = None  # link/disk/broker faults: until restored
    restore_after: float | None = None  # power_cut: reboot after this long (None: stays off)
    rate: str = "64kbit"  # slow_link
    percent: float = 30.0  # packet_loss

    @property
    def needs_netns(self) -> bool:
        return self.kind in NETNS_FAULTS

    def describe(self) -> str:
        when = f"on {self.device} state {self.on_state}" if self.on_state else f"at +{self.at}s"
        who = f" {self.device}" if self.device and not self.on_state else ""
        return f"{self.kind}{who} {when} (line {self.line})"


@dataclass(frozen=True)
class Expectations:
    release: int | None = None  # default: the release the faults hit
    within: float = 180.0
    state: str = "idle"
    faults_fired: bool = True
    serving: bool = True
    max_failed: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path | None
    timeout: float
    fleet: FleetSpec
    release: ReleaseSpec
    faults: tuple[FaultSpec, ...]
    expect: Expectations
    device_ids: tuple[str, ...] = field(default=())

    @property
    def needs_netns(self) -> bool:
        return any(f.needs_netns for f in self.faults)

    @property
    def needs_mounts(self) -> bool:
        return any(f.kind == "full_disk" for f in self.faults)

    @property
    def expected_release(self) -> int:
        return self.expect.release if self.expect.release is not None else self.release.target


# -- line index -----------------------------------------------------------------

_ARRAY_HDR = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_-]+)\s*\]\]")
_TABLE_HDR = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*(?:\.[^=]*)?=")


class _Lines:
    """Maps (table, array index, key) to the line that defines it.

    tomllib does not report positions, so the raw text is scanned for headers
    and ``key =`` lines. Enough for the flat scenario format; a key that cannot
    be located falls back to its table's header line.
    """

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, int | None], int] = {}
        self.keys: dict[tuple[str, int | None, str], int] = {}
        counts: dict[str, int] = {}
        current: tuple[str, int | None] = ("", None)
        for n, line in enumerate(text.splitlines(), start=1):
            if m := _ARRAY_HDR.match(line):
                name = m.group(1)
                idx = counts.get(name, 0)
                counts[name] = idx + 1
                current = (name, idx)
                self.tables[current] = n
            elif m := _TABLE_HDR.match(line):
                current = (m.group(1), None)
                self.tables[current] = n
            elif m := _KEY.match(line):
                key = m.group(1).strip('"')
                self.keys.setdefault((*current, key), n)

    def of(self, table: str, index: int | None, key: str | None = None) -> int:
        if key is not None and (table, index, key) in self.keys:
            return self.keys[(table, index, key)]
        if key is not None and not table:  # a top-level name given as a [table]
            for candidate in ((key, None), (key, 0)):
                if candidate in self.tables:
                    return self.tables[candidate]
        return self.tables.get((table, index), 1)


# -- typed field readers --------------------------------------------------------------


class _Reader:
    """Reads one table's keys, raising ``ScenarioError`` at the key's line."""

    def __init__(
        self,
        where: str,
        lines: _Lines,
        table: str,
        index: int | None,
        raw: Any,
        known: frozenset[str],
    ) -> None:
        self.where, self.lines, self.table, self.index = where, lines, table, index
        label = (
            f"[[{table}]] #{index + 1}"
            if index is not None
            else f"[{table}]"
            if table
            else "top level"
        )
        self.label = label
        if not isinstance(raw, dict):
            self.fail(None, f"{label} must be a table")
        self.raw: dict[str, Any] = raw
        for key in raw:
            if key not in known:
                self.fail(key, f"{label}: unknown key {key!r} (known: {', '.join(sorted(known))})")

    def fail(self, key: str | None, message: str) -> None:
        line = self.lines.of(self.table, self.index, key)
        raise ScenarioError(f"{self.where}:{line}: {message}")

    def line(self, key: str | None = None) -> int:
        return self.lines.of(self.table, self.index, key)

    def get(
        self, key: str, kind: type, default: Any, check: Callable[[Any], str | None] | None = None
    ) -> Any:
        if key not in self.raw:
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(key, f"{self.label}: {key} must be {_TYPE_NAMES[kind]}, got {value!r}")
        if kind is float and not math.isfinite(value):
            self.fail(key, f"{self.label}: {key} must be a finite number, got {value!r}")
        if check is not None and (why := check(value)):
            self.fail(key, f"{self.label}: {key} = {value!r} is impossible: {why}")
        return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _between(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if (v <= lo if lo_open else v < lo) or v > hi:
            return f"must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        return None

    return check


def _one_of(options: tuple[str, ...] | frozenset[str]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"use one of {', '.join(sorted(options))}"

    return check


# -- the parser ----------------------------------------------------------------------

_TOP = frozenset({"scenario", "fleet", "release", "fault", "expect"})
_SCENARIO_KEYS = frozenset({"name", "timeout"})
_FLEET_KEYS = frozenset({"devices", "mode", "telemetry_interval", "inference_interval", "disk_mb"})
_RELEASE_KEYS = frozenset({"model", "epochs", "baseline"})
_FAULT_KEYS = frozenset(
    {"kind", "device", "at", "on_state", "duration", "restore_after", "rate", "percent"}
)
_EXPECT_KEYS = frozenset({"release", "within", "state", "faults_fired", "serving", "max_failed"})


def parse_scenario(text: str, where: str = "<scenario>", path: Path | None = None) -> Scenario:
    """Parse scenario TOML text; ``where`` prefixes error messages (usually the path)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ScenarioError(f"{where}:{m.group(1) if m else 1}: not valid TOML: {e}") from e
    lines = _Lines(text)
    top = _Reader(where, lines, "", None, raw, _TOP)
    for name in ("scenario", "fleet", "release", "expect"):
        if name in raw and not isinstance(raw[name], dict):
            top.fail(name, f"{name} must be a table: write [{name}]")
    if "fault" in raw and not (
        isinstance(raw["fault"], list) and all(isinstance(f, dict) for f in raw["fault"])
    ):
        top.fail("fault", "faults must be an array of tables: write [[fault]]")

    r = _Reader(where, lines, "scenario", None, raw.get("scenario", {}), _SCENARIO_KEYS)
    name = r.get("name", str, path.stem if path else "scenario")
    timeout = r.get("timeout", float, 600.0, _between(0, MAX_SECONDS, lo_open=True))

    r = _Reader(where, lines, "fleet", None, raw.get("fleet", {}), _FLEET_KEYS)
    fleet = FleetSpec(
        devices=r.get("devices", int, 3, _between(1, MAX_DEVICES)),
        mode=r.get("mode", str, "process", _one_of(("process", "thread"))),
        telemetry_interval=r.get("telemetry_interval", float, 1.0, _between(0.05, 3600)),
        inference_interval=r.get("inference_interval", float, 0.01, _between(0, 60)),
        disk_mb=r.get("disk_mb", int, 8, _between(1, 4096)),
    )
    mode_line = r.line("mode")

    r = _Reader(where, lines, "release", None, raw.get("release", {}), _RELEASE_KEYS)
    release = ReleaseSpec(
        model=r.get(
            "model",
            str,
            "digits",
            lambda v: (
                None
                if re.match(r"^[a-z0-9][a-z0-9_-]{0,62}$", v)
                else "a model name is lower case letters, digits, _ and -"
            ),
        ),
        epochs=r.get("epochs", int, 2, _between(1, 200)),
        baseline=r.get("baseline", bool, False),
    )

    ids = tuple(device_id_for(i) for i in range(1, fleet.devices + 1))
    faults = tuple(
        _fault(where, lines, i, f, fleet, ids, mode_line)
        for i, f in enumerate(raw.get("fault", []))
    )

    r = _Reader(where, lines, "expect", None, raw.get("expect", {}), _EXPECT_KEYS)
    expect = Expectations(
        release=r.get(
            "release",
            int,
            None,
            lambda v: (
                None
                if 1 <= v <= release.target
                else f"the scenario publishes releases 1..{release.target} "
                "(set [release] baseline = true for two)"
            ),
        ),
        within=r.get("within", float, 180.0, _between(0, MAX_SECONDS, lo_open=True)),
        state=r.get("state", str, "idle", _one_of(KILL_STATES)),
        faults_fired=r.get("faults_fired", bool, True),
        serving=r.get("serving", bool, True),
        max_failed=r.get("max_failed", int, 0, _between(0, fleet.devices)),
    )
    if expect.within > timeout:
        r.fail(
            "within",
            f"[expect]: within = {expect.within:g} is impossible: it exceeds "
            f"[scenario] timeout = {timeout:g}",
        )
    return Scenario(
        name=name,
        path=path,
        timeout=timeout,
        fleet=fleet,
        release=release,
        faults=faults,
        expect=expect,
        device_ids=ids,
    )


def _fault(
    where: str,
    lines: _Lines,
    index: int,
    raw: Any,
    fleet: FleetSpec,
    ids: tuple[str, ...],
    mode_line: int,
) -> FaultSpec:
    r = _Reader(where, lines, "fault", index, raw, _FAULT_KEYS)
    if "kind" not in r.raw:
        r.fail(None, f"{r.label}: missing key 'kind' ({', '.join(sorted(FAULT_KINDS))})")
    kind = r.get("kind", str, None, _one_of(FAULT_KINDS))
    device: str | None = None
    if "device" in r.raw:
        value = r.raw["device"]
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= fleet.devices:
                r.fail(
                    "device",
                    f"{r.label}: device = {value} is impossible: the fleet has "
                    f"devices 1..{fleet.devices}",
                )
            device = ids[value - 1]
        elif isinstance(value, str):
            if value not in ids:
                r.fail(
                    "device",
                    f"{r.label}: device = {value!r} is impossible: the fleet has "
                    f"{ids[0]}..{ids[-1]}",
                )
            device = value
        else:
            r.fail("device", f"{r.label}: device must be an index (1..{fleet.devices}) or an id")
    at = r.get("at", float, None, _between(0, MAX_SECONDS))
    on_state = r.get("on_state", str, None, _one_of(KILL_STATES))
    if (at is None) == (on_state is None):
        r.fail(
            None,
            f"{r.label}: give exactly one trigger: `at` (seconds after the rollout "
            "starts) or `on_state` (an update state of the device)",
        )
    if kind in DEVICE_FAULTS and device is None:
        r.fail(None, f"{r.label}: {kind} needs `device`")
    if on_state is not None and device is None:
        r.fail("on_state", f"{r.label}: on_state needs `device` (whose state to watch)")
    positive = _between(0, MAX_SECONDS, lo_open=True)
    duration = r.get("duration", float, None, positive)
    restore_after = r.get("restore_after", float, None, positive)
    if kind == "power_cut":
        if duration is not None:
            r.fail("duration", f"{r.label}: power_cut takes `restore_after`, not `duration`")
        if fleet.mode != "process":
            r.fail(
                "kind",
                f'{r.label}: power_cut needs [fleet] mode = "process" (a thread '
                f"cannot be SIGKILLed; mode is set on line {mode_line})",
            )
    else:
        if restore_after is not None:
            r.fail("restore_after", f"{r.label}: restore_after is for power_cut; use duration")
        if duration is None and kind != "broker_restart":
            r.fail(None, f"{r.label}: {kind} needs `duration` (seconds until it is undone)")
    if kind in NETNS_FAULTS and fleet.mode != "process":
        r.fail(
            "kind",
            f'{r.label}: {kind} needs [fleet] mode = "process" (each device in '
            f"its own network namespace; mode is set on line {mode_line})",
        )
    rate = r.get(
        "rate",
        str,
        "64kbit",
        lambda v: None if _RATE.match(v) else 'write e.g. "64kbit" or "2mbit"',
    )
    percent = r.get("percent", float, 30.0, _between(0, 100, lo_open=True))
    if "rate" in r.raw and kind != "slow_link":
        r.fail("rate", f"{r.label}: rate is for slow_link")
    if "percent" in r.raw and kind != "packet_loss":
        r.fail("percent", f"{r.label}: percent is for packet_loss")
    return FaultSpec(
        kind=kind,
        line=r.line(),
        device=device,
        at=at,
        on_state=on_state,
        duration=duration if kind != "broker_restart" or duration else 1.0,
        restore_after=restore_after,
        rate=rate,
        percent=percent,
    )


def load_scenario(path: Path) -> Scenario:
    """Read and parse a scenario file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: cannot read the scenario: {e}") from e
    return parse_scenario(text, str(path), path)
