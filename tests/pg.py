"""Throwaway databases for tests: SQLite in a temp dir, or PostgreSQL on the local server.

PostgreSQL runs against ``EDGEFLEET_TEST_PG_ADMIN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``): each use gets a database
``edgefleet_test_<random>`` that is dropped afterwards. Tests are skipped, with
the reason, only when no server answers.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.db import Database

__all__ = ["PG_ADMIN", "open_database", "pg_database"]

PG_ADMIN = os.environ.get(
    "EDGEFLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def pg_database() -> Iterator[str]:
    """Yield the URL of a fresh PostgreSQL database; drop it when resumed."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL server answers at {PG_ADMIN}: {e}")
    name = f"edgefleet_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def open_database(kind: str, tmp_path: Path) -> Iterator[Database]:
    """A fixture body: a ``Database`` with every table, of ``kind`` sqlite|postgresql."""
    if kind == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{tmp_path / 'edgefleet.db'}"])
    else:
        urls = pg_database()
    url = next(urls)
    database = Database(url)
    try:
        database.create_all()
        yield database
    finally:
        database.dispose()
        for _ in urls:  # runs the generator's cleanup (drops the PostgreSQL database)
            pass
