"""A throw-away PostgreSQL cluster for the tests: initdb, start on loopback, stop, remove.

Uses the server binaries of an installed PostgreSQL (Debian's ``postgresql`` package puts them
in /usr/lib/postgresql/N/bin). PostgreSQL refuses to run as root: as root, every server command
runs as the ``postgres`` user (``nobody`` where there is none), which owns the cluster's directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) not found: "
    "install them with `apt-get install postgresql` (scripts/setup does it when run as root)"
)
_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql")


def find_bindir() -> Path | None:
    """The directory of the PostgreSQL server programs: PATH first, then the newest Debian one."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates += [Path(on_path).parent, Path(on_path).resolve().parent]
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: _version(p.parent.name), reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _PROGRAMS):
            return bindir
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgCluster:
    """A PostgreSQL cluster in a temporary directory with one database and its owner.

    ``with PgCluster(bindir) as pg:`` initialises and starts it; leaving the block stops it and
    removes the directory. ``pg.jdbc_url``, ``pg.user`` and ``pg.password`` reach the database.
    """

    def __init__(self, bindir: Path, database: str = "hapi", user: str = "hapi") -> None:
        self.bindir = bindir
        self.database = database
        self.user = user
        self.password = secrets.token_hex(12)
        self.port = 0
        self.root: Path | None = None
        self._as: dict[str, Any] = {}  # run the server's programs as this user
        self._owner = (os.getuid(), os.getgid())
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = pwd.getpwnam("nobody")
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            self._owner = (account.pw_uid, account.pw_gid)

    @property
    def jdbc_url(self) -> str:
        return f"jdbc:postgresql://127.0.0.1:{self.port}/{self.database}"

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def __enter__(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, program: str, *args: str) -> None:
        assert self.root is not None
        result = subprocess.run(
            [str(self.bindir / program), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **self._as,
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )

    def start(self) -> None:
        """Initialise the cluster, start it on a free loopback port, create user and database."""
        self.root = Path(tempfile.mkdtemp(prefix="ims-fhir-pg-"))
        os.chown(self.root, *self._owner)
        data = self.root / "data"
        options = "--username postgres --encoding UTF8 --locale C"
        options += " --auth-local trust --auth-host scram-sha-256"
        self._run("initdb", "--pgdata", str(data), *options.split())
        self.port = _free_port()
        # A throw-away cluster: durability is not needed, speed is.
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        self._run("pg_ctl", "--pgdata", str(data), "--log", str(self.log), "--wait", "start")
        self._psql(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )

    def _psql(self, *commands: str) -> None:
        args = ["--no-psqlrc", "--set", "ON_ERROR_STOP=1", "--host", str(self.root)]
        args += ["--port", str(self.port), "--username", "postgres", "--dbname", "postgres"]
        for command in commands:
            args += ["--command", command]
        self._run("psql", *args)

    def stop(self) -> None:
        """Stop the server (if it runs) and remove the cluster's directory."""
        if self.root is None:
            return
        data = self.root / "data"
        try:
            if (data / "postmaster.pid").exists():
                try:
                    self._run("pg_ctl", "--pgdata", str(data), "--mode", "fast", "--wait", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._run("pg_ctl", "--pgdata", str(data), "--mode", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def main() -> None:
    """``python -m tests.pgcluster``: run a throw-away cluster until Ctrl-C, for a HAPI by hand."""
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit(INSTALL_HINT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with PgCluster(bindir) as pg:
        print(
            "tests/hapi/run -- --ims.db=postgres"
            f" --ims.jdbc-url={pg.jdbc_url} --ims.db-user={pg.user}"
            f" --ims.db-password={pg.password}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
