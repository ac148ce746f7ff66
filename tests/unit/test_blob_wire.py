"""The fan-out wire format (``shared.blob_wire``, blob topics in ``shared.topics``)
and the agent's ``blob_source`` setting: what a hostile broker sends is bounded
and refused with a reason; a wrong setting is refused naming the choices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.agent import AgentConfig
from device.config import CONFIG_NAME, load_config, provision
from shared.blob_wire import (
    BLOB_SCHEMA,
    MAX_BLOB_CHUNK_BYTES,
    MAX_META_BYTES,
    MIN_BLOB_CHUNK_BYTES,
    BlobMeta,
    decode_meta,
    encode_meta,
)
from shared.errors import ConfigError, MessageError
from shared.topics import blob_chunk_topic, blob_meta_topic, parse_blob_topic

SHA = "0123456789abcdef" * 4


def _meta(**fields: object) -> bytes:
    data: dict[str, object] = {
        "schema": BLOB_SCHEMA,
        "sha256": SHA,
        "size": 5000,
        "chunk_bytes": 1024,
        "chunks": 5,
    }
    data.update(fields)
    return json.dumps(data).encode()


def test_meta_round_trips_and_names_its_chunks() -> None:
    meta = BlobMeta(SHA, 5000, 1024)
    assert decode_meta(encode_meta(meta), sha256=SHA) == meta
    assert meta.chunks == 5
    assert meta.chunk_range(0) == (0, 1024)
    assert meta.chunk_range(4) == (4096, 904)
    assert BlobMeta(SHA, 0, 1024).chunks == 0
    assert BlobMeta(SHA, 2048, 1024).chunk_range(1) == (1024, 1024)
    with pytest.raises(MessageError, match="no chunk 5"):
        meta.chunk_range(5)
    with pytest.raises(MessageError, match="no chunk -1"):
        meta.chunk_range(-1)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a edgefleet.blob/1 object"),
        (_meta(schema="edgefleet.blob/2"), "not a edgefleet.blob/1 object"),
        (_meta(sha256="ABC"), "not a lowercase sha256"),
        (_meta(size=-1), "'size' is -1"),
        (_meta(size=True), "'size' is True"),
        (_meta(size=1 << 41), "'size'"),
        (_meta(chunk_bytes=MIN_BLOB_CHUNK_BYTES - 1), "'chunk_bytes'"),
        (_meta(chunk_bytes=MAX_BLOB_CHUNK_BYTES + 1), "'chunk_bytes'"),
        (_meta(chunk_bytes="1024"), "'chunk_bytes'"),
        (_meta(chunks=4), "make 5"),
        (_meta(sha256="f" * 64), "arrived on the topic of"),
        (b" " * (MAX_META_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_meta_refused_with_the_reason(payload: bytes, needle: str) -> None:
    with pytest.raises(MessageError, match=re.escape(needle)):
        decode_meta(payload, sha256=SHA)


@given(st.binary(max_size=2 * MAX_META_BYTES))
def test_any_meta_bytes_parse_or_raise_message_error(payload: bytes) -> None:
    try:
        meta = decode_meta(payload)
    except MessageError:
        return
    assert meta.size >= 0 and MIN_BLOB_CHUNK_BYTES <= meta.chunk_bytes <= MAX_BLOB_CHUNK_BYTES


def test_blob_topics_round_trip_and_refuse_anything_else() -> None:
    assert parse_blob_topic(blob_meta_topic(SHA)) == (SHA, None)
    assert parse_blob_topic(blob_chunk_topic(SHA, 0)) == (SHA, 0)
    assert parse_blob_topic(blob_chunk_topic(SHA, 123456)) == (SHA, 123456)
    for topic in (
        f"edgefleet/v1/blobs/{SHA}/01",
        f"edgefleet/v1/blobs/{SHA}/-1",
        f"edgefleet/v1/blobs/{SHA}/+",
        f"edgefleet/v1/blobs/{SHA}/1234567890",
        f"edgefleet/v1/blobs/{SHA}/0/x",
        f"edgefleet/v1/blobs/{SHA.upper()}/meta",
        "edgefleet/v1/blobs/abc/meta",
        f"edgefleet/v1/devices/{SHA}/meta",
    ):
        with pytest.raises(ValueError):
            parse_blob_topic(topic)
    for bad in (-1, True, 10**9):
        with pytest.raises(ValueError):
            blob_chunk_topic(SHA, bad)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        blob_meta_topic("../../devices/x")


@given(st.text(max_size=120))
def test_any_topic_parses_or_raises_value_error(topic: str) -> None:
    try:
        sha, index = parse_blob_topic(topic)
    except ValueError:
        return
    assert len(sha) == 64 and (index is None or index >= 0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "root.json"
    root.write_text(json.dumps({"signed": {"_type": "root"}, "signatures": []}))
    d = tmp_path / "dev"
    provision(
        d,
        device_id="dev-1",
        root_file=root,
        broker_host="127.0.0.1",
        broker_port=1883,
        repo_url="http://127.0.0.1:8080/tuf/",
    )
    return d


def test_blob_source_defaults_to_auto_and_takes_the_three_words(data_dir: Path) -> None:
    assert load_config(data_dir).blob_source == "auto"
    for word in ("auto", "mqtt", "http"):
        assert load_config(data_dir, blob_source=word).blob_source == word


@pytest.mark.parametrize("line", ['blob_source = "ftp"', 'blob_source = "HTTP"', "blob_source = 1"])
def test_other_blob_sources_refused_naming_the_choices(data_dir: Path, line: str) -> None:
    with (data_dir / CONFIG_NAME).open("a") as f:
        f.write(line + "\n")
    with pytest.raises(ConfigError, match="blob_source"):
        load_config(data_dir)


def test_agent_config_refuses_an_unknown_blob_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use one of auto, mqtt, http"):
        AgentConfig(
            device_id="d",
            data_dir=tmp_path,
            broker_host="h",
            broker_port=1,
            repo_url="http://x/",
            blob_source="ftp",
        )
