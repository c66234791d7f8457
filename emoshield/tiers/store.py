"""Metadata stores on SQLAlchemy Core: the edge node's (devices, uploads, jobs, bundles,
heartbeats) and the cloud's catalog of library entries.

Any SQLAlchemy URL works: the embedded default is SQLite in WAL mode inside the edge's folder
(`sqlite:///ROOT/edge.sqlite3`); a fleet points its edges at PostgreSQL
(`postgresql+psycopg://USER@HOST:PORT/DB`), where job claims use SELECT ... FOR UPDATE SKIP
LOCKED so several workers never take the same job. Image bytes and bundles stay on disk
(content-addressed), only their metadata lives here.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, create_engine, delete, event, func,
                        insert, select, text, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..errors import EmoshieldError, one_line
from .wire import parse_version

METADATA = MetaData()  # the edge's tables
CATALOG_METADATA = MetaData()  # the cloud's table
BACKBONES = Table("backbones", CATALOG_METADATA,
                  Column("name", String(64), primary_key=True), Column("backbone", String(32), nullable=False),
                  Column("input_size", Integer, nullable=False), Column("sha256", String(64), nullable=False),
                  Column("path", Text, nullable=False), Column("metadata", Text, nullable=False),
                  Column("indexed", Float, nullable=False))
DEVICES = Table("devices", METADATA,
                Column("id", String(32), primary_key=True), Column("name", Text, nullable=False),
                Column("token_sha256", String(64), unique=True, nullable=False), Column("created", Float, nullable=False))
SAMPLES = Table("samples", METADATA,
                Column("id", Integer, primary_key=True, autoincrement=True),
                Column("device_id", String(32), nullable=False), Column("sha256", String(64), nullable=False),
                Column("label", Text, nullable=False), Column("bytes", Integer, nullable=False),
                Column("kind", Text, nullable=False), Column("created", Float, nullable=False),
                Column("job_id", Integer),
                # who the face shows (an operator's tag), so a job can hold whole people out for its test
                Column("subject", String(64)))
JOBS = Table("jobs", METADATA,
             Column("id", Integer, primary_key=True, autoincrement=True), Column("status", String(16), nullable=False),
             Column("trigger", Text, nullable=False), Column("created", Float, nullable=False),
             Column("started", Float), Column("finished", Float), Column("samples", Integer),
             Column("version", Integer), Column("error", Text), Column("metrics", Text))
BUNDLES = Table("bundles", METADATA,
                Column("version", Integer, primary_key=True, autoincrement=False), Column("job_id", Integer),
                Column("created", Float, nullable=False))
HEARTBEATS = Table("heartbeats", METADATA,
                   Column("device_id", String(32), primary_key=True), Column("seen", Float, nullable=False),
                   Column("version", Integer), Column("telemetry", Text, nullable=False))
JOB_FIELDS = {c.name for c in JOBS.columns} - {"id"}
CATALOG_LOCK = 0x656D6F73  # "emos": the advisory lock cloud replicas take to write the catalog
JOB_QUEUE_LOCK = 0x656D6F6A  # "emoj": edges sharing a database queue an automatic job one at a time
LOCK_WAIT_SECONDS = 2  # a catalog write waits this long for another replica (or a stuck one), then gives up
SQLITE_BUSY_SECONDS = 30  # a store's write waits this long for another process's SQLite transaction
PG_LOCK_TIMEOUT_SECONDS = 10  # any PostgreSQL statement waits this long for a lock, then fails (503, retry)


# a database that is down, locked or out of pooled connections: retry later (the services' 503)
UNAVAILABLE = (OperationalError, PoolTimeout)


def driver_message(exc: BaseException) -> str:
    """The database driver's own message in one line (it may name hosts and SQL: logs only)."""
    return one_line(getattr(exc, "orig", None) or exc, 160)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make_engine(url: str):
    """An engine for `url`; SQLite gets WAL, a busy timeout and cross-thread use."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise EmoshieldError(f"not a database URL: {url!r} ({exc})") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
            raise EmoshieldError(f"{url!r} is an in-memory SQLite database, private to each connection (each "
                                 f"request would see an empty one): give a file, sqlite:///PATH")
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")

        return engine
    # a server that stops answering (a fail-over) costs a request seconds, not the OS's TCP timeout
    postgresql = parsed.get_backend_name() == "postgresql"
    engine = create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=10,
                           connect_args={"connect_timeout": 10} if postgresql else {})
    if postgresql:
        @event.listens_for(engine, "connect")
        def _lock_timeout(connection, _record):
            """A lock held elsewhere (a stuck transaction, a table lock) ends in an error after
            PG_LOCK_TIMEOUT_SECONDS, not a hang. Set per session, not as a startup option: the URL's
            own `options` stay, and poolers that refuse startup options (PgBouncer) still connect."""
            with connection.cursor() as cursor:
                cursor.execute(f"SET lock_timeout = '{PG_LOCK_TIMEOUT_SECONDS}s'")
            connection.commit()

    return engine


class SqlStore:
    """An engine, its tables created, and short transactions (serialised on SQLite)."""

    def __init__(self, url: str, metadata: MetaData):
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        # SQLite has one writer at a time: serialise here instead of retrying "database is locked"
        self._lock = threading.Lock() if self.dialect == "sqlite" else None
        for attempt in range(3):  # several processes starting on a fresh database race to create it
            try:
                metadata.create_all(self.engine)
                self._add_missing_columns(metadata)
                break
            except Exception as exc:
                if attempt == 2 or not isinstance(exc, DBAPIError):
                    raise EmoshieldError(f"cannot open the metadata database {self.engine.url!r}: "
                                         f"{str(exc).splitlines()[0]}") from None
                time.sleep(0.2 * (attempt + 1))  # another process's CREATE won: the next look finds its tables

    def _add_missing_columns(self, metadata: MetaData) -> None:
        """Columns added to a table since its database was created (nullable ones only), so an
        edge upgraded in place keeps its data: ALTER TABLE ... ADD COLUMN."""
        from sqlalchemy import inspect

        inspector = inspect(self.engine)
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    with self._begin() as conn:
                        conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))

    def _upsert(self, table: Table, key: str, values: dict):
        """INSERT ... ON CONFLICT (key) DO UPDATE, in this database's dialect."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert
        statement = upsert(table).values(**values)
        return statement.on_conflict_do_update(index_elements=[table.c[key]],
                                               set_={k: v for k, v in values.items() if k != key})

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _begin(self):
        """A transaction (committed on success), serialised on SQLite."""
        with self._lock or nullcontext():
            with self.engine.begin() as conn:
                yield conn

    # reads take no lock: SQLite in WAL mode reads beside a writer, so a writer waiting out its busy
    # timeout (another process holds the database) never holds up this process's readers
    def _rows(self, query) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]

    def _scalar(self, query):
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()


class LibraryCatalog(SqlStore):
    """The cloud's index of library entries in a database (`cloud serve --database URL`), so that
    several cloud replicas over one shared file store answer from one catalog."""

    def __init__(self, database: str):
        super().__init__(database, CATALOG_METADATA)

    def sync(self, scan: Callable[[], list[dict]], folder_of: Callable[[str], Path | None]) -> int:
        """Make the catalog what the folder holds now (`scan()` -> its entries, `folder_of(name)`
        -> an entry's weights path, None when it went away meanwhile): upsert them and drop rows of
        entries no longer there (the replicas share one file store, so what the scan does not see
        is gone). The catalog is compared first and written only when it differs, and then under
        a lock every replica takes (PostgreSQL: an advisory lock; SQLite: its one writer) with the
        folder scanned again inside it, so a slow replica's older scan can never overwrite a newer
        one, and a catalog some replica left stale is repaired by the next one to look. Returns
        how many entries it holds."""
        current = self._current()
        if self._rows_of(current, scan, folder_of) is None:
            return len(current)
        with self._begin() as conn:  # the lock waited for at most LOCK_WAIT_SECONDS: else OperationalError
            if self.dialect == "postgresql":
                conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CATALOG_LOCK})
            elif self.dialect == "sqlite":  # a write first: SQLite's write lock now, not at the first upsert
                conn.exec_driver_sql(f"PRAGMA busy_timeout={LOCK_WAIT_SECONDS * 1000}")
                try:
                    conn.execute(delete(BACKBONES).where(BACKBONES.c.name == ""))
                finally:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
            current = self._current(conn)
            rows = self._rows_of(current, scan, folder_of)
            if rows is None:
                return len(current)
            for name, row in rows.items():
                if current.get(name) != (row["metadata"], row["path"]):
                    conn.execute(self._upsert(BACKBONES, "name", {**row, "indexed": time.time()}))
            gone = set(current) - set(rows)
            if gone:
                conn.execute(delete(BACKBONES).where(BACKBONES.c.name.in_(sorted(gone))))
        return len(rows)

    @staticmethod
    def _rows_of(current: dict, scan, folder_of) -> dict[str, dict] | None:
        """The catalog rows a fresh scan asks for, or None when the catalog holds them already."""
        rows = {}
        for e in scan():
            path = folder_of(e["name"])
            if path is not None:
                rows[e["name"]] = {"name": e["name"], "backbone": e["backbone"], "input_size": e["input_size"],
                                   "sha256": e["sha256"], "path": str(path),
                                   "metadata": json.dumps(e, sort_keys=True)}
        return None if {n: (r["metadata"], r["path"]) for n, r in rows.items()} == current else rows

    def _current(self, conn=None) -> dict[str, tuple[str, str]]:
        """name -> (metadata text, weights path) of every row (in `conn`'s transaction if given)."""
        if conn is None:
            with self.engine.connect() as conn:
                return self._current(conn)
        query = select(BACKBONES.c.name, BACKBONES.c.metadata, BACKBONES.c.path)
        return {r.name: (r.metadata, r.path) for r in conn.execute(query)}

    def entries(self) -> list[dict]:
        return [json.loads(r["metadata"]) for r in self._rows(select(BACKBONES.c.metadata).order_by(BACKBONES.c.name))]

    def entry(self, name: str) -> tuple[dict, Path] | None:
        rows = self._rows(select(BACKBONES.c.metadata, BACKBONES.c.path).where(BACKBONES.c.name == name))
        return (json.loads(rows[0]["metadata"]), Path(rows[0]["path"])) if rows else None


class EdgeStore(SqlStore):
    """Metadata in a SQL database + a content-addressed image folder under `root`."""

    def __init__(self, root: Path, database: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(database or f"sqlite:///{self.root / 'edge.sqlite3'}", METADATA)
        # a job that was running when the node stopped will never finish: mark it
        with self._begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.status == "running")
                         .values(status="failed", error="edge node restarted"))

    # devices
    def enrol(self, name: str) -> tuple[str, str]:
        device_id, token = "d" + secrets.token_hex(6), secrets.token_urlsafe(32)
        with self._begin() as conn:
            conn.execute(insert(DEVICES).values(id=device_id, name=name, token_sha256=hash_token(token),
                                                created=time.time()))
        return device_id, token

    def device_for(self, token: str) -> str | None:
        return self._scalar(select(DEVICES.c.id).where(DEVICES.c.token_sha256 == hash_token(token)))

    def devices(self) -> list[dict]:
        d, h = DEVICES, HEARTBEATS
        rows = self._rows(select(d.c.id, d.c.name, d.c.created, h.c.seen.label("last_seen"),
                                 h.c.version.label("running_version"), h.c.telemetry)
                          .select_from(d.outerjoin(h, h.c.device_id == d.c.id)).order_by(d.c.created, d.c.id))
        return [{**r, "telemetry": json.loads(r["telemetry"]) if r["telemetry"] else None} for r in rows]

    def revoke(self, device_id: str) -> bool:
        """Forget a device: its token stops working at once (it is looked up on every request)
        and its heartbeats are no longer recorded. Its uploaded samples stay. False when unknown."""
        with self._begin() as conn:
            conn.execute(delete(HEARTBEATS).where(HEARTBEATS.c.device_id == device_id))
            return conn.execute(delete(DEVICES).where(DEVICES.c.id == device_id)).rowcount > 0

    def device(self, device_id: str) -> dict | None:
        rows = self._rows(select(DEVICES.c.id, DEVICES.c.name).where(DEVICES.c.id == device_id))
        return rows[0] if rows else None

    def record_heartbeat(self, device_id: str, telemetry: dict) -> bool:
        """Keep a device's latest heartbeat; heartbeats naming no enrolled device, over 4 KB, with a
        version that is not an integer in [0, 2**31 - 1] or with non-finite numbers are dropped."""
        try:
            text = json.dumps(telemetry, sort_keys=True, allow_nan=False)
            version = telemetry.get("version")
            version = None if version is None else parse_version(version, "heartbeat version")
        except (ValueError, TypeError):  # RemoteValueError is a ValueError too: a lying device
            return False
        if len(text) > 4096 or self.device(device_id) is None:
            return False
        values = {"device_id": device_id, "seen": time.time(), "version": version, "telemetry": text}
        with self._begin() as conn:
            conn.execute(self._upsert(HEARTBEATS, "device_id", values))
        return True

    # samples
    def cas_path(self, digest: str) -> Path:
        return self.root / "cas" / digest[:2] / digest[2:]

    def add_sample(self, device_id: str, data: bytes, label: str, kind: str,
                   subject: str | None = None) -> dict | None:
        """Store a face and its row; None (nothing stored) when the device is not, or no longer,
        enrolled: an upload whose body was still arriving when its device was revoked is refused,
        not kept under a device that no longer exists."""
        if self.device(device_id) is None:
            return None
        digest = hashlib.sha256(data).hexdigest()
        path = self.cas_path(digest)
        # written and synced before its row commits, so a power loss never leaves a row naming an
        # empty file; a file of the wrong size (such a loss before this rule) is written again
        if not path.is_file() or path.stat().st_size != len(data):
            tmp = path.with_name(f"{path.name}.partial-{secrets.token_hex(4)}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                tmp.replace(path)
            except OSError:  # a full disk or file-size limit: nothing half-written stays
                tmp.unlink(missing_ok=True)
                raise
        with self._begin() as conn:
            # the device row is held (PostgreSQL: FOR KEY SHARE) until the sample is in: a revoke
            # either comes first and the upload is refused, or waits for it
            known = select(DEVICES.c.id).where(DEVICES.c.id == device_id)
            if self.dialect == "postgresql":
                known = known.with_for_update(read=True, key_share=True)
            if conn.execute(known).scalar() is None:
                return None  # revoked meanwhile; the file stays only if it was new, swept at the next start
            result = conn.execute(insert(SAMPLES).values(device_id=device_id, sha256=digest, label=label,
                                                         bytes=len(data), kind=kind, created=time.time(),
                                                         subject=subject))
            sample_id = result.inserted_primary_key[0]
        return {"id": sample_id, "sha256": digest, "label": label, "bytes": len(data), "subject": subject}

    def sweep(self, older_than_s: float = 600.0) -> int:
        """Remove what a killed upload leaves in the content-addressed folder: partial files, and
        files no sample names (killed between the file and its row, or refused after a revoke),
        when older than `older_than_s` (an upload in flight in another process is never touched).
        Returns how many files went."""
        cas = self.root / "cas"
        if not cas.is_dir():
            return 0
        named = {r["sha256"] for r in self._rows(select(SAMPLES.c.sha256).distinct())}
        cutoff, removed = time.time() - older_than_s, 0
        for path in cas.glob("*/*"):
            try:
                stale = path.is_file() and path.stat().st_mtime < cutoff
            except OSError:
                continue
            if stale and path.parent.name + path.name not in named:  # a partial file's name is no digest
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def samples(self, device_id: str | None = None) -> list[dict]:
        s = SAMPLES
        if device_id is None:
            return self._rows(select(s).order_by(s.c.id))
        return self._rows(select(s.c.id, s.c.sha256, s.c.label, s.c.bytes, s.c.kind, s.c.created, s.c.job_id,
                                 s.c.subject)
                          .where(s.c.device_id == device_id).order_by(s.c.id))

    _NEW_SAMPLES = select(func.count()).select_from(SAMPLES).where(SAMPLES.c.job_id.is_(None))
    _ACTIVE_JOBS = select(func.count()).select_from(JOBS).where(JOBS.c.status.in_(("queued", "running")))

    def new_sample_count(self) -> int:
        return self._scalar(self._NEW_SAMPLES)

    def queue_job_if_due(self, trigger: str, every: int) -> int | None:
        """Queue a job when at least `every` samples are new and no job is queued or running, as one
        step: uploads arriving together (threads, or edge processes sharing a database) queue one
        job, not one each. The id, or None when none was due."""
        with self._begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": JOB_QUEUE_LOCK})
            else:  # a write first: SQLite's write lock before the counts are read
                conn.execute(delete(JOBS).where(JOBS.c.id == -1))
            if conn.execute(self._NEW_SAMPLES).scalar() < every or conn.execute(self._ACTIVE_JOBS).scalar():
                return None
            result = conn.execute(insert(JOBS).values(status="queued", trigger=trigger, created=time.time()))
            return result.inserted_primary_key[0]

    # jobs and bundles
    def create_job(self, trigger: str) -> int:
        with self._begin() as conn:
            result = conn.execute(insert(JOBS).values(status="queued", trigger=trigger, created=time.time()))
            return result.inserted_primary_key[0]

    def job(self, job_id: int) -> dict | None:
        rows = self._rows(select(JOBS).where(JOBS.c.id == job_id))
        if not rows:
            return None
        job = rows[0]
        job["metrics"] = json.loads(job["metrics"]) if job["metrics"] else None
        return job

    def jobs(self) -> list[dict]:
        return [{**j, "metrics": json.loads(j["metrics"]) if j["metrics"] else None}
                for j in self._rows(select(JOBS).order_by(JOBS.c.id))]

    def active_jobs(self) -> int:
        return self._scalar(self._ACTIVE_JOBS)

    def claim_next_job(self) -> int | None:
        """Mark the oldest queued job running and return its id; one claimer wins per job."""
        query = select(JOBS.c.id).where(JOBS.c.status == "queued").order_by(JOBS.c.id).limit(1)
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        while True:
            with self._begin() as conn:
                job_id = conn.execute(query).scalar()
                if job_id is None:
                    return None
                # the status condition makes the claim atomic where rows are not locked (SQLite
                # shared by several processes): a claimer that lost the race updates no row
                won = conn.execute(update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status == "queued")
                                   .values(status="running", started=time.time())).rowcount
            if won:
                return job_id

    def update_job(self, job_id: int, **values) -> None:
        unknown = set(values) - JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        if "metrics" in values:
            values["metrics"] = json.dumps(values["metrics"])
        with self._begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values))

    def mark_samples_used(self, job_id: int, sample_ids: list[int]) -> None:
        if not sample_ids:
            return
        with self._begin() as conn:
            conn.execute(update(SAMPLES).where(SAMPLES.c.id.in_(sample_ids), SAMPLES.c.job_id.is_(None))
                         .values(job_id=job_id))

    def latest_version(self) -> int:
        return self._scalar(select(func.coalesce(func.max(BUNDLES.c.version), 0)))

    def bundle_count(self) -> int:
        return self._scalar(select(func.count()).select_from(BUNDLES))

    def bundles(self, limit: int = 10) -> list[dict]:
        """The newest `limit` bundles: version, the job that made it, when it was recorded."""
        return self._rows(select(BUNDLES).order_by(BUNDLES.c.version.desc()).limit(limit))

    def add_bundle(self, version: int, job_id: int) -> None:
        with self._begin() as conn:
            conn.execute(insert(BUNDLES).values(version=version, job_id=job_id, created=time.time()))

    def bundle_dir(self, version: int) -> Path:
        return self.root / "bundles" / f"v{int(version)}"
