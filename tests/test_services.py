"""Cloud and edge as real processes on 127.0.0.1 (free ports): enrol devices, upload real
faces, train a defended model from a cloud backbone verified by hash, publish a signed
bundle, and a device pulls, verifies, installs and runs it, then goes on offline."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emoshield.tiers.client import EdgeClient, ServiceError, request
from tests.conftest import FIVE
from tests.test_cli import run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emoshield", *map(str, args)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


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


@pytest.fixture(scope="module")
def services(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("services")
    run("keys", "generate", "--out", tmp / "keys")
    run("cloud", "add", "--library", tmp / "library", "--name", "smallcnn-test", "--backbone", "smallcnn",
        "--weights", "scratch", "--input-size", "32")
    cloud_port, edge_port = free_port(), free_port()
    procs = []
    try:
        cloud = start("cloud", "serve", "--library", tmp / "library", "--port", cloud_port, log=tmp / "cloud.log")
        procs.append(cloud)
        cloud_url = f"http://127.0.0.1:{cloud_port}"
        wait_healthy(cloud_url, cloud, tmp / "cloud.log")
        edge = start("edge", "serve", "--root", tmp / "edge", "--key", tmp / "keys" / "private.key", "--cloud",
                     cloud_url, "--backbone", "smallcnn-test", "--classes", FIVE, "--admin-token", "admin-secret",
                     "--epochs", "2", "--input-size", "32", "--batch-size", "16", "--max-upload-bytes", "200000",
                     "--port", edge_port, log=tmp / "edge.log")
        procs.append(edge)
        edge_url = f"http://127.0.0.1:{edge_port}"
        wait_healthy(edge_url, edge, tmp / "edge.log")
        yield {"tmp": tmp, "cloud": cloud_url, "edge": edge_url, "edge_proc": edge, "data_root": data_root}
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
    with pytest.raises(ServiceError, match="401"):
        request("GET", edge + "/samples")
    # each device sees only its own samples
    proc = run("edge", "upload", "--dataset", "ckplus48", "--data-root", services["data_root"], "--classes", FIVE,
               "--protocol", "subject", "--per-class", "5", "--edge", edge, "--token", a["token"])
    assert "uploaded 25 train faces" in proc.stdout
    assert len(EdgeClient(edge, a["token"]).call("GET", "/samples")) == 25
    assert len(device_b.call("GET", "/samples")) == 1
    assert not list((services["tmp"] / "edge").rglob("passwd"))
    services["device"] = a


def cv2_png(data_root) -> bytes:
    path = sorted((Path(data_root) / "ckplus48" / "happy").iterdir())[0]
    return path.read_bytes()


def test_job_publishes_a_signed_bundle_that_a_device_pulls_and_runs_offline(services):
    edge, tmp = services["edge"], services["tmp"]
    device = services.get("device") or EdgeClient(edge, "admin-secret").enrol("camera-c")
    assert EdgeClient(edge, device["token"]).latest_bundle() is None
    proc = run("edge", "job", "--edge", edge, "--admin-token", "admin-secret", "--wait", "--timeout", "400")
    job = json.loads(proc.stdout)
    assert job["status"] == "finished" and job["version"] == 1 and job["samples"] >= 10
    log = request("GET", f"{edge}/jobs/{job['id']}/log", "admin-secret", raw=True).decode()
    assert "verified" in log and "published bundle v1" in log
    latest = EdgeClient(edge, device["token"]).latest_bundle()
    assert latest["version"] == 1 and latest["manifest"]["name"] == "edge"

    frames = tmp / "frames"
    frames.mkdir()
    for path in sorted((Path(services["data_root"]) / "jaffe").iterdir())[:3]:
        shutil.copyfile(path, frames / path.name)
    args = ["device", "run", "--edge", edge, "--token", device["token"], "--pubkey", tmp / "keys" / "public.key",
            "--store", tmp / "device", "--source", frames, "--jsonl", tmp / "out.jsonl"]
    proc = run(*args)
    assert "installed bundle v1" in proc.stderr and "FPS" in proc.stderr
    assert json.loads((tmp / "device" / "state.json").read_text())["current"] == 1
    lines = [json.loads(x) for x in (tmp / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(r["bundle_version"] == 1 for r in lines)
    assert sum(r["box"] is not None for r in lines) >= 2  # JAFFE faces are found

    # the edge goes away: the device keeps serving with its last good bundle
    services["edge_proc"].terminate()
    services["edge_proc"].wait(timeout=30)
    proc = run(*args)
    assert "unreachable" in proc.stderr and "v1 verified" in proc.stderr
