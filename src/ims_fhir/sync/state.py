"""The sync engine's local state: one SQLite file, keyed by server and identifier.

For each encounter pushed to a server it holds the content hash last written and the hash of a
write in flight (``pending``); for each resource written, its server id, its version and its
*signature* (a hash of its content with server-assigned parts left out, see ``signature.py``);
for each resource of a write in flight, the signature it was sent with. A write is marked pending
before it is sent and recorded after it succeeds, so a push killed at any point (even
``kill -9``) leaves a state from which a re-run recognises its own earlier writes by content and
finishes the job without duplicating, losing or overwriting anything.

The state is a cache of what ims-fhir wrote, never the truth about the server: every id in it is
checked against the server (type and identifier) before anything is written by that id.

The file is created readable by its owner only (it names patients' record ids) and is locked
while a store has it open, so two processes never interleave their writes to one server's state.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ParamSpec, TypeVar

import platformdirs

from .._exceptions import StateError

__all__ = ["RecordState", "ResourceState", "StateStore", "default_state_path"]

SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS record (
    server TEXT NOT NULL,
    record_key TEXT NOT NULL,
    content_hash TEXT,
    pending_hash TEXT,
    record_digest TEXT,
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
    signature TEXT,
    owned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (server, identifier)
);
CREATE INDEX IF NOT EXISTS resource_by_record ON resource (server, record_key);
CREATE TABLE IF NOT EXISTS pending (
    server TEXT NOT NULL,
    identifier TEXT NOT NULL,
    record_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (server, identifier, signature)
);
CREATE INDEX IF NOT EXISTS pending_by_record ON pending (server, record_key);
CREATE TABLE IF NOT EXISTS superseded (
    server TEXT NOT NULL,
    identifier TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (server, identifier, signature)
);
"""

_COLUMNS = {
    "record": {"server", "record_key", "content_hash", "pending_hash"},
    "resource": {
        "server",
        "identifier",
        "record_key",
        "resource_type",
        "resource_id",
        "version",
        "retired",
        "signature",
        "owned",
    },
    "pending": {"server", "identifier", "record_key", "signature"},
    "superseded": {"server", "identifier", "signature"},
}

DEFAULT_LOCK_TIMEOUT = 30.0
"""Seconds a store waits for another process to release the state file."""


def default_state_path() -> Path:
    """Return the default state file, in the user's data directory."""
    return Path(platformdirs.user_data_dir("ims-fhir")) / "state.sqlite3"


@dataclass(frozen=True, slots=True)
class RecordState:
    """What the state knows of one encounter on one server."""

    content_hash: str | None
    pending_hash: str | None
    record_digest: str | None = None
    """The digest of the record (and the mapping) whose Bundle had ``content_hash``: a record
    with this digest maps to that Bundle, so a re-push need not map it to know it unchanged."""


@dataclass(frozen=True, slots=True)
class ResourceState:
    """A resource written to a server: identifier, type, server id, version and signature."""

    identifier: str
    resource_type: str
    resource_id: str
    version: str | None
    record_key: str | None = None
    retired: bool = False
    signature: str | None = None
    owned: bool = False
    """A shared resource (patient, practitioner, clinic) ims-fhir created for this clinic."""


_SELECT_RESOURCE = (
    "SELECT identifier, resource_type, resource_id, version, record_key, retired, signature, "
    "owned "
    "FROM resource "
)

P = ParamSpec("P")
R = TypeVar("R")


def _resource_state(
    row: tuple[str, str, str, str | None, str | None, int, str | None, int],
) -> ResourceState:
    identifier, resource_type, resource_id, version, record_key, retired, signature, owned = row
    return ResourceState(
        identifier,
        resource_type,
        resource_id,
        version,
        record_key,
        bool(retired),
        signature,
        bool(owned),
    )


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Turn SQLite's and the file system's errors into one-line :class:`StateError`s."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            store = args[0]
            assert isinstance(store, StateStore)
            raise store._error(exc) from exc

    return wrapper


class StateStore:
    """The SQLite state file. Use as a context manager, or call :meth:`close`.

    Args:
        path: the state file (created, readable by its owner only, if missing); ``":memory:"``
            for a state that lives as long as the store.
        lock_timeout: seconds to wait while another process holds the file, before a
            :class:`~ims_fhir.StateError` that names that process.

    Raises:
        StateError: the file cannot be created, read or written, is not an ims-fhir state file,
            was written by a newer ims-fhir, or stays locked by another process.
    """

    def __init__(self, path: str | Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        """Open (and create if needed) the state file at ``path``."""
        self.path = path
        self._lock: IO[str] | None = None
        self._db: sqlite3.Connection | None = None
        try:
            if str(path) != ":memory:":
                file = Path(path)
                if file.exists() and not file.is_file():
                    raise IsADirectoryError(f"{file} is not a file")
                file.parent.mkdir(parents=True, exist_ok=True)
                self._lock = _acquire_lock(file, lock_timeout)
                _create_private(file)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except StateError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            error = self._error(exc)
            self.close()
            raise error from exc

    def _error(self, exc: BaseException) -> StateError:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
            fix = "it is not an ims-fhir state file: pass another --state, or move it aside"
        elif isinstance(exc, sqlite3.DatabaseError) and "malformed" in text:
            fix = "it is damaged: move it aside and run `ims-fhir push --verify` to rebuild it"
        elif "readonly" in text or isinstance(exc, PermissionError):
            fix = "make it (and its folder) writable by this user, or pass another --state"
        else:
            fix = "check the path and its permissions, or pass another --state"
        return StateError(f"state file {self.path}: {text}; {fix}")

    def _migrate(self) -> None:
        db = self._connection
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path} was written by a newer ims-fhir (schema {version}); "
                "upgrade ims-fhir or pass another --state"
            )
        tables = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        with self._transaction():
            if "resource" in tables and version < 2:
                columns = {row[1] for row in db.execute("PRAGMA table_info(resource)")}
                if "signature" not in columns and {"server", "identifier"} <= columns:
                    db.execute("ALTER TABLE resource ADD COLUMN signature TEXT")
            if "record" in tables and version < 5:
                columns = {row[1] for row in db.execute("PRAGMA table_info(record)")}
                if "record_digest" not in columns and {"server", "record_key"} <= columns:
                    db.execute("ALTER TABLE record ADD COLUMN record_digest TEXT")
            if "resource" in tables and version < 4:
                columns = {row[1] for row in db.execute("PRAGMA table_info(resource)")}
                if "owned" not in columns and {"server", "identifier"} <= columns:
                    db.execute("ALTER TABLE resource ADD COLUMN owned INTEGER NOT NULL DEFAULT 0")
            for table, wanted in _COLUMNS.items():
                if table not in tables:
                    continue
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if not wanted <= columns:
                    raise StateError(
                        f"state file {self.path}: table {table!r} is not ims-fhir's "
                        f"(missing {', '.join(sorted(wanted - columns))}); pass another --state"
                    )
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError("the state store is closed")
        return self._db

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and release its lock."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None

    @_guarded
    def record(self, server: str, record_key: str) -> RecordState | None:
        """Return the state of one encounter on ``server``, or None if never pushed there."""
        row = self._connection.execute(
            "SELECT content_hash, pending_hash, record_digest FROM record "
            "WHERE server = ? AND record_key = ?",
            (server, record_key),
        ).fetchone()
        return RecordState(row[0], row[1], row[2]) if row else None

    @_guarded
    def resources(self, server: str, record_key: str) -> dict[str, ResourceState]:
        """Return the resources written for one encounter, by identifier."""
        rows = self._connection.execute(
            _SELECT_RESOURCE + "WHERE server = ? AND record_key = ?",
            (server, record_key),
        ).fetchall()
        return {row[0]: _resource_state(row) for row in rows}

    @_guarded
    def resource(self, server: str, identifier: str) -> ResourceState | None:
        """Return one resource by identifier (shared resources such as a Patient too)."""
        row = self._connection.execute(
            _SELECT_RESOURCE + "WHERE server = ? AND identifier = ?",
            (server, identifier),
        ).fetchone()
        return _resource_state(row) if row else None

    @_guarded
    def resources_by_identifier(
        self, server: str, identifiers: Iterable[str]
    ) -> dict[str, ResourceState]:
        """The resources among ``identifiers`` that the state holds (a query per 500)."""
        wanted = sorted(set(identifiers))
        found: dict[str, ResourceState] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self._connection.execute(
                _SELECT_RESOURCE
                + f"WHERE server = ? AND identifier IN ({','.join('?' * len(chunk))})",
                (server, *chunk),
            ).fetchall()
            found |= {row[0]: _resource_state(row) for row in rows}
        return found

    @_guarded
    def all_resources(self, server: str) -> list[ResourceState]:
        """Return every resource recorded for ``server``."""
        rows = self._connection.execute(
            _SELECT_RESOURCE + "WHERE server = ? ORDER BY identifier",
            (server,),
        ).fetchall()
        return [_resource_state(row) for row in rows]

    @_guarded
    def superseded(self, server: str, identifier: str) -> set[str]:
        """The signatures a resource had in ims-fhir's writes that later writes replaced."""
        rows = self._connection.execute(
            "SELECT signature FROM superseded WHERE server = ? AND identifier = ?",
            (server, identifier),
        ).fetchall()
        return {row[0] for row in rows}

    @_guarded
    def pending_signatures(self, server: str, record_key: str) -> dict[str, set[str]]:
        """Return the signatures sent for one encounter by writes whose outcome is unknown."""
        rows = self._connection.execute(
            "SELECT identifier, signature FROM pending WHERE server = ? AND record_key = ?",
            (server, record_key),
        ).fetchall()
        found: dict[str, set[str]] = {}
        for identifier, signature in rows:
            found.setdefault(identifier, set()).add(signature)
        return found

    @_guarded
    def mark_pending(
        self,
        server: str,
        record_keys: Iterable[tuple[str, str]],
        signatures: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        """Record, before sending, the writes in flight.

        Args:
            server: the server's base URL.
            record_keys: ``(record_key, content_hash)`` of each encounter being written.
            signatures: ``(identifier, record_key, signature)`` of each resource being sent.
                They accumulate until the write is committed or known refused, so a re-run
                recognises any of them on the server as ims-fhir's own.
        """
        with self._transaction():
            db = self._connection
            db.executemany(
                "INSERT INTO record (server, record_key, pending_hash) VALUES (?, ?, ?) "
                "ON CONFLICT (server, record_key) DO UPDATE SET "
                "pending_hash = excluded.pending_hash",
                ((server, key, content_hash) for key, content_hash in record_keys),
            )
            db.executemany(
                "INSERT OR IGNORE INTO pending (server, identifier, record_key, signature) "
                "VALUES (?, ?, ?, ?)",
                ((server, ident, key, sig) for ident, key, sig in signatures),
            )

    @_guarded
    def commit_written(
        self,
        server: str,
        records: Iterable[tuple[str, str] | tuple[str, str, str | None]],
        resources: Iterable[ResourceState],
    ) -> None:
        """Record a successful write: the records' hashes and the resources' ids and versions.

        ``records`` are ``(record_key, content_hash)``, or with the record's digest as a third
        item (see :class:`RecordState`); without one, any digest held before is dropped.

        Resources with ``retired`` set were made entered-in-error because the record no longer
        holds them; they stay recorded (with their new version) so the state keeps agreeing
        with the server. The records' pending marks are cleared.
        """
        rows = [(key, content, digest[0] if digest else None) for key, content, *digest in records]
        resources = list(resources)
        with self._transaction():
            db = self._connection
            # The signature each resource had before this write, if it had another: an earlier
            # write of ims-fhir's, which a copy put back on the server must not pass for its own.
            db.executemany(
                "INSERT OR IGNORE INTO superseded (server, identifier, signature) "
                "SELECT server, identifier, signature FROM resource "
                "WHERE server = ? AND identifier = ? AND signature IS NOT NULL AND signature != ?",
                (
                    (server, item.identifier, item.signature)
                    for item in resources
                    if item.signature is not None
                ),
            )
            db.executemany(
                "INSERT INTO record (server, record_key, content_hash, record_digest) "
                "VALUES (?, ?, ?, ?) "
                "ON CONFLICT (server, record_key) DO UPDATE SET "
                "content_hash = excluded.content_hash, pending_hash = NULL, "
                "record_digest = excluded.record_digest",
                ((server, key, content, digest) for key, content, digest in rows),
            )
            db.executemany(
                "DELETE FROM pending WHERE server = ? AND record_key = ?",
                ((server, key) for key, _, _ in rows),
            )
            db.executemany(
                "INSERT INTO resource (server, identifier, record_key, resource_type, "
                "resource_id, version, retired, signature, owned) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (server, identifier) DO UPDATE SET "
                "record_key = excluded.record_key, resource_type = excluded.resource_type, "
                "resource_id = excluded.resource_id, version = excluded.version, "
                "retired = excluded.retired, signature = excluded.signature, "
                "owned = excluded.owned",
                (
                    (
                        server,
                        item.identifier,
                        item.record_key,
                        item.resource_type,
                        item.resource_id,
                        item.version,
                        int(item.retired),
                        item.signature,
                        int(item.owned),
                    )
                    for item in resources
                ),
            )

    @_guarded
    def note_digests(self, server: str, records: Iterable[tuple[str, str, str]]) -> None:
        """Remember the digests of records found unchanged by their Bundle's content hash.

        ``records`` are ``(record_key, content_hash, record_digest)``; a digest is kept only
        where the state still holds that content hash and no write is in flight.
        """
        with self._transaction():
            self._connection.executemany(
                "UPDATE record SET record_digest = ? WHERE server = ? AND record_key = ? "
                "AND content_hash = ? AND pending_hash IS NULL",
                ((digest, server, key, content) for key, content, digest in records),
            )

    @_guarded
    def forget(self, server: str, identifiers: Iterable[str]) -> None:
        """Forget resources whose recorded id proved wrong or that are gone from the server."""
        with self._transaction():
            self._connection.executemany(
                "DELETE FROM resource WHERE server = ? AND identifier = ?",
                ((server, identifier) for identifier in identifiers),
            )

    @_guarded
    def clear_pending(self, server: str, record_keys: Iterable[str]) -> None:
        """Forget in-flight marks of writes that certainly did not happen (refused)."""
        keys = list(record_keys)
        with self._transaction():
            db = self._connection
            db.executemany(
                "UPDATE record SET pending_hash = NULL WHERE server = ? AND record_key = ?",
                ((server, key) for key in keys),
            )
            db.executemany(
                "DELETE FROM pending WHERE server = ? AND record_key = ?",
                ((server, key) for key in keys),
            )

    @_guarded
    def counts(self, server: str) -> dict[str, int]:
        """Return how many resources of each type the state holds for ``server``."""
        rows = self._connection.execute(
            "SELECT resource_type, COUNT(*) FROM resource WHERE server = ? GROUP BY resource_type",
            (server,),
        ).fetchall()
        return {row[0]: row[1] for row in rows}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction: committed whole or not at all."""
        db = self._connection
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _create_private(file: Path) -> None:
    """Create the state file readable by its owner only; tighten an existing one."""
    if not file.exists():
        os.close(os.open(file, os.O_CREAT | os.O_RDWR, 0o600))
    for path in (file, Path(f"{file}-wal"), Path(f"{file}-shm")):
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                with contextlib.suppress(PermissionError):
                    path.chmod(0o600)


def _acquire_lock(file: Path, timeout: float) -> IO[str] | None:
    """Hold an exclusive lock on ``file``.lock; wait up to ``timeout`` s, then name the holder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: SQLite's own locking only
        return None
    lock_path = Path(f"{file}.lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    handle = os.fdopen(fd, "r+", encoding="utf-8")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read(200).strip() or "another process"
                handle.close()
                raise StateError(
                    f"state file {file} is in use by {holder}; wait for that push to finish "
                    "or pass another --state"
                ) from None
            time.sleep(0.1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle
