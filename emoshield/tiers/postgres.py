"""A throwaway PostgreSQL server on 127.0.0.1 (Debian's package) for tests, the demo and benches.

`start_postgres(port)` runs initdb into a fresh folder (trust authentication, loopback only),
starts `postgres` on `port` and creates database "emoshield"; it returns the process and the
SQLAlchemy URL. Given the folder of a cluster it made before, it starts that one again (its data
kept), as a database server that went down and came back. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
Production deployments point `--database` at their own managed PostgreSQL instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import EmoshieldError


def postgres_bindir() -> Path:
    """Folder of initdb/postgres: Debian keeps them in /usr/lib/postgresql/<major>/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for folder in reversed(candidates):
        if (Path(folder) / "postgres").is_file():
            return Path(folder)
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise EmoshieldError("PostgreSQL server not found: apt-get install postgresql (make setup does it)")


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def start_postgres(port: int, folder: Path | None = None, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """(server process, URL) of a fresh cluster on 127.0.0.1:port, or of the one `folder` holds from
    an earlier start; stop it with stop_postgres."""
    bindir = postgres_bindir()
    # a folder the server user can reach (pytest's tmp folders are private to root)
    owned = folder is None
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="emoshield-pg-"))
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        os.chmod(folder, 0o700)
    created = folder / "emoshield-created"  # written once the database exists
    restart = created.is_file()
    if not restart and data.exists():
        raise EmoshieldError(f"{data} holds a cluster whose first start did not finish; remove it and start again")
    log = folder / "init.log"
    if not restart:
        with open(log, "w") as out:
            done = subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                                                   "-U", "postgres", "-E", "UTF8", "--no-instructions"]),
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise EmoshieldError(f"initdb failed: {log.read_text()[-500:]}")
    server = subprocess.Popen(_as_server_user([str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                                               "-p", str(port), "-k", str(folder), "-c", "fsync=off",
                                               "-c", "max_connections=200"]),
                              stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "a"))
    deadline = time.time() + timeout
    while True:
        ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        if ready.returncode == 0:
            break
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise EmoshieldError(f"postgres did not start on port {port}: "
                                 f"{(folder / 'server.log').read_text()[-500:]}")
        time.sleep(0.2)
    if not restart:
        done = subprocess.run(_as_server_user([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                               "-U", "postgres", "emoshield"]), capture_output=True, text=True)
        if done.returncode != 0:
            server.kill()
            raise EmoshieldError(f"createdb failed: {done.stderr.strip()}")
        created.write_text("")
    server.folder, server.owned_folder = folder, owned  # for stop_postgres
    return server, f"postgresql+psycopg://postgres@127.0.0.1:{port}/emoshield"


def stop_postgres(server: subprocess.Popen) -> None:
    """Fast shutdown (pg_ctl stop -m fast: runuser does not pass signals on), then remove the folder
    when start_postgres made it."""
    folder = Path(getattr(server, "folder", ""))
    if server.poll() is None:
        subprocess.run(_as_server_user([str(postgres_bindir() / "pg_ctl"), "stop", "-D", str(folder / "data"),
                                        "-m", "fast", "-w", "-t", "20"]), capture_output=True)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if getattr(server, "owned_folder", False):
        shutil.rmtree(folder, ignore_errors=True)
