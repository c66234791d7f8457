"""The cloud's catalog (`cloud serve --database`) under faults and hostile library folders, as a
real service process on 127.0.0.1: entries it cannot hold are skipped, a database lock held
elsewhere delays nothing past its wait, weights go out under the sha256 of the bytes sent while
entries are replaced and removed, and replicas starting together on a fresh database all start."""

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emoshield.models import ModelConfig, build_model
from emoshield.models.library import add_entry, list_entries
from emoshield.tiers.client import request, wait_healthy
from tests.conftest import ROOT, free_port

TINY = build_model(ModelConfig("smallcnn", ["a", "b"], 16))


@contextmanager
def cloud(library: Path, database: str, refresh: float):
    """A cloud replica over `library`; yields (url, process); its stderr is read at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "emoshield", "cloud", "serve", "--library", str(library), "--port",
                             str(port), "--database", database, "--refresh", str(refresh)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def fetch(url: str):
    """(status, body, headers: case-insensitive) of one GET."""
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, answer.read(), answer.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def forged(library: Path, name: str, **fields) -> None:
    """An entry folder copied from 'tiny' with some metadata fields changed (a hand edit, another
    tool, a newer version's entry)."""
    folder = library / name
    shutil.copytree(library / "tiny", folder)
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "name": name, **fields}))


_ODD = st.one_of(st.text(max_size=80), st.integers(), st.floats(allow_nan=True), st.none(), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.sampled_from(["x" * 33, "x" * 32, "a/b", "é", "a\x00b"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folder_name=st.sampled_from(["ok-name", "ok-name", "my model", "x" * 65, "a..b", ".hidden", "é"]),
       backbone=st.one_of(st.text(max_size=40), _ODD),
       input_size=st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.integers(1, 2**33), _ODD))
@example("ok-name", "x" * 33, 16).via("a backbone longer than the catalog's column")
@example("ok-name", "smallcnn", 2**31).via("past PostgreSQL's integer")
@example("ok-name", "smallcnn", 2**70).via("past SQLite's integer")
@example("ok-name", "a\x00b", 16).via("a NUL PostgreSQL text refuses")
@example("my model", "smallcnn", 16).via("a folder name no entry may have")
def test_any_entry_is_indexed_or_skipped_never_a_failed_catalog(postgres, tmp_path, folder_name, backbone, input_size):
    """Whatever a folder in the library holds, a scan lists only entries the catalog can store
    (PostgreSQL: String(32) backbones, 32-bit sizes, no NUL) and the sync never raises."""
    from emoshield.tiers.store import LibraryCatalog

    library = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example
    add_entry("tiny", TINY, library, data="test")
    forged(library, folder_name, backbone=backbone, input_size=input_size)
    catalog = LibraryCatalog(postgres)
    try:
        count = catalog.sync(lambda: list_entries(library), lambda name: library / name / "weights.safetensors")
        names = [e["name"] for e in catalog.entries()]
        assert "tiny" in names and count == len(names) <= 2
    finally:
        catalog.close()


def test_a_lock_held_elsewhere_delays_no_request_past_its_wait(tmp_path):
    """A real fault: another process holds SQLite's write lock while the folder changes. Requests
    answer from the catalog as it is within seconds (not the 30 s busy timeout, and not queued
    behind the waiting writer); the change is indexed once the lock is gone."""
    library, db = tmp_path / "library", tmp_path / "catalog.sqlite3"
    add_entry("tiny", TINY, library, data="test")
    with cloud(library, f"sqlite:///{db}", refresh=0) as (url, proc):
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            add_entry("late", TINY, library, data="test")
            answers, started = [], time.monotonic()

            def ask(path):
                answers.append((path, request("GET", url + path, timeout=30)))

            threads = [threading.Thread(target=ask, args=(p,)) for p in ("/backbones", "/health", "/backbones/tiny")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)
            elapsed = time.monotonic() - started
            assert len(answers) == 3 and elapsed < 12, f"{len(answers)} answers in {elapsed:.1f} s"
            assert dict(answers)["/backbones"][0]["name"] == "tiny" and len(dict(answers)["/backbones"]) == 1
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert [e["name"] for e in request("GET", url + "/backbones")] == ["late", "tiny"]
        proc.terminate()
        log = proc.communicate(timeout=30)[1]
    assert "cloud: catalog not re-indexed (OperationalError: database is locked)" in log and "Traceback" not in log


def test_weights_go_out_under_the_hash_of_the_bytes_sent_while_entries_churn(tmp_path, database):
    """Entries replaced and removed while clients download: every 200 carries the sha256 of its own
    bytes and its whole length; the rest are 404 or 503 'retry later', never a 500 or a cut-short
    body. Hostile names (NUL, too long, '..') are 404s on SQLite and PostgreSQL alike."""
    library = tmp_path / "library"
    models = [build_model(ModelConfig("smallcnn", ["a", "b", "c"][:k], 16)) for k in (2, 3)]
    add_entry("tiny", models[0], library, data="test")
    add_entry("churn", models[0], library, data="test")
    stop, changes = threading.Event(), [0]

    def churn():
        while not stop.is_set():
            if changes[0] % 5 == 4:
                shutil.rmtree(library / "churn", ignore_errors=True)
            else:
                add_entry("churn", models[changes[0] % 2], library, data="test", overwrite=True)
            changes[0] += 1
            time.sleep(0.1)  # steady spells between changes: most downloads should find one

    with cloud(library, database, refresh=0.2) as (url, proc):
        for name in ("a%00b", "%00", "x" * 300, "..", "a..b", "%C3%A9", "tiny%2F..%2Fetc"):
            status, body, _ = fetch(f"{url}/backbones/{name}/weights")
            assert status == 404 and len(body) < 300, (name, status, body[:200])
        worker = threading.Thread(target=churn)
        worker.start()
        statuses = []
        try:
            deadline = time.monotonic() + 90
            while changes[0] < 12 and time.monotonic() < deadline:  # downloads across a dozen changes
                status, body, headers = fetch(url + "/backbones/churn/weights")
                statuses.append(status)
                if status == 200:
                    assert int(headers["Content-Length"]) == len(body)
                    assert headers["X-Content-SHA256"] == hashlib.sha256(body).hexdigest()
                else:
                    assert status in (404, 503), (status, body[:200])
        finally:
            stop.set()
            worker.join()
        assert statuses.count(200) >= 10 and changes[0] >= 12, (statuses, changes)
        proc.terminate()
        log = proc.communicate(timeout=30)[1]
    assert "Traceback" not in log and "Exception in ASGI" not in log


def test_replicas_starting_together_on_a_fresh_database_all_start(tmp_path):
    library = tmp_path / "library"
    add_entry("tiny", TINY, library, data="test")
    db = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    start = time.time() + 3  # every process imports, then creates the tables at the same moment
    code = ("import sys, time; from emoshield.tiers.store import LibraryCatalog; time.sleep(max(0, float(sys.argv[2]) "
            "- time.time())); LibraryCatalog(sys.argv[1]).close(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, db, str(start)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, results)), results


def test_a_held_catalog_lock_is_a_bounded_wait_on_postgresql(tmp_path, postgres):
    """A stuck replica holds the catalog's advisory lock: a weights request for an entry replaced
    since the last scan answers 503 within seconds (the lock is waited for 2 s), and the other
    routes answer from the catalog meanwhile; once the lock is free the new entry is served."""
    import psycopg
    from sqlalchemy.engine import make_url

    from emoshield.tiers.store import CATALOG_LOCK

    library = tmp_path / "library"
    add_entry("tiny", TINY, library, data="test")
    with cloud(library, postgres, refresh=3600) as (url, proc):
        parts = make_url(postgres)
        holder = psycopg.connect(host=parts.host, port=parts.port, user=parts.username, dbname=parts.database,
                                 autocommit=False)
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (CATALOG_LOCK,))
        try:
            meta = add_entry("tiny", build_model(ModelConfig("smallcnn", ["a", "b", "c"], 16)), library, data="test",
                             overwrite=True)
            started = time.monotonic()
            status, body, headers = fetch(url + "/backbones/tiny/weights")
            assert status == 503 and b"retry later" in body and headers.get("Retry-After") == "5"
            assert time.monotonic() - started < 10
            assert request("GET", url + "/backbones")[0]["name"] == "tiny"
        finally:
            holder.rollback()
            holder.close()
        status, body, headers = fetch(url + "/backbones/tiny/weights")
        assert status == 200 and headers["X-Content-SHA256"] == hashlib.sha256(body).hexdigest() == meta["sha256"]
        proc.terminate()
        log = proc.communicate(timeout=30)[1]
    assert "catalog not re-indexed" in log and "being replaced, or damaged" in log


def test_an_entry_mid_replacement_is_a_503_the_edge_waits_out(tmp_path, monkeypatch):
    """New weights renamed in before their metadata (add_entry's order), or weights damaged in place:
    the cloud answers 503 'retry later' (one log line per file version, however often asked), and
    the edge's backbone fetch asks again and gets the new entry once its metadata lands."""
    from emoshield.models.network import save_model
    from emoshield.tiers import edge

    library, db = tmp_path / "library", tmp_path / "catalog.sqlite3"
    add_entry("tiny", TINY, library, data="test")
    new = build_model(ModelConfig("smallcnn", ["a", "b", "c"], 16))
    with cloud(library, f"sqlite:///{db}", refresh=3600) as (url, proc):
        save_model(new, library / "tiny" / "weights.safetensors")  # the weights, not yet the metadata
        for _ in range(5):
            status, body, headers = fetch(url + "/backbones/tiny/weights")
            assert status == 503 and b"retry later" in body and headers["Retry-After"] == "5"
        # the metadata lands during the first wait; the second try finds the catalog behind it (the
        # weights route re-indexes), the third gets metadata and weights that agree
        landed = threading.Timer(0.2, lambda: add_entry("tiny", new, library, data="test", overwrite=True))
        monkeypatch.setattr(edge, "BACKBONE_RETRY_SECONDS", 1.0)
        landed.start()
        meta, path = edge.fetch_backbone(url, "tiny", tmp_path / "cache", timeout=10, deadline_s=60)
        landed.join()
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["sha256"] == json.loads((library / "tiny" / "metadata.json").read_text())["sha256"]
        proc.terminate()
        log = proc.communicate(timeout=30)[1]
    assert log.count("its weights do not match the sha256 of its metadata") == 1 and "Traceback" not in log
