"""The scenario parser refuses what it does not understand and names the line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_sim.scenario import ScenarioError, load_scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "firmware_sim" / "scenarios"

VALID = """\
[scenario]
name = "ok"
timeout = 300

[fleet]
devices = 4
mode = "process"

[release]
epochs = 2

[[fault]]
kind = "power_cut"
device = 1
on_state = "downloading"
restore_after = 1.0

[[fault]]
kind = "link_cut"
device = "dev-002"
at = 0.5
duration = 3.0

[expect]
within = 120
"""


def _line_of(message: str) -> int:
    m = re.match(r"^[^:]*:(\d+): ", message)
    assert m, f"error does not name a line: {message}"
    return int(m.group(1))


def test_valid_scenario_parses() -> None:
    s = parse_scenario(VALID, "valid.toml")
    assert s.fleet.devices == 4 and s.device_ids[-1] == "dev-004"
    assert [f.kind for f in s.faults] == ["power_cut", "link_cut"]
    assert s.faults[0].device == "dev-001" and s.faults[0].on_state == "downloading"
    assert s.faults[1].line == 18
    assert s.needs_netns and not s.needs_mounts
    assert s.expected_release == 1


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_parse(path: Path) -> None:
    s = load_scenario(path)
    assert s.faults


@pytest.mark.parametrize(
    ("old", "new", "line", "words"),
    [
        ('mode = "process"', 'mode = "fork"', 7, "use one of process, thread"),
        ("devices = 4", "devices = 0", 6, "impossible"),
        ("devices = 4", 'devices = "four"', 6, "must be an integer"),
        ("device = 1", "device = 9", 14, "devices 1..4"),
        ('device = "dev-002"', 'device = "dev-042"', 20, "dev-001..dev-004"),
        ('on_state = "downloading"', 'on_state = "sleeping"', 15, "use one of"),
        ("duration = 3.0", "duration = -3.0", 22, "impossible"),
        ("restore_after = 1.0", "duration = 1.0", 16, "`restore_after`, not `duration`"),
        ("at = 0.5", 'at = 0.5\non_state = "verified"', 18, "exactly one trigger"),
        ("within = 120", "within = 301", 25, "exceeds"),
        ("epochs = 2", "epochs = 2\nbaseline = 1", 11, "true or false"),
    ],
)
def test_bad_values_name_their_line(old: str, new: str, line: int, words: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(VALID.replace(old, new, 1), "s.toml")
    assert _line_of(str(e.value)) == line, str(e.value)
    assert words in str(e.value)


def test_power_cut_refused_in_thread_mode_naming_both_lines() -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(VALID.replace('mode = "process"', 'mode = "thread"'), "s.toml")
    assert _line_of(str(e.value)) == 13 and "line 7" in str(e.value)


def test_toml_syntax_error_names_the_line() -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(VALID.replace("epochs = 2", "epochs = = 2"), "s.toml")
    assert _line_of(str(e.value)) == 10 and "not valid TOML" in str(e.value)


def test_unknown_table_names_its_header() -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(VALID + "\n[flet]\ndevices = 2\n", "s.toml")
    assert _line_of(str(e.value)) == 27 and "'flet'" in str(e.value)


_TABLE_STARTS = {"scenario": 1, "fleet": 5, "release": 9, "fault": 12, "expect": 24}
_KEY = st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    table=st.sampled_from(sorted(_TABLE_STARTS)),
    key=_KEY,
    value=st.sampled_from(["1", "true", '"x"', "2.5", "[1, 2]"]),
)
def test_any_unknown_key_is_refused_at_its_line(table: str, key: str, value: str) -> None:
    known = {
        "name",
        "timeout",
        "devices",
        "mode",
        "telemetry_interval",
        "inference_interval",
        "disk_mb",
        "model",
        "epochs",
        "baseline",
        "kind",
        "device",
        "at",
        "on_state",
        "duration",
        "restore_after",
        "rate",
        "percent",
        "release",
        "within",
        "state",
        "faults_fired",
        "serving",
        "max_failed",
    }
    if key in known:
        return
    lines = VALID.splitlines()
    insert_at = _TABLE_STARTS[table]  # just below the header: 1-based line insert_at + 1
    lines.insert(insert_at, f"{key} = {value}")
    with pytest.raises(ScenarioError) as e:
        parse_scenario("\n".join(lines), "fuzz.toml")
    assert _line_of(str(e.value)) == insert_at + 1, str(e.value)
    assert f"unknown key {key!r}" in str(e.value)


_NUMERIC = {  # line of the value in VALID -> (key, values that are impossible there)
    3: ("timeout", st.one_of(st.integers(max_value=0), st.integers(min_value=86_401))),
    6: ("devices", st.one_of(st.integers(max_value=0), st.integers(min_value=10_001))),
    10: ("epochs", st.one_of(st.integers(max_value=0), st.integers(min_value=201))),
    14: ("device", st.one_of(st.integers(max_value=0), st.integers(min_value=5))),
    16: ("restore_after", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    21: ("at", st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    22: ("duration", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), line=st.sampled_from(sorted(_NUMERIC)))
def test_any_impossible_number_is_refused_at_its_line(data: st.DataObject, line: int) -> None:
    key, values = _NUMERIC[line]
    value = data.draw(values)
    lines = VALID.splitlines()
    assert lines[line - 1].startswith(f"{key} = ")
    lines[line - 1] = f"{key} = {value!r}"
    with pytest.raises(ScenarioError) as e:
        parse_scenario("\n".join(lines), "fuzz.toml")
    assert _line_of(str(e.value)) == line, str(e.value)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_is_parsed_or_refused_with_a_line(text: str) -> None:
    try:
        parse_scenario(text, "junk.toml")
    except ScenarioError as e:
        assert _line_of(str(e)) >= 1
