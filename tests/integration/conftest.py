"""Fixtures of the integration tests: a SQLite database of the test's own
(modules that test PostgreSQL too define their own ``db``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.db import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'ingest.db'}")
    database.create_all()
    yield database
    database.dispose()
