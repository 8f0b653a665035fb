"""A PostgreSQL server for the tests, started by them: Debian's `postgresql` binaries, a data
directory of its own in a temporary folder, listening on 127.0.0.1 and a unix socket there
(and on 127.0.0.2, a name its certificate does not carry). TLS is offered when openssl is there.
Elsewhere `SKIP` says why, and the PostgreSQL tests are skipped with that reason.

Each test gets a database of its own (`PgServer.database()`), created from template0.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests import reaper
from tests.fakes import free_port

PASSWORD_USER = "tg_password"  # a role that must give a password (scram), over TCP


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _unavailable() -> str | None:
    if _bindir() is None:
        return "needs PostgreSQL's server binaries (apt-get install postgresql)"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "needs asyncpg (pip install -e '.[test]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs a 'postgres' user to run the server as"
    return None


SKIP = _unavailable()


@dataclass
class PgServer:
    """One running server; stop() shuts it down and removes its folder."""

    root: Path
    port: int
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    _counter: int = 0

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ca(self) -> Path | None:
        """The CA that signed the server's certificate (for 127.0.0.1 and localhost); None
        without openssl, and then the server speaks no TLS."""
        path = self.root / "tls" / "ca.pem"
        return path if path.exists() else None

    def _make_certificate(self) -> None:
        """A CA of the run's own and a server certificate it signed; TLS is offered beside
        plain TCP (pg_hba's `host` lines accept both)."""
        if shutil.which("openssl") is None:
            return
        tls = self.root / "tls"
        tls.mkdir()

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=tls, check=True, capture_output=True,
                           timeout=60)
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                "-subj", "/CN=tiktokguard test database CA")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
        (tls / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
        os.chmod(tls / "server.key", 0o600)
        if os.geteuid() == 0:
            for path in (tls, tls / "server.key", tls / "server.pem"):
                shutil.chown(path, "postgres")

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)

    def start(self) -> PgServer:
        bindir = _bindir()
        assert bindir is not None
        self.socket_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._make_certificate()
        self._run(str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        with open(self.data / "pg_hba.conf", "w") as hba:
            # local sockets: trust; TCP: the password role must give its password.
            hba.write("local all all trust\n"
                      f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
                      "host all all 127.0.0.1/32 trust\n")
        self.resume()
        self.sql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{self.password}'")
        return self

    def resume(self) -> None:
        bindir = _bindir()
        assert bindir is not None
        options = (f"-k {self.socket_dir} -p {self.port} "
                   "-c listen_addresses=127.0.0.1,127.0.0.2 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        if self.ca is not None:
            tls = self.root / "tls"
            options += (f" -c ssl=on -c ssl_cert_file={tls / 'server.pem'}"
                        f" -c ssl_key_file={tls / 'server.key'}")
        self._run(str(bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def pause(self) -> None:
        """Stop the server (fast: connections are cut), keeping its data."""
        bindir = _bindir()
        assert bindir is not None
        self._run(str(bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        try:
            self.pause()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, statement: str, database: str = "postgres") -> str:
        out = subprocess.run(["psql", "-h", str(self.socket_dir), "-p", str(self.port),
                              "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1",
                              "-qAt", "-c", statement],
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip()

    def database(self) -> str:
        """A new empty database; its DSN (over TCP, as a resolver elsewhere would connect)."""
        self._counter += 1
        name = f"tg_{os.getpid()}_{self._counter}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        self.sql(f"GRANT ALL ON DATABASE {name} TO {PASSWORD_USER}")
        self.sql(f"ALTER DATABASE {name} OWNER TO {PASSWORD_USER}")
        return self.dsn(name)

    def dsn(self, database: str, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user}"


def start_server() -> PgServer:
    root = reaper.pg_folder()  # tg-pg-<run>-*: swept if the run is killed (tests/reaper.py)
    return PgServer(root, free_port()).start()
