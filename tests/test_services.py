"""Cloud, edge, Mosquitto and devices as real processes on 127.0.0.1 (free ports): enrol
devices, upload real faces, train a defended model from a cloud backbone verified by hash,
publish a signed bundle; a device pulls, verifies, installs and runs it; a running device
learns of the next bundle over MQTT (no polling) and reports it in its heartbeats; then it
goes on offline."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emoshield.tiers.client import EdgeClient, ServiceError, request
from emoshield.tiers.mqtt import DeviceLink
from tests.conftest import FIVE, MQTT_ADMIN, free_port
from tests.test_cli import run


def start(*args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emoshield", *map(str, args)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def token_file(folder: Path, name: str, token: str) -> Path:
    """A token in a 0600 file: tokens never travel on command lines (visible in ps)."""
    path = Path(folder) / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited: {log.read_text()}")
        try:
            return request("GET", url + "/health", timeout=2)
        except ServiceError:
            time.sleep(0.3)
    raise AssertionError(f"service at {url} not healthy in {timeout} s: {log.read_text()}")


def service_files(tmp: Path, admin_token: str) -> Path:
    """What the services start from, in `tmp`: signing keys, the admin token's file (returned), a
    cloud library with an untrained 32 px smallcnn, and the edge's update repository (its root key
    kept outside the edge's folder)."""
    run("keys", "generate", "--out", tmp / "keys")
    admin = token_file(tmp, "admin", admin_token)
    run("cloud", "add", "--library", tmp / "library", "--name", "smallcnn-test", "--backbone", "smallcnn",
        "--weights", "scratch", "--input-size", "32")
    run("trust", "init", "--edge-root", tmp / "edge", "--root-key", tmp / "offline" / "root.key")
    return admin


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def services(request, tmp_path_factory, data_root, secure_broker):
    broker = secure_broker  # anonymous clients refused: the edge issues each device its MQTT account
    """The whole suite runs twice: edge metadata in SQLite (default), then in PostgreSQL."""
    tmp = tmp_path_factory.mktemp(f"services-{request.param}")
    database = ["--database", request.getfixturevalue("postgres")] if request.param == "postgresql" else []
    service_files(tmp, "admin-secret")
    token_file(tmp, "mqtt-admin", MQTT_ADMIN[1])
    cloud_port, edge_port = free_port(), free_port()
    procs = []
    try:
        cloud = start("cloud", "serve", "--library", tmp / "library", "--port", cloud_port,
                      *database,  # postgresql: the cloud's catalog and the edge's store in one server
                      log=tmp / "cloud.log")
        procs.append(cloud)
        cloud_url = f"http://127.0.0.1:{cloud_port}"
        wait_healthy(cloud_url, cloud, tmp / "cloud.log")
        edge = start("edge", "serve", "--root", tmp / "edge", "--key", tmp / "keys" / "private.key", "--cloud",
                     cloud_url, "--backbone", "smallcnn-test", "--classes", FIVE, "--admin-token-file", tmp / "admin.token",
                     "--epochs", "2", "--input-size", "32", "--batch-size", "16", "--max-upload-bytes", "200000",
                     "--mqtt", broker, "--mqtt-admin-user", MQTT_ADMIN[0], "--mqtt-admin-password-file",
                     tmp / "mqtt-admin.token", "--port", edge_port, "--name", f"edge-{request.param}", *database,
                     log=tmp / "edge.log")
        procs.append(edge)
        edge_url = f"http://127.0.0.1:{edge_port}"
        wait_healthy(edge_url, edge, tmp / "edge.log")
        yield {"tmp": tmp, "cloud": cloud_url, "edge": edge_url, "edge_proc": edge, "data_root": data_root,
               "broker": broker, "name": f"edge-{request.param}"}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def test_cloud_lists_backbones_with_hashes(services):
    entries = request("GET", services["cloud"] + "/backbones")
    assert [e["name"] for e in entries] == ["smallcnn-test"] and len(entries[0]["sha256"]) == 64
    with pytest.raises(ServiceError, match="404"):
        request("GET", services["cloud"] + "/backbones/nope")
    assert "openapi" in request("GET", services["cloud"] + "/openapi.json")


def test_edge_guards_enrolment_and_uploads(services):
    edge = services["edge"]
    with pytest.raises(ServiceError, match="403"):
        EdgeClient(edge, "wrong").enrol("intruder")
    a = EdgeClient(edge, "admin-secret").enrol("camera-a")
    b = EdgeClient(edge, "admin-secret").enrol("camera-b")
    device_b = EdgeClient(edge, b["token"])
    face = cv2_png(services["data_root"])
    assert device_b.upload(face, "happy", file_name="../../etc/passwd")["sha256"]
    with pytest.raises(ServiceError, match="415"):
        device_b.upload(b"GIF89a not a face", "happy")
    with pytest.raises(ServiceError, match="413"):
        device_b.upload(b"\x89PNG\r\n\x1a\n" + b"0" * 300_000, "happy")
    with pytest.raises(ServiceError, match="422"):
        device_b.upload(face, "bored")
    for subject in ("x" * 65, "../../etc", "Sujet-é", "-lead", "a b", "S1\n", "\x00"):  # subject tags: 422
        with pytest.raises(ServiceError, match="422"):
            device_b.upload(face, "happy", subject=subject)
    with pytest.raises(ServiceError, match="401"):
        request("GET", edge + "/samples")
    # each device sees only its own samples
    proc = run("edge", "upload", "--dataset", "ckplus48", "--data-root", services["data_root"], "--classes", FIVE,
               "--protocol", "subject", "--per-class", "5", "--edge", edge, "--token-file", token_file(services["tmp"], "a", a["token"]))
    assert "uploaded 25 train faces" in proc.stdout and "tagged with" in proc.stdout
    mine = EdgeClient(edge, a["token"]).call("GET", "/samples")
    assert len(mine) == 25 and all(s["subject"].startswith("S") for s in mine)  # CK+48 subject ids as tags
    assert len(device_b.call("GET", "/samples")) == 1
    assert not list((services["tmp"] / "edge").rglob("passwd"))
    services["device"] = a


def cv2_png(data_root) -> bytes:
    path = sorted((Path(data_root) / "ckplus48" / "happy").iterdir())[0]
    return path.read_bytes()


def _raw(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw request bytes (headers no client library would send) and read the status line."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_edge_answers_hostile_requests_with_4xx_and_keeps_serving(services):
    from tests.test_hostile import _jpeg_declaring, _png

    edge = services["edge"]
    for value in (b"Bearer \xe9", b"Bearer \xa0", b"Bearer   ", b"Bearer", b"Basic YWRtaW4=", b"Bearer \xff" * 300):
        status, _ = _raw(edge, b"GET /devices HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\n")
        assert status == 401, value
    for path in ("/jobs/99999999999999999999999", "/jobs/-1", "/jobs/99999999999999999999999/log",
                 "/bundles/99999999999999999999999/model.onnx"):
        with pytest.raises(ServiceError, match="HTTP 422"):
            request("GET", edge + path, "admin-secret")
    device = EdgeClient(edge, EdgeClient(edge, "admin-secret").enrol("hostile")["token"])
    bomb = _png(32768, 32768, (b"\x00" * 4097) * 32768)  # 1 Gpixel when decoded
    assert len(bomb) < 200_000  # under the edge's byte limit: only the pixel cap stops it
    for image in (bomb, _jpeg_declaring(32768, 32768), _png(60000, 60000)):
        started = time.monotonic()
        with pytest.raises(ServiceError, match="HTTP 413 .*pixels"):
            device.upload(image, "happy")
        assert time.monotonic() - started < 2
    # a huge body is refused before it is read: unauthenticated with 401, authenticated with 413
    multipart = b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1500000000\r\n"
    started = time.monotonic()
    status, _ = _raw(edge, b"POST /samples HTTP/1.1\r\nHost: x\r\n" + multipart, b"--b\r\n" + b"0" * 65536)
    assert status == 401
    status, _ = _raw(edge, b"POST /samples HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + device.token.encode()
                     + b"\r\n" + multipart, b"--b\r\n" + b"0" * 65536)
    assert status == 413 and time.monotonic() - started < 5
    with pytest.raises(ServiceError, match="HTTP 422"):  # not multipart at all
        device.call("POST", "/samples", data=b"{}", content_type="application/json")
    assert request("GET", edge + "/health")["status"] == "ok"
    assert device.upload(cv2_png(services["data_root"]), "happy")["sha256"]  # still serving


def _fuzz(url: str, token: str | None, examples: int) -> list[str]:
    """Schemathesis against the live service's own OpenAPI schema: every operation, `examples`
    generated cases each, sent with `token` (or none). Returns the problems found: any 5xx, and,
    without a token, any 2xx from a route that needs one."""
    import itertools

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    public = {"GET /health", "GET /openapi.json", "GET /docs", "GET /backbones", "GET /backbones/{name}",
              "GET /backbones/{name}/weights"}
    problems, counts = [], {"cases": 0}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation, mode in itertools.product(operations, GenerationMode):  # valid and invalid inputs
        label = f"{operation.method.upper()} {operation.path}"
        if label == "POST /jobs" and token:
            continue  # each accepted case would queue a real training job (tested on its own above)
        if mode is GenerationMode.NEGATIVE and not any(
                len(getattr(operation, part)) for part in ("path_parameters", "query", "body")):
            continue  # nothing to make invalid (header-only operations get the bearer cases below)

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            counts["cases"] += 1
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = case.call(base_url=url, headers=headers, timeout=30)
            if response.status_code >= 500:
                problems.append(f"{label}: {response.status_code} for {case.path_parameters} {case.query}")
            if token is None and label not in public and response.status_code < 400:
                problems.append(f"{label}: {response.status_code} without a token")

        try:
            check()
        except Unsatisfiable:  # e.g. a path whose only parameter is an enum-like name: nothing invalid to make
            assert mode is GenerationMode.NEGATIVE, label
            print(f"fuzz: no invalid input for {label}")
    assert counts["cases"] >= len(operations) * 2, counts  # the fuzzer really ran
    return problems


def test_fuzzing_the_openapi_schemas_finds_no_server_error_and_no_auth_bypass(services):
    edge, cloud = services["edge"], services["cloud"]
    device = EdgeClient(edge, "admin-secret").enrol("fuzzer")["token"]
    problems = _fuzz(edge, "admin-secret", 8) + _fuzz(edge, device, 5) + _fuzz(edge, None, 5) + _fuzz(cloud, None, 8)
    assert not problems, "\n".join(problems[:20])
    assert request("GET", edge + "/health")["status"] == "ok"


def test_revoked_devices_are_refused_at_once_and_the_edge_keeps_its_files_private(services):
    import stat

    edge = services["edge"]
    admin = EdgeClient(edge, "admin-secret")
    enrolled = admin.enrol("to-revoke")
    device = EdgeClient(edge, enrolled["token"])
    assert device.me()["id"] == enrolled["device_id"]
    with pytest.raises(ServiceError, match="HTTP 403"):  # a device cannot revoke
        device.call("DELETE", f"/devices/{enrolled['device_id']}")
    # an upload whose body is still arriving when the revoke returns is refused, not stored
    import socket

    from emoshield.tiers.client import multipart

    body, content_type = multipart({"label": "happy"}, "file", "face.png", cv2_png(services["data_root"]))
    host, port = edge.removeprefix("http://").split(":")
    late = socket.create_connection((host, int(port)), timeout=30)
    late.sendall(f"POST /samples HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {enrolled['token']}\r\n"
                 f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
    time.sleep(0.5)  # the token was checked when the head arrived
    assert admin.call("DELETE", f"/devices/{enrolled['device_id']}") == {"revoked": enrolled["device_id"]}
    late.sendall(body[100:])
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := late.recv(65536)):
        answer += chunk
    late.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    with pytest.raises(ServiceError, match="HTTP 403"):
        device.me()
    with pytest.raises(ServiceError, match="HTTP 404"):
        admin.call("DELETE", f"/devices/{enrolled['device_id']}")
    for bad in ("../../etc", "d" + "0" * 40, "%00"):
        with pytest.raises(ServiceError, match="HTTP 4"):
            admin.call("DELETE", f"/devices/{bad}")
    assert enrolled["device_id"] not in [d["id"] for d in admin.call("GET", "/devices")]
    root = services["tmp"] / "edge"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path  # nothing for group or others


def test_job_publishes_a_signed_bundle_that_a_device_pulls_and_runs_offline(services):
    edge, tmp = services["edge"], services["tmp"]
    device = services.get("device") or EdgeClient(edge, "admin-secret").enrol("camera-c")
    assert EdgeClient(edge, device["token"]).latest_bundle() is None
    proc = run("edge", "job", "--edge", edge, "--admin-token-file", tmp / "admin.token", "--wait", "--timeout", "400")
    job = json.loads(proc.stdout)
    assert job["status"] == "finished" and job["version"] == 1 and job["samples"] >= 10
    log = request("GET", f"{edge}/jobs/{job['id']}/log", "admin-secret", raw=True).decode()
    assert "verified" in log and "published bundle v1" in log
    # tagged uploads: the job tested on people it never trained on, and says so
    assert job["metrics"]["protocol"] == "subject" and job["metrics"]["test_subjects"] >= 1
    assert "subject protocol: the test faces show" in log
    latest = EdgeClient(edge, device["token"]).latest_bundle()
    assert latest["version"] == 1 and latest["manifest"]["name"] == services["name"]

    frames = tmp / "frames"
    frames.mkdir()
    for path in sorted((Path(services["data_root"]) / "jaffe").iterdir())[:3]:
        shutil.copyfile(path, frames / path.name)
    args = ["device", "run", "--edge", edge, "--token-file", token_file(tmp, "device", device["token"]), "--pubkey", tmp / "keys" / "public.key",
            "--trust-root", tmp / "edge" / "trust" / "metadata" / "1.root.json",
            "--store", tmp / "device", "--source", frames, "--jsonl", tmp / "out.jsonl"]
    proc = run(*args)
    assert "installed bundle v1" in proc.stderr and "FPS" in proc.stderr
    assert json.loads((tmp / "device" / "state.json").read_text())["current"] == 1
    lines = [json.loads(x) for x in (tmp / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(r["bundle_version"] == 1 for r in lines)
    assert sum(r["box"] is not None for r in lines) >= 2  # JAFFE faces are found
    services["device_args"] = args


def running_version(edge: str, device_id: str):
    row = [d for d in request("GET", edge + "/devices", "admin-secret") if d["id"] == device_id][0]
    return row["running_version"]


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen in {timeout} s; device log:\n{log.read_text()}")
        time.sleep(0.2)


def test_running_device_learns_of_a_new_bundle_over_mqtt_without_polling(services):
    edge, tmp = services["edge"], services["tmp"]
    device = services["device"]
    me = EdgeClient(edge, device["token"]).me()
    assert me["mqtt"] == services["broker"] and me["id"] == device["device_id"] and me["mqtt_auth"] == "token"
    log = tmp / "device-mqtt.log"
    proc = start("device", "run", "--edge", edge, "--token-file", token_file(tmp, "device", device["token"]), "--pubkey", tmp / "keys" / "public.key",
            "--trust-root", tmp / "edge" / "trust" / "metadata" / "1.root.json",
                 "--store", tmp / "device", "--source", tmp / "frames", "--loop", "--realtime", "--poll", "0",
                 "--heartbeat", "0.5", "--max-frames", "600", "--jsonl", tmp / "mqtt.jsonl", log=log)
    try:
        # heartbeats reach the edge through the broker
        wait_until(lambda: running_version(edge, me["id"]) == 1, 30, "heartbeat with v1", proc, log)
        job = json.loads(run("edge", "job", "--edge", edge, "--admin-token-file", tmp / "admin.token", "--wait",
                             "--timeout", "400").stdout)
        assert job["status"] == "finished" and job["version"] == 2
        wait_until(lambda: running_version(edge, me["id"]) == 2, 60, "heartbeat with v2", proc, log)
        # heartbeats say which precision the device chose after the int8 self-check on this CPU
        telemetry = [d for d in request("GET", edge + "/devices", "admin-secret") if d["id"] == me["id"]][0]["telemetry"]
        assert telemetry["precision"] in ("int8", "fp32") and telemetry["self_check"]["requested"] == "int8"
        assert telemetry["self_check"]["probes"] > 0 and 0 <= telemetry["self_check"]["agreement"] <= 1
        # and the faces per emotion seen since the previous heartbeat (the dashboard's timeline; counts, no images)
        assert set(telemetry["emotions"]) <= set(FIVE.split(",")) and all(n >= 0 for n in telemetry["emotions"].values())
        assert 0 < telemetry["interval"] < 30
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "MQTT connected" in text and "bundle v2 announced over MQTT" in text and "installed bundle v2" in text
    assert "FPS" in text  # SIGTERM still ends with the summary line
    state = json.loads((tmp / "device" / "state.json").read_text())
    assert state == {**state, "current": 2, "previous": 1}
    versions = [json.loads(x)["bundle_version"] for x in (tmp / "mqtt.jsonl").read_text().splitlines()]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
    # the announcement is retained: a device connecting now learns v2 at once
    assert not DeviceLink(services["broker"], me["edge"], "anonymous").start(wait=2)  # no account, no entry
    link = DeviceLink(services["broker"], me["edge"], me["id"], device["token"])
    try:
        assert link.start()
        deadline = time.monotonic() + 10
        while link.announced != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.announced == 2
    finally:
        link.stop()


def _scrape(edge: str) -> dict[str, float]:
    """GET /metrics as {series: value}, parsed by prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    import requests

    answer = requests.get(edge + "/metrics", headers={"Authorization": "Bearer admin-secret"}, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    series = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            series[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return series


def test_metrics_count_uploads_refusals_jobs_devices_and_latency(services):
    """After the uploads, refusals, jobs and heartbeats of the tests above: Prometheus text that
    says what happened; unauthenticated scrapes refused; hostile paths add no series."""
    import requests

    edge = services["edge"]
    for token in (None, "wrong-token-0123456789", services["device"]["token"]):  # admin only
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        assert requests.get(edge + "/metrics", headers=headers, timeout=10).status_code in (401, 403)
    before = _scrape(edge)
    assert before["emoshield_uploads_total"] >= 26  # 25 tagged faces + 1 of camera-b, and the jobs' runs
    assert before["emoshield_uploads_rejected_total{reason=not_an_image}"] >= 1
    assert before["emoshield_uploads_rejected_total{reason=too_large}"] >= 1
    assert before["emoshield_uploads_rejected_total{reason=invalid_fields}"] >= 8  # label + 7 subject tags
    assert before["emoshield_jobs{state=finished}"] == 2 and before["emoshield_jobs{state=running}"] == 0
    assert before["emoshield_bundles_published_total"] == 2 and before["emoshield_bundle_latest_version"] == 2
    assert before["emoshield_job_duration_seconds_count"] == 2 and before["emoshield_job_duration_seconds_sum"] > 0
    device_id = services["device"]["device_id"]
    assert before[f"emoshield_device_running_version{{device={device_id}}}"] == 2
    assert 0 <= before[f"emoshield_device_heartbeat_age_seconds{{device={device_id}}}"] < 600
    assert before["emoshield_devices_enrolled"] >= 2
    # a refused upload counts once, under its reason; latency is recorded per route template
    device = EdgeClient(edge, services["device"]["token"])
    with pytest.raises(ServiceError, match="415"):
        device.upload(b"GIF89a not a face", "happy")
    for _ in range(5):  # hostile paths: one 'unmatched' route, however many paths
        requests.get(edge + "/nope/\u00e9t\u00e9/" + "x" * 200, timeout=10)
    requests.get(edge + "/jobs/999999", headers={"Authorization": "Bearer admin-secret"}, timeout=10)
    after = _scrape(edge)
    assert after["emoshield_uploads_rejected_total{reason=not_an_image}"] == \
        before["emoshield_uploads_rejected_total{reason=not_an_image}"] + 1
    assert after["emoshield_uploads_total"] == before["emoshield_uploads_total"]
    unmatched = "emoshield_http_request_duration_seconds_count{method=GET,route=unmatched,status=404}"
    assert after[unmatched] >= before.get(unmatched, 0) + 5 and not any("nope" in k for k in after)
    assert after["emoshield_http_request_duration_seconds_count{method=GET,route=/jobs/{job_id},status=404}"] >= 1
    assert after["emoshield_http_request_duration_seconds_count{method=POST,route=/samples,status=415}"] >= 2
    requests.get(edge + "/health", timeout=10).raise_for_status()  # still serving


def test_device_keeps_serving_offline_when_the_edge_is_gone(services):
    args = services["device_args"]
    services["edge_proc"].terminate()
    services["edge_proc"].wait(timeout=30)
    proc = run(*args)
    assert "unreachable" in proc.stderr and "v2 verified" in proc.stderr



def test_slow_clients_are_closed_at_the_request_deadline_and_the_service_keeps_answering(tmp_path):
    """Slowloris: 80 clients each send a request's head (or a POST body) a byte at a time, against a
    service allowed 64 file descriptors. uvicorn alone bounds only the idle time between requests,
    so they would hold every descriptor and nobody else would get an answer; with the request
    deadline ($EMOSHIELD_REQUEST_DEADLINE, 1.5 s here) each is closed and /health answers."""
    import resource
    import socket

    (tmp_path / "library").mkdir()
    port = free_port()

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.Popen([sys.executable, "-m", "emoshield", "cloud", "serve", "--library", str(tmp_path / "library"),
                             "--port", str(port)], stdout=open(tmp_path / "cloud.log", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "EMOSHIELD_REQUEST_DEADLINE": "1.5"}, preexec_fn=few_descriptors)
    url = f"http://127.0.0.1:{port}"
    slow = []
    try:
        wait_healthy(url, proc, tmp_path / "cloud.log")
        for i in range(80):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 4 == 0:
                sock.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")  # a body to trickle
            elif i % 4 == 1:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # an unfinished head to trickle
            elif i % 4 == 2:  # a whole request, then a pipelined one whose body never comes
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            slow.append(sock)  # (i % 4 == 3: connected, sends nothing)
        started, closed = time.monotonic(), set()
        while time.monotonic() - started < 4.0 and len(closed) < len(slow):
            for k, sock in enumerate(slow):
                if k in closed:
                    continue
                try:
                    if k % 4 in (0, 1):
                        sock.sendall(b"x")
                    sock.setblocking(False)
                    try:
                        while sock.recv(65536):  # a pipelined client gets its first answer first
                            pass
                        closed.add(k)  # b"": the server closed it
                    except BlockingIOError:
                        pass
                    finally:
                        sock.setblocking(True)
                except OSError:  # reset or broken pipe: the server closed it
                    closed.add(k)
            time.sleep(0.2)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow clients still connected after 4 s"
        assert request("GET", url + "/health", timeout=5)["status"] == "ok" and proc.poll() is None
        fast = request("GET", url + "/backbones", timeout=5)  # a normal client is not cut: it sends at once
        assert fast == []
        # a keep-alive client whose second request starts 1 s after the first answer and takes 0.8 s
        # to send: its deadline counts from its own first byte, not from the previous answer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            answers = b""
            for pause, part in ((0, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"), (1.0, b"GET /health HTTP/1.1\r\n"),
                                (0.8, b"Host: x\r\n\r\n")):
                time.sleep(pause)
                sock.sendall(part)
                if part.endswith(b"\r\n\r\n"):
                    while answers.count(b"HTTP/1.1 200") < (2 if pause else 1) or not answers.endswith(b"}"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            break  # closed by the server
                        answers += chunk
            assert answers.count(b"HTTP/1.1 200") == 2
    finally:
        for sock in slow:
            sock.close()
        proc.terminate()
        proc.wait(timeout=30)
