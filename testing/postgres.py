"""A real PostgreSQL server for the tests: Debian's postgresql-15 binaries, a throw-away cluster made by
`initdb` in a temporary directory, `postgres` on a free loopback port (TCP only, trust authentication).
`start(listen_host=..., client_networks=[...])` serves another address instead, e.g. the real node's
bridge, where pods connect from their own network (trusted too: it exists only while the test runs).

PostgreSQL refuses to run as root, and tests here often do: the server and initdb then run as the
`postgres` system user the Debian package creates (through `setpriv`), in a directory it owns.
Durability settings are off (fsync, synchronous_commit): the cluster lives as long as the test session,
and what the tests check is what clients see, which those settings do not change.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from local_mode.processes import LOOPBACK, ChildProcess, free_port

PG_BIN = Path(os.environ.get("MNIST_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT_SECONDS = 60.0
SUPERUSER = "postgres"


def _as_postgres_user() -> list[str]:
    """The command prefix that drops root to the `postgres` user; nothing when not root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={SUPERUSER}", f"--regid={SUPERUSER}", "--clear-groups", "--"]


@dataclass
class PostgresServer:
    child: ChildProcess
    port: int
    root: Path  # the cluster's directory (data and nothing else), removed by stop()
    host: str = LOOPBACK

    @classmethod
    def start(
        cls,
        workdir: Path,
        timeout: float = START_TIMEOUT_SECONDS,
        *,
        listen_host: str = LOOPBACK,
        client_networks: Sequence[str] = (),
    ) -> PostgresServer:
        initdb, postgres = PG_BIN / "initdb", PG_BIN / "postgres"
        if not initdb.exists() or not postgres.exists():
            raise FileNotFoundError(
                f"PostgreSQL 15 server binaries not found in {PG_BIN} (apt-get install postgresql-15)"
            )
        # Not under pytest's tmp directories: they are private to root, and the server may not be root.
        root = Path(tempfile.mkdtemp(prefix="mnist-postgres-"))
        data = root / "data"
        prefix = _as_postgres_user()
        if prefix:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(root, user.pw_uid, user.pw_gid)
        completed = subprocess.run(
            [
                *prefix,
                str(initdb),
                f"--pgdata={data}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed ({completed.returncode}):\n{completed.stdout}{completed.stderr}"
            )
        if client_networks:
            # initdb's --auth=trust only lets loopback in; pods connect from their own addresses.
            with (data / "pg_hba.conf").open("a") as hba:
                for network in client_networks:
                    hba.write(f"host all all {network} trust\n")
        port = free_port(listen_host)
        settings = {
            "listen_addresses": listen_host,
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        command = [*prefix, str(postgres), "-D", str(data), "-p", str(port)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        child = ChildProcess.spawn(
            "postgres", command, workdir / f"postgres-{port}.log", die_with_parent=True
        )
        server = cls(child, port, root, listen_host)
        try:
            child.wait_ready(server.accepting, timeout, "PostgreSQL to accept connections", 0.2)
        except BaseException:
            server.stop()
            raise
        return server

    def accepting(self) -> bool:
        completed = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-t", "2"],
            capture_output=True,
            check=False,
        )
        return completed.returncode == 0

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database` (psycopg2 driver)."""
        return f"postgresql+psycopg2://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        completed = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {completed.stderr.strip()}")
        return completed.stdout

    def create_database(self, name: str) -> str:
        """A new empty database (each test gets its own, so tests share one server); its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown: it ends client sessions instead of waiting for pooled
        # connections to close (SIGTERM's "smart" shutdown would).
        if self.child.is_running():
            self.child.signal_group(signal.SIGINT)
            try:
                self.child.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.child.kill()
        shutil.rmtree(self.root, ignore_errors=True)
