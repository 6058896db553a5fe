"""The sync engine's local state: one SQLite file, keyed by server and identifier.

For each encounter pushed to a server it holds the content hash last written and the hash of a
write in flight (``pending``); for each resource written, its server id and version. SQLite's
atomic commits are what make a push resumable: a write is marked pending before it is sent and
recorded after it succeeds, so a push killed at any point (even ``kill -9``) leaves a state from
which a re-run finishes the job without duplicating or losing anything.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs

__all__ = ["RecordState", "ResourceState", "StateStore", "default_state_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS record (
    server TEXT NOT NULL,
    record_key TEXT NOT NULL,
    content_hash TEXT,
    pending_hash TEXT,
    PRIMARY KEY (server, record_key)
);
CREATE TABLE IF NOT EXISTS resource (
    server TEXT NOT NULL,
    identifier TEXT NOT NULL,
    record_key TEXT,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version TEXT,
    retired INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (server, identifier)
);
CREATE INDEX IF NOT EXISTS resource_by_record ON resource (server, record_key);
"""


def default_state_path() -> Path:
    """Return the default state file, in the user's data directory."""
    return Path(platformdirs.user_data_dir("ims-fhir")) / "state.sqlite3"


@dataclass(frozen=True, slots=True)
class RecordState:
    """What the state knows of one encounter on one server."""

    content_hash: str | None
    pending_hash: str | None


@dataclass(frozen=True, slots=True)
class ResourceState:
    """A resource written to a server: its identifier, type, server id and version."""

    identifier: str
    resource_type: str
    resource_id: str
    version: str | None
    record_key: str | None = None
    retired: bool = False


_SELECT_RESOURCE = (
    "SELECT identifier, resource_type, resource_id, version, record_key, retired FROM resource "
)


def _resource_state(row: tuple[str, str, str, str | None, str | None, int]) -> ResourceState:
    identifier, resource_type, resource_id, version, record_key, retired = row
    return ResourceState(identifier, resource_type, resource_id, version, record_key, bool(retired))


class StateStore:
    """The SQLite state file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        """Open (and create if needed) the state file at ``path``; ``:memory:`` for tests."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._db.close()

    def record(self, server: str, record_key: str) -> RecordState | None:
        """Return the state of one encounter on ``server``, or None if never pushed there."""
        row = self._db.execute(
            "SELECT content_hash, pending_hash FROM record WHERE server = ? AND record_key = ?",
            (server, record_key),
        ).fetchone()
        return RecordState(row[0], row[1]) if row else None

    def resources(self, server: str, record_key: str) -> dict[str, ResourceState]:
        """Return the resources written for one encounter, by identifier."""
        rows = self._db.execute(
            _SELECT_RESOURCE + "WHERE server = ? AND record_key = ?",
            (server, record_key),
        ).fetchall()
        return {row[0]: _resource_state(row) for row in rows}

    def resource(self, server: str, identifier: str) -> ResourceState | None:
        """Return one resource by identifier (shared resources such as a Patient too)."""
        row = self._db.execute(
            _SELECT_RESOURCE + "WHERE server = ? AND identifier = ?",
            (server, identifier),
        ).fetchone()
        return _resource_state(row) if row else None

    def all_resources(self, server: str) -> list[ResourceState]:
        """Return every resource recorded for ``server``."""
        rows = self._db.execute(
            _SELECT_RESOURCE + "WHERE server = ? ORDER BY identifier",
            (server,),
        ).fetchall()
        return [_resource_state(row) for row in rows]

    def mark_pending(self, server: str, record_keys: Iterable[tuple[str, str]]) -> None:
        """Record, before sending, that these (record_key, hash) writes are in flight."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO record (server, record_key, pending_hash) VALUES (?, ?, ?) "
                "ON CONFLICT (server, record_key) DO UPDATE SET "
                "pending_hash = excluded.pending_hash",
                ((server, key, content_hash) for key, content_hash in record_keys),
            )

    def commit_written(
        self,
        server: str,
        records: Iterable[tuple[str, str]],
        resources: Iterable[ResourceState],
    ) -> None:
        """Record a successful write: the records' hashes and the resources' ids and versions.

        Resources with ``retired`` set were made entered-in-error because the record no longer
        holds them; they stay recorded (with their new version) so the state keeps agreeing
        with the server.
        """
        with self._transaction():
            self._db.executemany(
                "INSERT INTO record (server, record_key, content_hash) VALUES (?, ?, ?) "
                "ON CONFLICT (server, record_key) DO UPDATE SET "
                "content_hash = excluded.content_hash, pending_hash = NULL",
                ((server, key, content_hash) for key, content_hash in records),
            )
            self._db.executemany(
                "INSERT INTO resource (server, identifier, record_key, resource_type, "
                "resource_id, version, retired) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (server, identifier) DO UPDATE SET "
                "record_key = excluded.record_key, resource_type = excluded.resource_type, "
                "resource_id = excluded.resource_id, version = excluded.version, "
                "retired = excluded.retired",
                (
                    (
                        server,
                        item.identifier,
                        item.record_key,
                        item.resource_type,
                        item.resource_id,
                        item.version,
                        int(item.retired),
                    )
                    for item in resources
                ),
            )

    def clear_pending(self, server: str, record_keys: Iterable[str]) -> None:
        """Forget in-flight marks of writes that certainly did not happen (refused)."""
        with self._transaction():
            self._db.executemany(
                "UPDATE record SET pending_hash = NULL WHERE server = ? AND record_key = ?",
                ((server, key) for key in record_keys),
            )

    def counts(self, server: str) -> dict[str, int]:
        """Return how many resources of each type the state holds for ``server``."""
        rows = self._db.execute(
            "SELECT resource_type, COUNT(*) FROM resource WHERE server = ? GROUP BY resource_type",
            (server,),
        ).fetchall()
        return {row[0]: row[1] for row in rows}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction: committed whole or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
