"""Throw-away PostgreSQL and Redis servers for the CeleryExecutor test, on free 127.0.0.1 ports.

Both come from Debian's packages (``include/scripts/distributed_deps.sh`` installs them when missing) and keep
their data in the folder they are given: nothing of the system-wide services is used or touched. PostgreSQL runs
as the ``postgres`` user (``initdb`` / ``pg_ctl``; it refuses to run as root), with scram-sha-256 passwords, no
Unix socket and durability switched off (a test cluster: fsync off is fine). Redis runs in the foreground in its
own process group with ``--save ''`` (no snapshots).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench.airflow_runner import free_port, stop_process_groups


def _ready(host: str, port: int, probe: bytes = b"", expect: bytes = b"") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            if probe:
                s.sendall(probe)
                return s.recv(64).startswith(expect)
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


class Postgres:
    """A PostgreSQL cluster in ``root/data`` owned by ``postgres``, one database and one password user."""

    def __init__(self, root: Path, *, database: str = "airflow", user: str = "airflow") -> None:
        self.root = root.resolve()
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.database = database
        self.user = user
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.bindir = self.find_bindir()

    @staticmethod
    def find_bindir() -> Path:
        """Debian keeps the server binaries in ``/usr/lib/postgresql/<major>/bin`` (not on PATH): the newest."""
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
        initdb = found[-1] if found else shutil.which("initdb")
        if not initdb:
            raise FileNotFoundError("PostgreSQL's initdb not found: run include/scripts/distributed_deps.sh")
        return Path(initdb).resolve().parent

    def _as_postgres(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # As root the server binaries run as the package's `postgres` user; as anyone else, as that user.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        try:
            return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, timeout=timeout,
                                  cwd="/", env={**os.environ, "LC_ALL": "C.UTF-8"})
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"{Path(args[0]).name} failed ({exc.returncode}): {exc.stderr or exc.stdout}\n"
                               f"{tail(self.log_path)}") from exc

    def url(self, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Postgres:
        self.stop_stale(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        try:
            self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                              "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions")
        finally:
            pwfile.unlink()
        self.port = free_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                          "-w", "-t", "60", "start")
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')
        finally:
            conn.close()

    def query(self, sql: str, *params: object) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=self.database, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._pg_ctl_stop(self.data)

    @classmethod
    def stop_stale(cls, root: Path) -> None:
        """A cluster a killed earlier run left behind in ``root`` (pg_ctl daemonises: no child of ours)."""
        if (root / "data" / "postmaster.pid").exists():
            cls(root)._pg_ctl_stop(root / "data", mode="immediate")

    def _pg_ctl_stop(self, data: Path, mode: str = "fast") -> None:
        if not (data / "postmaster.pid").exists():
            return
        try:
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "30", "stop")
        except RuntimeError:
            # Not running any more (a stale pid file), or stuck: the postmaster's pid is the file's first line.
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((data / "postmaster.pid").read_text().split()[0])
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"postgres"):
                    os.kill(pid, 9)


class Redis:
    """``redis-server`` on 127.0.0.1 in the foreground, in its own process group, data in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log_path = root / "redis.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> Redis:
        binary = shutil.which("redis-server")
        if not binary:
            raise FileNotFoundError("redis-server not found: run include/scripts/distributed_deps.sh")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.root), "--protected-mode", "yes", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _ready("127.0.0.1", self.port, b"PING\r\n", b"+PONG"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{tail(self.log_path)}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_groups([self.proc], steps=((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)))
            self.proc = None
