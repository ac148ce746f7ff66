"""The cloud's relational database: engine, sessions and the declarative base.

SQLite (a file in the data dir) by default; PostgreSQL by URL at scale
(``EDGEFLEET_DATABASE_URL=postgresql+psycopg://...``). Each area defines its
tables in its own module on ``Base``; ``Database.create_all`` creates whatever
is imported.

There are no migrations: a column added to a table after release is listed in
``ADDED_COLUMNS``, nullable, and ``create_all`` adds it to a table an older
version created (``ALTER TABLE ... ADD COLUMN``, idempotent), so an existing
database keeps its rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

__all__ = ["ADDED_COLUMNS", "Base", "Database"]

log = logging.getLogger(__name__)

#: ``(table, column)`` added after the table was first released; each must be
#: nullable (old rows get NULL) and is declared on its model like any other.
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (("api_tokens", "expires_at"),)


class Base(DeclarativeBase):
    """Declarative base of every edgefleet table."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the API read while ingest writes; foreign keys are off by default in SQLite.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    # Read the file through a memory map: when another process (an ingest worker) has
    # written, SQLite drops this connection's page cache, and re-reading the pages is
    # then a memory access instead of a read() each (measured: -15 % per stored
    # telemetry row with two writers taking turns). Address space only, 64-bit hosts.
    cur.execute(f"PRAGMA mmap_size={256 << 20}")
    cur.close()


class Database:
    """An engine plus a session factory for one database URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        """Create every table whose module has been imported (idempotent)."""
        import cloud.auth, cloud.device_registry, cloud.ingest.tables  # noqa: E401, I001
        import cloud.registry.tables, cloud.rollouts.tables  # noqa: E401, F401

        Base.metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring tables an older version created up to ``ADDED_COLUMNS`` (idempotent)."""
        for table, column in ADDED_COLUMNS:
            if self._has_column(table, column):
                continue
            col = Base.metadata.tables[table].c[column]
            if not col.nullable:
                raise RuntimeError(f"{table}.{column} is listed as added but is not nullable")
            ddl = col.type.compile(dialect=self.engine.dialect)
            prep = self.engine.dialect.identifier_preparer
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(
                        f"ALTER TABLE {prep.quote(table)} ADD COLUMN {prep.quote(column)} {ddl}"
                    )
            except DBAPIError:
                # Another process starting on the same database may have added it first.
                if not self._has_column(table, column):
                    raise
            else:
                log.info("added column %s.%s to an existing table", table, column)

    def _has_column(self, table: str, column: str) -> bool:
        # A fresh inspector each time: it caches what it has read.
        return column in {c["name"] for c in inspect(self.engine).get_columns(table)}

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()
