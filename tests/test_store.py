"""The edge's metadata store, on SQLite (embedded default) and PostgreSQL (a real server on
127.0.0.1): the same behaviour, including concurrent job claims."""

import hashlib
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from emoshield.errors import EmoshieldError
from emoshield.tiers.store import EdgeStore


def test_store_round_trip_and_restart(tmp_path, database):
    store = EdgeStore(tmp_path / "edge", database)
    device_id, token = store.enrol("camera-a")
    assert store.device_for(token) == device_id and store.device_for("wrong") is None
    first = store.add_sample(device_id, b"\x89PNG fake", "happy", "png")
    second = store.add_sample(device_id, b"\x89PNG other", "sad", "png")
    assert second["id"] > first["id"] and store.new_sample_count() == 2
    assert store.cas_path(first["sha256"]).read_bytes() == b"\x89PNG fake"
    assert [s["label"] for s in store.samples(device_id)] == ["happy", "sad"]

    assert store.record_heartbeat(device_id, {"version": 3, "fps": 20.5})
    assert store.record_heartbeat(device_id, {"version": 4, "fps": 21.0})  # upsert: the latest only
    assert not store.record_heartbeat("d-unknown", {"version": 1})
    (row,) = store.devices()
    assert row["running_version"] == 4 and row["telemetry"] == {"fps": 21.0, "version": 4}

    job = store.create_job("manual")
    assert store.claim_next_job() == job and store.claim_next_job() is None
    store.update_job(job, metrics={"test_accuracy": 0.9}, samples=2)
    store.mark_samples_used(job, [first["id"], second["id"]])
    assert store.new_sample_count() == 0 and store.job(job)["metrics"] == {"test_accuracy": 0.9}
    with pytest.raises(ValueError):
        store.update_job(job, **{"status = 'x'; --": 1})  # field names never reach SQL text
    assert store.latest_version() == 0
    store.add_bundle(1, job)
    assert store.latest_version() == 1
    store.close()

    # a node restarting finds its data, and a job that was running is marked failed
    again = EdgeStore(tmp_path / "edge", database)
    assert again.job(job) == {**again.job(job), "status": "failed", "error": "edge node restarted"}
    assert again.device_for(token) == device_id and again.latest_version() == 1
    again.close()


def test_concurrent_claims_take_each_job_once(tmp_path, database):
    stores = [EdgeStore(tmp_path / "edge", database) for _ in range(4)]  # 4 workers, own connection pools
    jobs = {stores[0].create_job("manual") for _ in range(40)}
    claimed, lock = [], threading.Lock()

    def worker(store):
        while (job := store.claim_next_job()) is not None:
            with lock:
                claimed.append(job)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(jobs)  # every job once, none twice
    assert stores[0].active_jobs() == 40  # claimed jobs count as running
    for s in stores:
        s.close()


def test_a_bad_database_url_is_a_one_line_error(tmp_path):
    with pytest.raises(EmoshieldError, match="not a database URL"):
        EdgeStore(tmp_path, "not a url")
    for memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory&uri=true"):
        with pytest.raises(EmoshieldError, match="in-memory SQLite database, private to each connection"):
            EdgeStore(tmp_path, memory)
    with pytest.raises(EmoshieldError, match="cannot open the metadata database"):
        EdgeStore(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_cloud_catalog_indexes_the_library_and_serves_from_the_database(tmp_path, database):
    import subprocess
    import sys

    from emoshield.models import ModelConfig, build_model
    from emoshield.tiers.client import download, request, wait_healthy
    from emoshield.models.library import add_entry
    from emoshield.tiers.store import BACKBONES, LibraryCatalog
    from sqlalchemy import select
    from tests.conftest import free_port

    library = tmp_path / "library"
    meta = add_entry("tiny", build_model(ModelConfig("smallcnn", ["a", "b"], 16)), library, data="test")
    port = free_port()
    cloud = subprocess.Popen([sys.executable, "-m", "emoshield", "cloud", "serve", "--library", str(library),
                              "--port", str(port), "--database", database, "--refresh", "3600"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, cloud)["catalog"] == "database"
        assert [e["name"] for e in request("GET", url + "/backbones")] == ["tiny"]
        download(url + "/backbones/tiny/weights", tmp_path / "w.safetensors")
        assert (tmp_path / "w.safetensors").stat().st_size == meta["bytes"]
        with pytest.raises(Exception, match="404"):
            request("GET", url + "/backbones/nope")
        # an entry replaced (cloud add --force) while the replica runs, long before its next scan:
        # its weights go out at once under the sha256 of the bytes sent, and the catalog follows
        meta = add_entry("tiny", build_model(ModelConfig("smallcnn", ["a", "b", "c"], 16)), library, data="test",
                         overwrite=True)
        with urllib.request.urlopen(url + "/backbones/tiny/weights", timeout=30) as answer:
            sent, header = answer.read(), answer.headers["X-Content-SHA256"]
        assert header == hashlib.sha256(sent).hexdigest() == meta["sha256"]
        assert request("GET", url + "/backbones/tiny")["sha256"] == meta["sha256"]
    finally:
        cloud.terminate()
        cloud.wait(timeout=30)
    # the catalog is the database's: another replica reads the same entries without the folder scan
    catalog = LibraryCatalog(database)
    assert [e["sha256"] for e in catalog.entries()] == [meta["sha256"]]
    # a replica's start makes it what the shared folder holds: an entry gone from it is dropped,
    # one that vanished during the scan is skipped (not a crash at start)
    other = add_entry("other", build_model(ModelConfig("smallcnn", ["a", "b"], 16)), library, data="test")
    assert catalog.sync(lambda: [other, meta], lambda name: None if name == "tiny" else library / name / "w") == 1
    assert [e["name"] for e in catalog.entries()] == ["other"] and catalog.entry("tiny") is None
    # two replicas: the catalog follows the folder whichever scanned last, and a scan that finds
    # the catalog as the folder is writes nothing
    old, new = LibraryCatalog(database), LibraryCatalog(database)
    views = {"old": [meta], "new": [meta, other]}
    where = lambda name: library / name / "w"  # noqa: E731
    new.sync(lambda: views["new"], where)
    written = {e["name"]: e for e in new.entries()}
    indexed = {r["name"]: r["indexed"] for r in new._rows(select(BACKBONES.c.name, BACKBONES.c.indexed))}
    assert new.sync(lambda: views["new"], where) == 2  # unchanged: no row rewritten
    assert {r["name"]: r["indexed"] for r in new._rows(select(BACKBONES.c.name, BACKBONES.c.indexed))} == indexed
    old.sync(lambda: views["old"], where)  # a slow replica's older view lands last...
    assert [e["name"] for e in catalog.entries()] == ["tiny"]
    new.sync(lambda: views["new"], where)  # ...and the next replica to look repairs it
    assert {e["name"]: e for e in catalog.entries()} == written
    for c in (catalog, old, new):
        c.close()


def test_a_cloud_catalog_whose_database_goes_down_answers_503_and_recovers(tmp_path):
    """A real fault: the catalog's PostgreSQL server stops while a replica serves. Requests answer
    503 'retry later' (never a 500, no host or SQL in the body, the reason in the service's log)
    and the same process serves again once the server is back."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from emoshield.models import ModelConfig, build_model
    from emoshield.models.library import add_entry
    from emoshield.tiers.client import request, wait_healthy
    from emoshield.tiers.postgres import start_postgres, stop_postgres
    from tests.conftest import free_port

    library = tmp_path / "library"
    add_entry("tiny", build_model(ModelConfig("smallcnn", ["a", "b"], 16)), library, data="test")
    folder, db_port = Path(tempfile.mkdtemp(prefix="emoshield-pg-")), free_port()  # kept across the restart
    server, database = start_postgres(db_port, folder)
    port = free_port()
    cloud = subprocess.Popen([sys.executable, "-m", "emoshield", "cloud", "serve", "--library", str(library),
                              "--port", str(port), "--database", database, "--refresh", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, cloud)
        stop_postgres(server)
        add_entry("late", build_model(ModelConfig("smallcnn", ["a", "b"], 16)), library, data="test")
        for path in ("/backbones", "/backbones/tiny", "/backbones/tiny/weights", "/health"):
            with pytest.raises(Exception, match="503") as refused:
                request("GET", url + path, raw=True)
            assert "retry later" in str(refused.value) and "127.0.0.1" not in str(refused.value).split(": ", 1)[1]
        server, _ = start_postgres(db_port, folder)  # the same cluster, its catalog kept
        assert [e["name"] for e in request("GET", url + "/backbones")] == ["late", "tiny"]  # the scan it missed
    finally:
        cloud.terminate()
        _, log = cloud.communicate(timeout=30)
        stop_postgres(server)
        shutil.rmtree(folder, ignore_errors=True)
    assert "cloud: database unavailable (" in log and "cloud: catalog not re-indexed (" in log


def test_an_edge_database_from_before_subject_tags_is_upgraded_in_place(tmp_path, database):
    from sqlalchemy import Column, MetaData, Table, create_engine, insert

    from emoshield.tiers.store import SAMPLES

    before = Table("samples", MetaData(), *[Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                               for c in SAMPLES.columns if c.name != "subject"])
    engine = create_engine(database)  # the samples table as edges created it before the subject column
    before.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(before).values(device_id="d000000000001", sha256="ab" * 32, label="happy", bytes=3,
                                           kind="png", created=0.0))
    engine.dispose()
    store = EdgeStore(tmp_path / "edge", database)
    old, = store.samples()
    assert old["label"] == "happy" and old["subject"] is None  # kept, untagged
    assert store.add_sample("d000000000001", b"\x89PNG new", "sad", "png") is None  # its device is not enrolled
    device_id, _ = store.enrol("camera")
    new = store.add_sample(device_id, b"\x89PNG new", "sad", "png", subject="S010")
    assert new["subject"] == "S010" and [s["subject"] for s in store.samples(device_id)] == ["S010"]
    store.close()
    EdgeStore(tmp_path / "edge", database).close()  # opening again: nothing left to add, no error


def test_jobs_hold_out_whole_people_when_uploads_name_enough_of_them():
    from emoshield.tiers.edge import MIN_SUBJECTS, evaluation_protocol

    def samples(tags, device="d000000000001"):
        return [{"device_id": device, "subject": t} for t in tags]

    protocol, args = evaluation_protocol(samples([None] * 20))
    assert protocol["protocol"] == "reference" and "no subject tags" in protocol["description"]
    assert args == ["--protocol", "reference"]
    protocol, args = evaluation_protocol(samples(["S1", "S2"] * 10))
    assert protocol["protocol"] == "reference" and f"{MIN_SUBJECTS} needed" in protocol["description"]
    protocol, args = evaluation_protocol(samples([f"S{i % 7}" for i in range(40)]) + samples([None], "d000000000002"))
    assert protocol == {**protocol, "protocol": "subject", "subjects": 8, "test_subjects": 2}  # untagged: its device
    assert args[:2] == ["--protocol", "subject"] and args[args.index("--folds") + 1] == "5"
    protocol, args = evaluation_protocol(samples(["a", "b", "c"] * 3))
    assert protocol["test_subjects"] == 1 and args[args.index("--folds") + 1] == "3"


def test_postgresql_sessions_wait_for_a_lock_at_most_ten_seconds_and_keep_the_url_options(postgres):
    """lock_timeout is set per session (a startup option would replace the URL's own `options`, and
    PgBouncer refuses startup options): a stuck lock ends in an error the services answer with 503."""
    from sqlalchemy import text

    from emoshield.tiers.store import make_engine

    engine = make_engine(postgres + "?options=-c%20statement_timeout%3D123456")  # what every store gets
    with engine.connect() as conn:
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "10s"
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "123456ms"
    engine.dispose()


def test_uploads_arriving_together_queue_one_automatic_job(tmp_path, database):
    """Eight uploads finish at once on an edge that trains every 5 samples: one job, not eight
    (each store is its own connection pool, as edge processes sharing a database are)."""
    stores = [EdgeStore(tmp_path / "edge", database) for _ in range(4)]
    device_id, _ = stores[0].enrol("camera")
    for i in range(8):
        stores[0].add_sample(device_id, f"face {i}".encode(), "happy", "png")
    barrier, queued = threading.Barrier(8), []

    def upload_done(store):
        barrier.wait()
        queued.append(store.queue_job_if_due("auto", 5))

    threads = [threading.Thread(target=upload_done, args=(stores[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([j for j in queued if j is not None]) == 1 and stores[0].active_jobs() == 1
    assert stores[1].queue_job_if_due("auto", 5) is None  # one pending: none more
    for s in stores:
        s.close()


def test_the_image_folder_sweep_removes_what_killed_uploads_left_and_nothing_else(tmp_path):
    """A kill mid-upload leaves a partial file; a kill between the file and its row, or a revoke
    racing the upload, leaves a file no sample names. The start-up sweep removes both once they
    are older than an upload can take, and never a file a sample names or a young one."""
    import os

    store = EdgeStore(tmp_path / "edge")
    device_id, _ = store.enrol("camera")
    kept = store.add_sample(device_id, b"\x89PNG kept", "happy", "png")
    named = store.cas_path(kept["sha256"])
    orphan = store.cas_path("ab" * 32)
    partial = named.with_name(named.name + ".partial-1234abcd")
    young = store.cas_path("cd" * 32)
    for path in (orphan, partial, young):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left over")
    old = time.time() - 3600
    for path in (named, orphan, partial):
        os.utime(path, (old, old))
    assert store.sweep() == 2
    assert named.is_file() and young.is_file() and not orphan.exists() and not partial.exists()
    assert store.add_sample("d000000000000", b"\x89PNG x", "happy", "png") is None  # no such device: nothing
    named.write_bytes(b"")  # what a power loss before a sync can leave: the next upload of it repairs it
    again = store.add_sample(device_id, b"\x89PNG kept", "happy", "png")
    assert again["sha256"] == kept["sha256"] and named.read_bytes() == b"\x89PNG kept"
    store.close()
