"""Hypothesis on every parser that reads what a peer or a person sent.

The contract of each parser: any input either parses into a valid value or
raises the one documented error (``MessageError``, ``ManifestError``,
``ValueError``, ``ConfigError``, ``EnrollmentError``) -- never anything else,
never a hang. ``tests/unit/test_messages.py`` fuzzes ``decode`` of each message
kind; this file covers the rest: topics, device messages by topic, release
manifests, the TUF-over-MQTT frames, the agent's config file, CSRs and
bootstrap tokens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cloud.enrollment import BootstrapTokens
from cloud.pki import CertificateAuthority, EnrollmentError, load_csr
from device.config import CONFIG_NAME, load_config
from shared.errors import ConfigError, ManifestError, MessageError
from shared.manifest import ReleaseManifest
from shared.messages import decode_device_message
from shared.repo_wire import (
    MAX_CHUNK_BYTES,
    RepoRequest,
    RepoResponse,
    check_repo_path,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shared.topics import (
    ROOT,
    device_topic,
    parse_repo_request_topic,
    parse_topic,
    repo_request_topic,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
segment = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["dev-1", "..", ".", "", "+", "#", "a/b", "desired", "repo", "req", "resp", "\x00", " "]
)
topics = st.lists(segment, max_size=6).map("/".join) | st.builds(
    lambda parts: f"{ROOT}/devices/" + "/".join(parts), st.lists(segment, max_size=4)
)


# -- topics -------------------------------------------------------------------------------


@FUZZ
@given(topics)
def test_parse_topic_accepts_only_device_topics(topic: str) -> None:
    try:
        device_id, channel = parse_topic(topic)
    except ValueError:
        return
    assert device_topic(device_id, channel) == topic


@FUZZ
@given(topics)
def test_parse_repo_request_topic_round_trips(topic: str) -> None:
    try:
        device_id = parse_repo_request_topic(topic)
    except ValueError:
        return
    assert repo_request_topic(device_id) == topic and "/" not in device_id


@FUZZ
@given(topics, st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_device_messages_by_topic_never_crash(topic: str, payload: bytes) -> None:
    try:
        msg = decode_device_message(topic, payload)
    except MessageError:
        return
    device_id, channel = parse_topic(topic)
    assert msg.device_id == device_id and channel == msg.CHANNEL


# -- release manifests ------------------------------------------------------------------------

VALID_MANIFEST: dict[str, Any] = {
    "schema": "edgefleet.manifest/1",
    "model": "digits",
    "release": 3,
    "created_at": "1.5",
    "quantization": "int8",
    "input": {"name": "x", "shape": [1, 8, 8, 1], "dtype": "int8", "scale": "0.5", "zero_point": 0},
    "output": {"name": "y", "shape": [1, 10], "dtype": "float32"},
    "selftest": {"target": "digits/3/selftest.npz", "count": 4, "atol": "0.1"},
    "drift": {
        "target": "digits/3/baseline.npz",
        "features": "flatten",
        "n_features": 64,
        "bins": 8,
    },
}


def _mutate(value: Any, path: list[Any], new: Any) -> Any:
    if not path:
        return new
    if isinstance(value, dict) and value:
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: _mutate(value[key], path[1:], new)}
    if isinstance(value, list) and value:
        i = path[0] % len(value)
        return [*value[:i], _mutate(value[i], path[1:], new), *value[i + 1 :]]
    return new


@FUZZ
@given(st.lists(st.integers(0, 20), max_size=4), json_values, st.booleans())
def test_manifest_parsing_accepts_only_valid_manifests(
    path: list[int], new: Any, drop: bool
) -> None:
    manifest = _mutate(VALID_MANIFEST, path, new)
    if drop and isinstance(manifest, dict) and manifest:
        manifest = (
            {k: v for k, v in manifest.items() if k != sorted(manifest)[path[0] % len(manifest)]}
            if path
            else {}
        )
    try:
        parsed = ReleaseManifest.from_custom(
            {"edgefleet": manifest}, target="digits/3/model.tflite"
        )
    except ManifestError:
        return
    assert parsed.model_target == "digits/3/model.tflite"
    assert parsed.selftest.target.startswith("digits/3/")


@FUZZ
@given(json_values, st.text(max_size=40))
def test_manifest_parsing_of_arbitrary_custom_data(custom: Any, target: str) -> None:
    with contextlib.suppress(ManifestError):
        ReleaseManifest.from_custom(custom, target=target)


# -- TUF over MQTT frames ---------------------------------------------------------------------

repo_paths = st.builds(
    lambda top, rest: "/".join([top, *rest]),
    st.sampled_from(["metadata", "targets", "keys", "..", ""]),
    st.lists(segment, min_size=0, max_size=4),
)


@FUZZ
@given(repo_paths)
def test_repo_paths_never_escape(path: str) -> None:
    try:
        check_repo_path(path)
    except MessageError:
        return
    parts = path.split("/")
    assert parts[0] in ("metadata", "targets") and ".." not in parts and "." not in parts
    assert not path.startswith("/") and "\\" not in path and "\x00" not in path


@FUZZ
@given(
    st.binary(max_size=3000)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {
            "schema": st.just("edgefleet.repo_get/1"),
            "path": repo_paths,
            "offset": json_values,
            "length": json_values,
        }
    ).map(lambda d: json.dumps(d).encode())
)
def test_repo_request_decoding(payload: bytes) -> None:
    try:
        req = decode_request(payload)
    except MessageError:
        return
    check_repo_path(req.path)
    assert 0 < req.length <= MAX_CHUNK_BYTES and req.offset >= 0
    assert decode_request(encode_request(req)) == req


@FUZZ
@given(st.binary(max_size=600), st.binary(max_size=300))
def test_repo_response_decoding(header: bytes, data: bytes) -> None:
    for payload in (
        header,
        b"EFR1" + header + data,
        b"EFR1" + len(header).to_bytes(2, "big") + header + data,
    ):
        try:
            resp = decode_response(payload)
        except MessageError:
            continue
        assert decode_response(encode_response(resp)) == resp
        if resp.status == "ok":
            assert resp.offset + len(resp.data) <= resp.total
        else:
            assert resp.data == b""


@FUZZ
@given(
    st.sampled_from(["ok", "not_found", "bad_request", "busy", "error"]),
    st.integers(0, 2**41),
    st.integers(0, 2**41),
    st.binary(max_size=2000),
    st.text(max_size=400),
)
def test_repo_response_round_trip(
    status: str, offset: int, total: int, data: bytes, message: str
) -> None:
    try:
        resp = RepoResponse(
            status=status,
            offset=offset,
            total=total,
            data=data,  # type: ignore[arg-type]
            message=message,
        )
    except MessageError:
        return
    assert decode_response(encode_response(resp)) == resp


# -- the agent's config file ------------------------------------------------------------------

toml_values = st.sampled_from(
    [
        '"x"',
        "1",
        "1.5",
        "true",
        "[1, 2]",
        '["a"]',
        "{a = 1}",
        '"127.0.0.1"',
        "-3",
        '""',
        "1e400",
        "nan",
    ]
)
config_keys = st.sampled_from(
    [
        "device_id",
        "broker_host",
        "broker_port",
        "repo_url",
        "inference_threads",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "hardware_tags",
        "unknown",
        "telemetry_interval",
    ]
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(st.tuples(config_keys, toml_values), max_size=8) | st.text(max_size=200), st.booleans()
)
def test_config_parsing_never_crashes(lines: Any, anchor: bool) -> None:
    text = lines if isinstance(lines, str) else "\n".join(f"{k} = {v}" for k, v in lines)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        (data_dir / CONFIG_NAME).write_text(text)
        if anchor:
            (data_dir / "trust").mkdir()
            (data_dir / "trust" / "root.json").write_text("{}")
        try:
            cfg = load_config(data_dir)
        except ConfigError:
            return
        assert isinstance(cfg.device_id, str) and isinstance(cfg.broker_port, int)
        assert anchor


_PEM_HEAD = "-----BEGIN CERTIFICATE REQUEST-----"
_PEM_TAIL = "-----END CERTIFICATE REQUEST-----"


# -- enrollment -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("fuzz-ca") / "pki")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.binary(max_size=2000)
    | st.text(max_size=500).map(lambda t: f"{_PEM_HEAD}\n{t}\n{_PEM_TAIL}\n".encode())
)
def test_csr_parsing_never_crashes(csr: bytes) -> None:
    try:
        _, cn = load_csr(csr)
    except EnrollmentError:
        return
    assume(False)  # a random valid CSR is as good as impossible; reaching here is fine too
    assert cn


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.text(max_size=200) | st.just("efb_") | st.text(max_size=60).map("efb_".__add__))
def test_bootstrap_token_redemption_only_refuses(
    fuzz_ca: CertificateAuthority, secret: str
) -> None:
    with pytest.raises(EnrollmentError, match="bootstrap token refused"):
        BootstrapTokens(fuzz_ca).redeem(secret, _any_csr())


@functools.cache
def _any_csr() -> bytes:
    from tests.attacks.secure_env import make_csr

    return make_csr("dev-1")[1]


def test_request_dataclass_rejects_what_decode_rejects() -> None:
    for kwargs in (
        {"path": "../x"},
        {"path": "metadata/x", "offset": -1},
        {"path": "metadata/x", "length": MAX_CHUNK_BYTES + 1},
        {"path": "metadata/x", "length": True},
    ):
        with pytest.raises(MessageError):
            RepoRequest(**kwargs)
