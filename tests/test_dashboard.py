"""The edge operator's dashboard, tested as an operator and as an intruder: a real cloud, edge,
Mosquitto and device process on 127.0.0.1, and Debian's chromium driven by Selenium (installed
by `make setup`). Log in, enrol a device, train, watch the device appear on its version and its
live emotion timeline move, see the version change after a second job, revoke it and see it go;
the static parts with JavaScript off; 401/redirect on every route without a session, CSRF on
every form, hostile forms, event ids and heartbeats."""

import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoshield.tiers.client import EdgeClient
from emoshield.tiers.client import ServiceError
from emoshield.tiers.dashboard.state import (LiveFeed, LoginLimiter, Sessions, StreamSlots, bundle_summary,
                                             emotion_counts, heartbeat_event, job_progress, robustness_headline)
from tests.conftest import FIVE, ROOT, free_port
from tests.test_cli import run
from tests.test_hostile import JSON
from tests.test_services import service_files, start, token_file, wait_healthy

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "runs" / "test-artifacts"
ADMIN = "dashboard-admin-secret"
# every route the dashboard adds; the stylesheet alone is public (the login page uses it; no data)
GET_ROUTES = ["/", "/dashboard/state", "/dashboard/events", "/dashboard/jobs/1/log", "/dashboard/enrolled",
              "/dashboard/static/dashboard.js"]
POST_ROUTES = ["/logout", "/dashboard/devices", "/dashboard/devices/d0123456789ab/revoke", "/dashboard/jobs"]


# ---- the pieces, without HTTP ----

def test_sessions_expire_end_and_keep_only_hashes():
    sessions = Sessions(seconds=0.3, max_sessions=2)
    cookie, session = sessions.create()
    assert sessions.get(cookie) is session and cookie not in repr(sessions._sessions)
    assert sessions.check_csrf(session, session.csrf) and not sessions.check_csrf(session, session.csrf[:-1] + "x")
    assert not sessions.check_csrf(session, None) and not sessions.check_csrf(session, ["x"])
    assert sessions.get("x" * 129) is None and sessions.get("") is None and sessions.get(None) is None
    time.sleep(0.35)
    assert sessions.get(cookie) is None  # expired
    a, _ = sessions.create()
    b, _ = sessions.create()
    c, _ = sessions.create()  # a third: the oldest is ended
    assert sessions.get(a) is None and sessions.get(b) and sessions.get(c)
    sessions.end(b)
    assert sessions.get(b) is None
    with pytest.raises(ValueError):
        Sessions(seconds=0)


def test_failed_logins_are_limited_per_client_and_forgotten_after_the_window():
    limiter = LoginLimiter(failures=3, window=0.3, max_clients=2)
    for _ in range(3):
        assert not limiter.blocked("10.0.0.1")
        limiter.failed("10.0.0.1")
    assert limiter.blocked("10.0.0.1") and not limiter.blocked("10.0.0.2")
    time.sleep(0.35)
    assert not limiter.blocked("10.0.0.1")
    for ip in ("a", "b", "c"):  # bounded memory: the oldest client is forgotten
        limiter.failed(ip)
    assert len(limiter._seen) <= 2


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_heartbeat_fields_of_any_shape_become_known_shapes_or_none(value):
    counts = emotion_counts(value)
    assert counts is None or all(isinstance(k, str) and 0 < len(k) <= 32 and type(v) is int and 0 <= v <= 10**6
                                 for k, v in counts.items())
    event = heartbeat_event("d1", {"emotions": value, "fps": value, "version": value, "interval": value,
                                   "faces_now": value}, 1.0)
    json.dumps(event, allow_nan=False)  # what the event stream sends is always valid JSON
    assert event["fps"] is None or (math.isfinite(event["fps"]) and event["fps"] >= 0)
    assert event["version"] is None or type(event["version"]) is int


def test_emotion_counts_are_all_or_nothing():
    assert emotion_counts({"happy": 3, "sad": 0}) == {"happy": 3, "sad": 0}
    for bad in ({"happy": -1}, {"happy": 1.5}, {"happy": True}, {"": 1}, {"x" * 33: 1}, {"a\nb": 1},
                {f"c{i}": 1 for i in range(33)}, {"happy": 10**7}, ["happy"], "happy"):
        assert emotion_counts(bad) is None, bad


def test_live_feed_keeps_the_recent_past_per_device_and_forgets_revoked_devices():
    feed = LiveFeed(per_device=3, min_gap=0)
    for i in range(5):
        feed.publish("a", {"emotions": {"happy": i}})
    feed.publish("b", {"emotions": {"sad": 1}})
    events = feed.since(0)
    assert [e[1]["device"] for e in events] == ["a", "a", "a", "b"]  # a's oldest two dropped
    assert [e[1]["emotions"] for e in events[:3]] == [{"happy": 2}, {"happy": 3}, {"happy": 4}]
    assert feed.since(feed.last_id) == [] and [e[0] for e in feed.since(5)] == [6]
    feed.forget("a")
    assert [e[1]["device"] for e in feed.since(0)] == ["b"]
    flooded = LiveFeed(min_gap=0.2)  # a device heartbeating flat out: one event per gap reaches the pages
    kept = [flooded.publish("a", {"emotions": {"happy": 1}}) for _ in range(1000)]
    assert kept[0] == 1 and kept[1:] == [None] * 999 and len(flooded.since(0)) == 1
    time.sleep(0.25)
    assert flooded.publish("a", {}) == 2


def test_job_progress_follows_the_log_steps_and_epochs():
    log = ("[10:00:00] 25 samples from 1 device(s)\n[10:00:01] $ emoshield train --epochs 4\n"
           "epoch 1/4 train loss 1.2 acc 0.3\nepoch 3/4 train loss 0.9 acc 0.5\n")
    running = job_progress({"status": "running"}, log)
    assert running["step"] == "train" and (running["epoch"], running["epochs"]) == (3, 4)
    assert running["fraction"] == pytest.approx(0.6) and running["tail"][-1].startswith("epoch 3/4")
    evaluating = job_progress({"status": "running"}, log + "[10:01:00] $ emoshield evaluate --model x\n")
    assert evaluating["step"] == "evaluate" and evaluating["fraction"] > running["fraction"]
    assert job_progress({"status": "finished"}, log)["fraction"] == 1.0
    assert job_progress({"status": "queued"}, "")["fraction"] == 0.0
    assert len(job_progress({"status": "running"}, "line\n" * 500)["tail"]) == 20
    # a long training whose step line has left the log's tail is still training
    assert job_progress({"status": "running"}, "epoch 799/1000 train loss 0.1\n")["step"] == "train"


def test_stream_slots_are_bounded_in_all_and_per_session_and_unstarted_ones_are_reclaimed():
    slots = StreamSlots(limit=3, per_session=2, claim_within=0.2)
    a1, a2 = slots.reserve("a"), slots.reserve("a")
    assert a1 and a2 and slots.reserve("a") is None  # per session
    b1 = slots.reserve("b")
    assert b1 and slots.reserve("c") is None  # in all
    assert slots.claim(a1) and slots.claim(b1)
    time.sleep(0.25)  # a2 never started: its slot goes back
    assert slots.reserve("c") is not None and not slots.claim(a2)
    slots.release(a1)
    assert slots.reserve("a") is not None and len(slots) == 3


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_a_bundle_summary_never_fails_on_a_manifest_of_any_shape(value):
    for manifest in (value, {"metrics": value, "backbone": value, "training": value, "name": value},
                     {"metrics": {"robustness": value, "per_class_accuracy": value, "test_accuracy": value}}):
        summary = bundle_summary(3, value, manifest if isinstance(manifest, dict) else {})
        json.dumps(summary, allow_nan=False)


def test_a_bundle_row_says_what_made_its_numbers():
    manifest = {"preprocessing": {"input_size": 48}, "backbone": {"name": "smallcnn"},
                "training": {"dataset": "ckplus48", "protocol": "subject", "epochs": 30, "seed": 2, "defense": {"eps": 0.01}}}
    row = bundle_summary(1, 0, manifest)
    assert (row["dataset"], row["input_size"], row["epochs"], row["seed"], row["defended"]) == ("ckplus48", 48, 30, 2, True)
    undefended = bundle_summary(1, 0, {**manifest, "training": {**manifest["training"], "defense": None}})
    assert undefended["defended"] is False
    hostile = bundle_summary(1, 0, {"preprocessing": {"input_size": -3}, "training": {"epochs": True, "seed": 1.5}})
    assert (hostile["input_size"], hostile["epochs"], hostile["seed"], hostile["defended"]) == (None, None, None, None)


def test_robustness_headline_orders_attacks_and_drops_values_that_are_not_accuracies():
    rows = robustness_headline({"robustness": {"pgd@0.01": 0.8, "clean": 0.95, "fgsm@0.01": 0.9, "autoattack@0.01": 0.7,
                                               "fgsm@0.005": 0.92, "weird@1": "x", "nan@1": float("nan"), "big@1": 7,
                                               "pgd@x": 0.5, "pgd@inf": 0.5}})
    assert [(r["attack"], r["eps"]) for r in rows] == [("clean", None), ("fgsm", "0.005"), ("fgsm", "0.01"),
                                                         ("pgd", "0.01"), ("autoattack", "0.01")]
    from emoshield.attacks.registry import LABELS
    from emoshield.tiers.dashboard.state import ATTACK_LABELS

    assert {k: ATTACK_LABELS[k] for k in LABELS} == LABELS  # the dashboard names attacks as the reports do


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(telemetry=st.dictionaries(st.sampled_from(["version", "fps", "faces", "precision", "self_check", "emotions",
                                                  "frames", "finished", "interval"]), JSON, max_size=9),
       name=st.text(min_size=1, max_size=64))
def test_hostile_names_and_heartbeats_render_as_escaped_text(tmp_path_factory, telemetry, name):
    """Whatever an admin typed as a device name and whatever an enrolled device heartbeats, the
    sections render (no exception) and no markup of theirs reaches the page."""
    from types import SimpleNamespace

    from emoshield.tiers.dashboard import DashboardData, _environment
    from emoshield.tiers.store import EdgeStore

    root = tmp_path_factory.mktemp("render")
    store = EdgeStore(root)
    device_id, _ = store.enrol(name + "<script>alert(1)</script>")
    hostile = {**telemetry, "precision": telemetry.get("precision", "<img src=x onerror=alert(1)>"),
               "emotions": telemetry.get("emotions", {"<b>happy</b>": 3})}
    store.record_heartbeat(device_id, hostile)  # dropped when it does not fit the store; rendered otherwise
    node = SimpleNamespace(store=store, job_dir=lambda job_id: root / "jobs" / str(job_id))
    html = _environment().get_template("devices.html").render(
        devices=DashboardData(node, 60.0).devices(), csrf="token")
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert device_id in html
    store.close()


# ---- a real edge ----

@pytest.fixture(scope="module")
def site(tmp_path_factory, data_root, broker):
    """Cloud + edge (MQTT through the session's Mosquitto) as processes, 25 subject-tagged CK+48
    faces uploaded by one device; yields what the tests share."""
    tmp = tmp_path_factory.mktemp("dashboard")
    admin = service_files(tmp, ADMIN)
    cloud_port, edge_port = free_port(), free_port()
    procs = []
    try:
        procs.append(start("cloud", "serve", "--library", tmp / "library", "--port", cloud_port, log=tmp / "cloud.log"))
        cloud = f"http://127.0.0.1:{cloud_port}"
        wait_healthy(cloud, procs[-1], tmp / "cloud.log")
        procs.append(start("edge", "serve", "--root", tmp / "edge", "--key", tmp / "keys" / "private.key", "--cloud",
                           cloud, "--backbone", "smallcnn-test", "--classes", FIVE, "--admin-token-file", admin,
                           "--epochs", "2", "--input-size", "32", "--batch-size", "16", "--mqtt", broker,
                           "--port", edge_port, "--name", "edge-dash", log=tmp / "edge.log"))
        edge = f"http://127.0.0.1:{edge_port}"
        wait_healthy(edge, procs[-1], tmp / "edge.log")
        uploader = EdgeClient(edge, ADMIN).enrol("uploader")
        proc = run("edge", "upload", "--dataset", "ckplus48", "--data-root", data_root, "--classes", FIVE,
                   "--protocol", "subject", "--per-class", "5", "--edge", edge, "--token-file",
                   token_file(tmp, "uploader", uploader["token"]))
        assert "uploaded 25 train faces" in proc.stdout
        frames = tmp / "frames"
        frames.mkdir()
        for path in sorted((Path(data_root) / "jaffe").iterdir())[:3]:
            shutil.copyfile(path, frames / path.name)
        yield {"tmp": tmp, "edge": edge, "edge_proc": procs[-1], "frames": frames}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def login(edge: str) -> requests.Session:
    """A requests session logged in the way a browser is (form POST, cookie)."""
    client = requests.Session()
    answer = client.post(edge + "/login", data={"token": ADMIN}, allow_redirects=False, timeout=10)
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
    return client


def csrf_of(client: requests.Session, edge: str) -> str:
    page = client.get(edge + "/", timeout=10)
    assert page.status_code == 200
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def test_every_dashboard_route_refuses_without_a_session(site):
    edge = site["edge"]
    answer = requests.get(edge + "/", allow_redirects=False, timeout=10)
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    for bearer in (None, ADMIN):  # the API's bearer token is not a dashboard session
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        for path in GET_ROUTES[1:]:
            assert requests.get(edge + path, headers=headers, timeout=10).status_code == 401, path
        for path in POST_ROUTES:
            assert requests.post(edge + path, headers=headers, data={"csrf": "x", "name": "n"},
                                 timeout=10).status_code == 401, path
        assert requests.get(edge + "/", headers=headers, allow_redirects=False, timeout=10).status_code == 303
    forged = {"Cookie": "emoshield_session=" + "A" * 43}
    assert requests.get(edge + "/dashboard/state", headers=forged, timeout=10).status_code == 401
    css = requests.get(edge + "/dashboard/static/dashboard.css", timeout=10)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert requests.get(edge + "/dashboard/static/../edge.sqlite3", timeout=10).status_code == 404
    assert requests.get(edge + "/dashboard/static/x.js", timeout=10).status_code == 404
    assert requests.get(edge + "/docs", timeout=10).status_code == 404  # CDN scripts on the cookie's origin: off
    assert requests.get(edge + "/openapi.json", timeout=10).status_code == 200
    page = requests.get(edge + "/login", timeout=10)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert 'name="token"' in page.text and page.headers["cache-control"] == "no-store"


def test_the_session_cookie_is_httponly_strict_and_expiring_and_every_form_needs_its_csrf_token(site):
    edge = site["edge"]
    client = requests.Session()
    answer = client.post(edge + "/login", data={"token": ADMIN}, allow_redirects=False, timeout=10)
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and answer.headers["location"] == "/"  # no token in any URL
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie and ADMIN not in cookie
    assert ADMIN not in client.get(edge + "/", timeout=10).text
    csrf = csrf_of(client, edge)
    jobs_before = len(EdgeClient(edge, ADMIN).call("GET", "/jobs"))
    devices_before = len(EdgeClient(edge, ADMIN).call("GET", "/devices"))
    for data, headers in (({}, {}), ({"csrf": ""}, {}), ({"csrf": csrf[:-2]}, {}), ({"csrf": "é" * 10}, {}),
                          ({"csrf": csrf}, {"Origin": "http://evil.example"}),
                          ({"csrf": csrf}, {"Sec-Fetch-Site": "cross-site"})):
        for path in ("/dashboard/jobs", "/dashboard/devices"):
            status = client.post(edge + path, data={**data, "name": "intruder"}, headers=headers,
                                 allow_redirects=False, timeout=10).status_code
            assert status == 403, (path, data, headers)
    assert client.post(edge + "/dashboard/jobs", json={"csrf": csrf}, timeout=10).status_code == 422  # not a form
    assert len(EdgeClient(edge, ADMIN).call("GET", "/jobs")) == jobs_before  # nothing was queued
    assert len(EdgeClient(edge, ADMIN).call("GET", "/devices")) == devices_before  # nor enrolled
    # logging out ends the session server-side: the old cookie is refused even if kept
    old = client.cookies.get("emoshield_session")
    assert client.post(edge + "/logout", data={"csrf": csrf}, allow_redirects=False, timeout=10).status_code == 303
    assert requests.get(edge + "/dashboard/state", cookies={"emoshield_session": old}, timeout=10).status_code == 401


def test_the_event_stream_ends_when_its_session_does_and_hostile_event_ids_are_ignored(site):
    edge = site["edge"]
    client = login(edge)
    csrf = csrf_of(client, edge)
    for last_id in ("", "abc", "-1", "9" * 40, "1e9", "١٢".encode(), b"\xff\xfe", "5 5", "99999999"):
        with client.get(edge + "/dashboard/events", headers={"Last-Event-ID": last_id}, stream=True,
                        timeout=10) as answer:
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
            assert next(answer.iter_lines()) == b"retry: 2000"
    lines, done = [], threading.Event()

    def read():
        with client.get(edge + "/dashboard/events", stream=True, timeout=30) as answer:
            for line in answer.iter_lines():
                lines.append(line.decode())
                if line == b"event: logout":
                    break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 10
    while "event: state" not in lines and time.monotonic() < deadline:  # the sections come at once
        time.sleep(0.05)
    assert "event: state" in lines
    client.post(edge + "/logout", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert done.wait(10) and lines[-1] == "event: logout"
    requests.get(edge + "/health", timeout=10).raise_for_status()


def test_devices_enrolled_at_once_in_one_session_each_show_their_token_once(site):
    """A double click or two tabs: both enrolments land and the enrolled page shows both tokens,
    once; past MAX_PENDING_TOKENS waiting tokens a further enrolment is refused (429), not lost."""
    from emoshield.tiers.dashboard.state import MAX_PENDING_TOKENS

    edge = site["edge"]
    client = login(edge)
    csrf = csrf_of(client, edge)
    barrier, answers = threading.Barrier(2), []

    def enrol(name):
        barrier.wait()
        answers.append(client.post(edge + "/dashboard/devices", data={"name": name, "csrf": csrf},
                                   allow_redirects=False, timeout=10).status_code)

    threads = [threading.Thread(target=enrol, args=(f"tab-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [303, 303]
    page = client.get(edge + "/dashboard/enrolled", allow_redirects=False, timeout=10)
    tokens = re.findall(r'<pre class="token" id="device-token[-0-9]*">([^<]+)</pre>', page.text)
    assert page.status_code == 200 and len(tokens) == 2 and "tab-0" in page.text and "tab-1" in page.text
    for token in tokens:  # each works as a device token
        assert EdgeClient(edge, token.strip()).me()["name"] in ("tab-0", "tab-1")
    assert client.get(edge + "/dashboard/enrolled", allow_redirects=False, timeout=10).status_code == 303  # once
    statuses = [client.post(edge + "/dashboard/devices", data={"name": f"many-{i}", "csrf": csrf},
                            allow_redirects=False, timeout=10).status_code for i in range(MAX_PENDING_TOKENS + 1)]
    assert statuses == [303] * MAX_PENDING_TOKENS + [429]
    page = client.get(edge + "/dashboard/enrolled", timeout=10)
    assert len(re.findall(r'class="token"', page.text)) == MAX_PENDING_TOKENS
    admin = EdgeClient(edge, ADMIN)
    for d in admin.call("GET", "/devices"):  # leave the module's edge as the other tests expect it
        if d["name"].startswith(("tab-", "many-")):
            admin.call("DELETE", f"/devices/{d['id']}")


def test_the_dashboard_rides_out_a_database_outage(tmp_path):
    """A real fault: the edge's PostgreSQL stops while an operator watches. Pages answer 503 'retry
    later'; the open event stream stays open (the page keeps what it shows) and, once the server is
    back, sends what changed meanwhile on the same connection; the edge keeps serving."""
    import tempfile

    from emoshield.tiers.postgres import start_postgres, stop_postgres

    folder, db_port = Path(tempfile.mkdtemp(prefix="emoshield-pg-")), free_port()  # kept across the restart
    server, database = start_postgres(db_port, folder)
    admin, edge_port = service_files(tmp_path, ADMIN), free_port()
    proc = start("edge", "serve", "--root", tmp_path / "edge", "--key", tmp_path / "keys" / "private.key",
                 "--cloud", f"http://127.0.0.1:{free_port()}", "--backbone", "smallcnn-test", "--classes", FIVE,
                 "--admin-token-file", admin, "--port", edge_port, "--database", database, log=tmp_path / "edge.log")
    edge = f"http://127.0.0.1:{edge_port}"
    lines, failed = [], []

    def read(answer):
        try:
            for line in answer.iter_lines():
                lines.append(line.decode())
        except Exception as exc:  # the stream broke: the test below says so
            failed.append(exc)

    try:
        wait_healthy(edge, proc, tmp_path / "edge.log")
        client = login(edge)
        answer = client.get(edge + "/dashboard/events", stream=True, timeout=60)
        threading.Thread(target=read, args=(answer,), daemon=True).start()
        deadline = time.monotonic() + 10
        while "event: state" not in lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "event: state" in lines
        stop_postgres(server)
        for path in ("/", "/dashboard/state"):
            down = client.get(edge + path, timeout=30)
            assert down.status_code == 503 and "retry later" in down.text and "127.0.0.1" not in down.text
        time.sleep(3)  # several of the stream's state polls meet the outage
        server, _ = start_postgres(db_port, folder)
        EdgeClient(edge, ADMIN).enrol("came-back")
        deadline = time.monotonic() + 20
        while not any("came-back" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not failed and any("came-back" in line for line in lines), "the stream did not outlive the outage"
        assert client.get(edge + "/dashboard/state", timeout=30).status_code == 200
        answer.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        stop_postgres(server)
        shutil.rmtree(folder, ignore_errors=True)
    log = (tmp_path / "edge.log").read_text()
    assert "database unavailable" in log and "Traceback" not in log


def test_event_streams_are_bounded_per_session_even_when_requested_in_one_burst(site):
    edge = site["edge"]
    cookies = login(edge).cookies.get_dict()
    answers, lock = [], threading.Lock()

    def open_stream():
        answer = requests.get(edge + "/dashboard/events", cookies=cookies, stream=True, timeout=10)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=open_stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 4 + [429] * 4, statuses
    for answer in answers:
        answer.close()
    deadline = time.monotonic() + 10  # closed streams give their slots back
    while time.monotonic() < deadline:
        with requests.get(edge + "/dashboard/events", cookies=cookies, stream=True, timeout=10) as answer:
            if answer.status_code == 200:
                break
        time.sleep(0.2)
    assert answer.status_code == 200


def browser(javascript: bool = True, width: int = 1280, height: int = 1000):
    """Debian's headless chromium through its chromium-driver (never a downloaded driver)."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("Debian's chromium and chromium-driver are needed: `make setup` installs them")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", f"--window-size={width},{height}"):
        options.add_argument(arg)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def log_in(driver, edge: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(edge + "/")
    assert driver.current_url.endswith("/login")
    driver.find_element(By.ID, "token").send_keys(ADMIN)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(driver, 10, lambda d: d.find_elements(By.ID, "devices"), "the dashboard after login")


def wait(driver, seconds: float, condition, what: str, proc=None, log: Path | None = None):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"device exited while waiting for {what}: {log.read_text()[-3000:]}")
        try:
            return condition(d)
        except StaleElementReferenceException:  # a section was just re-rendered
            return False

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(check)
    except TimeoutException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-timeout.png"))
        raise AssertionError(f"{what}: not seen in {seconds} s (screenshot in {ARTIFACTS})") from None


def fresh(read, tries: int = 50):
    """read() again when a section was re-rendered under it (live updates replace its elements)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(tries - 1):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.1)
    return read()


def test_an_operator_sees_devices_versions_the_live_timeline_and_revokes_in_a_real_browser(site):
    from selenium.webdriver.common.by import By

    edge, tmp = site["edge"], site["tmp"]
    driver = browser()
    device = None
    try:
        log_in(driver, edge)
        assert driver.find_element(By.ID, "live-status").text in ("live", "static page")
        wait(driver, 10, lambda d: d.find_element(By.ID, "live-status").text == "live", "the event stream open")
        # enrol through the form: the token is shown once, on its own page
        driver.find_element(By.ID, "device-name").send_keys("camera <dash>")
        driver.find_element(By.CSS_SELECTOR, "#enrol-form button").click()
        token = wait(driver, 10, lambda d: d.find_element(By.ID, "device-token").text, "the new device's token")
        device_id = driver.find_element(By.ID, "device-id").text
        assert re.fullmatch(r"d[0-9a-f]{12}", device_id) and len(token) >= 32
        assert driver.current_url.endswith("/dashboard/enrolled")  # post, redirect, get
        driver.refresh()  # shown once: a reload neither shows the token again nor enrols another device
        wait(driver, 10, lambda d: d.find_elements(By.ID, "devices"), "the dashboard after the reload")
        assert not driver.find_elements(By.ID, "device-token") and token not in driver.page_source
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr[data-device]")) == 2  # uploader + this one
        row = f'tr[data-device="{device_id}"]'
        assert "camera <dash>" in fresh(lambda: driver.find_element(By.CSS_SELECTOR, row + " strong").text)  # as text
        assert fresh(lambda: driver.find_element(By.CSS_SELECTOR, row + " .status").text) == "never seen"

        # the first job: its progress and result arrive without a reload
        driver.find_element(By.CSS_SELECTOR, "#train-form button").click()
        wait(driver, 300, lambda d: d.find_elements(By.CSS_SELECTOR, 'article.bundle[data-version="1"]'),
             "bundle v1 on the page")
        headers = fresh(lambda: [th.text for th in
                                 driver.find_elements(By.CSS_SELECTOR, 'article[data-version="1"] th')])
        assert {"FGSM @0.01", "R+FGSM @0.01", "PGD @0.01"} <= set(headers), headers
        assert len(driver.find_elements(By.CSS_SELECTOR, 'article[data-version="1"] meter')) == 5  # per class
        provenance = fresh(lambda: driver.find_element(By.CSS_SELECTOR, 'article[data-version="1"] .provenance').text)
        assert "32 px · 2 epochs · seed 0 · defended" in provenance, provenance  # what made the numbers
        # the bundle is recorded a moment before the job's last log line: wait for the log's next update
        wait(driver, 30, lambda d: "published bundle v1" in d.find_element(By.ID, "job-log").text, "the job's log tail")

        # a real device: pulls v1, heartbeats over MQTT with its faces per emotion
        log = tmp / "device.log"
        device = start("device", "run", "--edge", edge, "--token-file", token_file(tmp, "camera", token),
                       "--pubkey", tmp / "keys" / "public.key",
                       "--trust-root", tmp / "edge" / "trust" / "metadata" / "1.root.json", "--store", tmp / "device",
                       "--source", site["frames"], "--loop", "--realtime", "--poll", "0", "--heartbeat", "0.5",
                       "--max-frames", "100000", "--jsonl", tmp / "device.jsonl", log=log)
        wait(driver, 60, lambda d: d.find_element(By.CSS_SELECTOR, row + " .version").text == "v1",
             "the device on v1", device, log)
        assert fresh(lambda: driver.find_element(By.CSS_SELECTOR, row + " .status").text) == "online"
        card = f'.timeline[data-device="{device_id}"]'
        first = int(wait(driver, 30, lambda d: d.find_element(By.CSS_SELECTOR, card).get_attribute("data-intervals"),
                         "the device's timeline", device, log))
        wait(driver, 30,
             lambda d: int(d.find_element(By.CSS_SELECTOR, card).get_attribute("data-intervals")) >= first + 3,
             "the timeline moving", device, log)
        classes = fresh(lambda: {r.get_attribute("class")
                                 for r in driver.find_elements(By.CSS_SELECTOR, card + " rect")})
        assert any(c.startswith("emo-") for c in classes), classes  # JAFFE faces were found and classified
        assert "now:" in fresh(lambda: driver.find_element(By.CSS_SELECTOR, card + " .now").text)

        # a second job: the device's row follows it to v2
        driver.find_element(By.CSS_SELECTOR, "#train-form button").click()
        wait(driver, 300, lambda d: d.find_element(By.CSS_SELECTOR, row + " .version").text == "v2",
             "the device on v2", device, log)
        wait(driver, 10, lambda d: d.find_elements(By.CSS_SELECTOR, 'article.bundle[data-version="2"]'), "bundle v2")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

        # a phone's width: no sideways scrolling of the page (wide tables scroll inside their box)
        driver.set_window_size(390, 844)
        time.sleep(0.5)
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert driver.find_element(By.CSS_SELECTOR, "#train-form button").is_displayed()
        driver.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))
        driver.set_window_size(1280, 1000)

        # revoke: the row and the timeline go, without a reload of the device list by hand
        fresh(lambda: driver.find_element(By.CSS_SELECTOR, row + " form.revoke button").click())
        driver.switch_to.alert.accept()
        wait(driver, 20,
             lambda d: not d.find_elements(By.CSS_SELECTOR, row) and not d.find_elements(By.CSS_SELECTOR, card),
             "the revoked device gone")
        assert device_id not in {d["id"] for d in EdgeClient(edge, ADMIN).call("GET", "/devices")}
    finally:
        driver.quit()
        if device is not None:
            device.terminate()
            device.wait(timeout=30)


def test_the_static_parts_work_with_javascript_off(site):
    from selenium.webdriver.common.by import By

    edge = site["edge"]
    driver = browser(javascript=False)
    try:
        log_in(driver, edge)
        assert driver.find_element(By.ID, "live-status").text == "static page"
        assert "needs JavaScript" in driver.find_element(By.CSS_SELECTOR, "#timeline").text
        # (a job is marked finished a moment after its bundle is published: reload until it is;
        # the fixture's jobs train in the background and take minutes on a loaded 2-core machine)
        finished = "#job-table tr.job.finished"
        wait(driver, 180, lambda d: d.refresh() or len(d.find_elements(By.CSS_SELECTOR, finished)) >= 2,
             "both jobs finished")
        assert driver.find_elements(By.CSS_SELECTOR, 'article.bundle[data-version="2"]')
        assert "PGD @0.01" in driver.find_element(By.CSS_SELECTOR, 'article[data-version="2"] table').text
        # plain forms: enrol (token page), then revoke (no confirm without the script)
        driver.find_element(By.ID, "device-name").send_keys("no-js-camera")
        driver.find_element(By.CSS_SELECTOR, "#enrol-form button").click()
        device_id = wait(driver, 10, lambda d: d.find_element(By.ID, "device-id").text, "the enrolled page")
        driver.get(edge + "/")
        row = f'tr[data-device="{device_id}"]'
        driver.find_element(By.CSS_SELECTOR, row + " form.revoke button").click()
        wait(driver, 10, lambda d: d.find_elements(By.ID, "devices") and not d.find_elements(By.CSS_SELECTOR, row),
             "the revoked device gone")
    finally:
        driver.quit()


FORM_BODY = st.one_of(st.binary(max_size=5000), st.text(max_size=300).map(str.encode),
                      st.dictionaries(st.sampled_from(["csrf", "name", "token", "x"]), st.text(max_size=80),
                                      max_size=4).map(lambda d: "&".join(f"{k}={v}" for k, v in d.items()).encode()))
CONTENT_TYPE = st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                "text/plain", "", "application/x-www-form-urlencoded; charset=latin-1"])


def test_hostile_forms_get_4xx_and_guessing_logins_are_slowed_while_the_edge_keeps_serving(site):
    edge = site["edge"]
    client = login(edge)
    devices_before = len(EdgeClient(edge, ADMIN).call("GET", "/devices"))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(POST_ROUTES[1:] + ["/dashboard/devices/d" + "0" * 12 + "/revoke"]), body=FORM_BODY,
           content_type=CONTENT_TYPE)
    def forms(path, body, content_type):
        answer = client.post(edge + path, data=body, headers={"Content-Type": content_type}, allow_redirects=False,
                             timeout=10)
        assert answer.status_code in (403, 422), (path, body[:80], answer.status_code, answer.text[:200])

    forms()
    big = client.post(edge + "/dashboard/devices", data=b"name=" + b"x" * 10_000,
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert big.status_code == 422
    for name in ("a\nb", "\u202eevil", "\x00", "x" * 65, ""):  # the API's enrolment too: printable names only
        with pytest.raises(ServiceError, match="422"):
            EdgeClient(edge, ADMIN).enrol(name)
    assert len(EdgeClient(edge, ADMIN).call("GET", "/devices")) == devices_before
    # guessing the admin token: refused, then slowed (429) for this client even with the right one
    statuses = [requests.post(edge + "/login", data={"token": guess}, allow_redirects=False, timeout=10).status_code
                for guess in ("", "x", "é" * 600, "wrong-token-" * 3, "\x00", *["guess"] * 5)]
    assert set(statuses) == {401}, statuses
    for forwarded in ({}, {"X-Forwarded-For": "10.1.2.3"}, {"X-Real-IP": "10.1.2.4"}):  # no proxy header picks the key
        assert requests.post(edge + "/login", data={"token": ADMIN}, headers=forwarded, allow_redirects=False,
                             timeout=10).status_code == 429
    assert client.get(edge + "/dashboard/state", timeout=10).status_code == 200  # sessions already open still work
    site["cookies"] = client.cookies.get_dict()  # for the last test: this client's logins are slowed now
    requests.get(edge + "/health", timeout=10).raise_for_status()
    assert site["edge_proc"].poll() is None


def test_an_edge_with_open_event_streams_still_stops_promptly_on_sigterm(site):
    """Last in this file (it stops the module's edge): open dashboard streams must not hold a
    graceful shutdown forever; the edge exits within seconds, its streams ended."""
    edge, proc = site["edge"], site["edge_proc"]
    cookies = site.get("cookies") or login(edge).cookies.get_dict()
    streams = [requests.get(edge + "/dashboard/events", cookies=cookies, stream=True, timeout=30) for _ in range(3)]
    assert all(s.status_code == 200 for s in streams)
    started = time.monotonic()
    proc.terminate()
    proc.wait(timeout=30)
    assert time.monotonic() - started < 20, "SIGTERM waited on the open event streams"
    for stream in streams:
        stream.close()
