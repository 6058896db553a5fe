"""The state file: private, locked, migrated, and every problem one clear line."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from ims_fhir import StateError, StateStore
from ims_fhir.sync.state import ResourceState

from .conftest import ROOT

SERVER = "https://fhir.example.org/r4"


def test_a_new_state_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.sqlite3"
    with StateStore(path) as state:
        state.mark_pending(SERVER, [("enc", "h1")], [("obs", "enc", "s1")])
    for file in path.parent.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) & 0o077 == 0, file


def test_an_existing_world_readable_state_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateStore(path).close()
    path.chmod(0o644)
    StateStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_pending_signatures_accumulate_until_committed(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.sqlite3") as state:
        state.mark_pending(SERVER, [("enc", "h1")], [("obs", "enc", "s1")])
        state.mark_pending(SERVER, [("enc", "h2")], [("obs", "enc", "s2")])
        assert state.pending_signatures(SERVER, "enc") == {"obs": {"s1", "s2"}}
        assert state.record(SERVER, "enc").pending_hash == "h2"  # type: ignore[union-attr]
        written = ResourceState("obs", "Observation", "7", "2", "enc", signature="s2")
        state.commit_written(SERVER, [("enc", "h2")], [written])
        assert state.pending_signatures(SERVER, "enc") == {}
        assert state.resources(SERVER, "enc") == {"obs": written}
        state.mark_pending(SERVER, [("enc", "h3")], [("obs", "enc", "s3")])
        state.clear_pending(SERVER, ["enc"])
        assert state.pending_signatures(SERVER, "enc") == {}


def test_a_state_file_of_the_first_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE record (server TEXT NOT NULL, record_key TEXT NOT NULL, content_hash TEXT,
            pending_hash TEXT, PRIMARY KEY (server, record_key));
        CREATE TABLE resource (server TEXT NOT NULL, identifier TEXT NOT NULL, record_key TEXT,
            resource_type TEXT NOT NULL, resource_id TEXT NOT NULL, version TEXT,
            retired INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server, identifier));
        INSERT INTO record VALUES ('s', 'enc', 'h1', NULL);
        INSERT INTO resource VALUES ('s', 'obs', 'enc', 'Observation', '5', '1', 0);
        """
    )
    db.close()
    with StateStore(path) as state:
        assert state.resources("s", "enc")["obs"].signature is None
        assert state.resources("s", "enc")["obs"].version == "1"


def test_a_state_file_of_schema_3_keeps_its_resources_and_owns_none(tmp_path: Path) -> None:
    """Shared resources recorded before ownership was (issue 17) are not taken as ims-fhir's."""
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE resource (server TEXT NOT NULL, identifier TEXT NOT NULL, record_key TEXT,
            resource_type TEXT NOT NULL, resource_id TEXT NOT NULL, version TEXT,
            retired INTEGER NOT NULL DEFAULT 0, signature TEXT, PRIMARY KEY (server, identifier));
        INSERT INTO resource VALUES ('s', 'ns/patient|1', NULL, 'Patient', '7', '2', 0, NULL);
        PRAGMA user_version = 3;
        """
    )
    db.close()
    with StateStore(path) as state:
        (patient,) = state.resources_by_identifier("s", ["ns/patient|1"]).values()
        assert (patient.resource_id, patient.version, patient.owned) == ("7", "2", False)
        state.commit_written("s", [], [replace(patient, owned=True, signature="sig")])
    with StateStore(path) as state:
        assert state.resources_by_identifier("s", ["ns/patient|1"])["ns/patient|1"].owned


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            b"name,value\nnot,sqlite\n" * 50, "not an ims-fhir state file", id="text-file"
        ),
        pytest.param(b"SQLite format 3\x00" + b"\xff" * 4000, "", id="damaged"),
    ],
)
def test_a_file_that_is_not_a_state_file_gives_one_clear_error(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(content)
    with pytest.raises(StateError) as error:
        StateStore(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert expected in message


def test_a_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE resource (name TEXT)")
    db.close()
    with pytest.raises(StateError, match="is not ims-fhir's"):
        StateStore(path)


def test_a_state_file_from_a_newer_ims_fhir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StateError, match="newer ims-fhir"):
        StateStore(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only files")
def test_a_read_only_state_file_gives_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateStore(path).close()
    path.chmod(0o400)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StateError, match="writable"):
            with StateStore(path) as state:
                state.mark_pending(SERVER, [("enc", "h")])
    finally:
        tmp_path.chmod(0o700)


def test_a_directory_or_an_unreachable_path_gives_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=str(tmp_path)):
        StateStore(tmp_path)
    with pytest.raises(StateError, match="/proc/nope"):
        StateStore("/proc/nope/state.sqlite3")
    with pytest.raises(StateError, match="/proc/state.sqlite3"):  # a read-only file system
        StateStore("/proc/state.sqlite3")


def test_a_second_process_waits_for_the_lock_then_names_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from ims_fhir import StateStore
        with StateStore({str(path)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    with subprocess.Popen(
        [sys.executable, "-c", holder],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(StateError, match=f"in use by process {process.pid}"):
            StateStore(path, lock_timeout=0.3)
        process.stdin.write("\n")
        process.stdin.flush()
        process.wait(timeout=30)
    StateStore(path, lock_timeout=5).close()  # released: the next one gets it
