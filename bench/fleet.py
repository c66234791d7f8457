"""A fleet on loopback (issue 7): one cloud, E edge nodes, D devices per edge, one Mosquitto.

Every edge trains a defended bundle from the cloud's backbone; we measure the time from each
edge's "job finished" to each of its devices serving the new version, then one edge publishes a
tampered bundle (manifest rewritten to v2, signature no longer matching) and we count the devices
that end up on it (must be 0).

Devices are threads in this process, each with its own MQTT connection, HTTP client, bundle store
and the real update path of `emoshield device run` (announcement -> fetch -> verify signature and
hashes -> onnxruntime health check -> install), without the camera loop.

    .venv/bin/python bench/fleet.py [--edges 4] [--devices 25] [--database sqlite|postgresql]

Writes bench/results.json keys fleet_* and the "fleet" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import record  # noqa: E402
from emoshield.tiers.bundle import MANIFEST  # noqa: E402
from emoshield.tiers.client import EdgeClient, request, wait_healthy  # noqa: E402
from emoshield.device.store import BundleStore  # noqa: E402
from emoshield.device.sync import EdgeSync  # noqa: E402
from emoshield.tiers.mqtt import DeviceLink, EdgeAnnouncer, start_mosquitto  # noqa: E402

FIVE = "happy,sad,surprise,disgust,fear"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADMIN = "fleet-admin-token"  # handed to the edges in their environment, never on a command line


def emoshield(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emoshield", *map(str, args)], check=True, capture_output=True,
                          text=True, **kwargs)


def serve(*args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emoshield", *map(str, args)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                           "OMP_NUM_THREADS": "1", "EMOSHIELD_ADMIN_TOKEN": ADMIN})


class SimDevice(threading.Thread):
    """One device's update loop: act on MQTT announcements (one try per announced version), send
    a heartbeat with the running version, record when each version started serving."""

    def __init__(self, edge_url: str, edge_name: str, broker: str, token: str, device_id: str, store: BundleStore,
                 trust_root: bytes):
        super().__init__(daemon=True)
        self.client, self.store = EdgeClient(edge_url, token), store
        self.sync = EdgeSync(store, self.client, trust_root, self.log)
        self.link = DeviceLink(broker, edge_name, device_id)
        self.installed: dict[int, float] = {}
        self.refused: list[str] = []
        self.stop = threading.Event()

    def log(self, message: str) -> None:
        if "refused" in message:
            self.refused.append(message)

    def run(self) -> None:
        self.link.start(wait=10)
        tried = 0
        while not self.stop.is_set():
            announced = self.link.announced or 0
            if announced > (self.store.current_version() or 0) and announced > tried:
                tried = announced
                version = self.sync.sync()
                if version is not None:
                    self.installed[version] = time.time()
                self.link.heartbeat({"version": self.store.current_version()})
            self.stop.wait(0.05)
        self.link.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--devices", type=int, default=25, help="devices per edge")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                        help="edges' metadata store (postgresql: one local server, a database per edge)")
    parser.add_argument("--data-root", default=os.environ.get("EMOSHIELD_DATA", "../shared/data"))
    parser.add_argument("--work", default="runs/fleet")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    devices: list[SimDevice] = []
    postgres = None
    try:
        emoshield("keys", "generate", "--out", work / "keys")
        emoshield("cloud", "add", "--library", work / "library", "--name", "smallcnn-fleet", "--backbone",
                  "smallcnn", "--weights", "scratch", "--input-size", "32")
        broker_port = free_port()
        (work / "mqtt").mkdir()
        procs.append(start_mosquitto(broker_port, work / "mqtt"))
        broker = f"127.0.0.1:{broker_port}"
        databases = [[] for _ in range(args.edges)]
        if args.database == "postgresql":
            from sqlalchemy import create_engine, text

            from emoshield.tiers.postgres import start_postgres

            postgres, url = start_postgres(free_port())
            engine = create_engine(url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                for i in range(args.edges):
                    conn.execute(text(f"CREATE DATABASE edge{i}"))
            engine.dispose()
            databases = [["--database", url.rsplit("/", 1)[0] + f"/edge{i}"] for i in range(args.edges)]
        cloud_port = free_port()
        procs.append(serve("cloud", "serve", "--library", work / "library", "--port", cloud_port,
                           log=work / "cloud.log"))
        cloud = f"http://127.0.0.1:{cloud_port}"
        wait_healthy(cloud)
        edges = []
        for i in range(args.edges):
            port = free_port()
            emoshield("trust", "init", "--edge-root", work / f"edge{i}", "--root-key", work / f"edge{i}-root.key")
            procs.append(serve("edge", "serve", "--root", work / f"edge{i}", "--name", f"edge{i}", "--key",
                               work / "keys" / "private.key", "--cloud", cloud, "--backbone", "smallcnn-fleet",
                               "--classes", FIVE, "--epochs", "1", "--input-size", "32",
                               "--batch-size", "16", "--mqtt", broker, "--port", port, *databases[i],
                               log=work / f"edge{i}.log"))
            edges.append({"name": f"edge{i}", "url": f"http://127.0.0.1:{port}", "db": databases[i]})
        for edge in edges:
            wait_healthy(edge["url"])
            uploader = EdgeClient(edge["url"], ADMIN).enrol("uploader")
            emoshield("edge", "upload", "--dataset", "ckplus48", "--data-root", args.data_root, "--classes", FIVE,
                      "--protocol", "subject", "--per-class", "4", "--edge", edge["url"],
                      env={**os.environ, "EMOSHIELD_DEVICE_TOKEN": uploader["token"]})
        started = time.time()
        for edge in edges:
            for k in range(args.devices):
                enrolled = EdgeClient(edge["url"], ADMIN).enrol(f"camera-{k}")
                store = BundleStore(work / "devices" / edge["name"] / enrolled["device_id"], work / "keys" / "public.key")
                trust_root = (work / edge["name"] / "trust" / "metadata" / "1.root.json").read_bytes()
                device = SimDevice(edge["url"], edge["name"], broker, enrolled["token"], enrolled["device_id"], store,
                                   trust_root)
                device.edge = edge["name"]
                devices.append(device)
                device.start()
        print(f"{len(devices)} devices connected in {time.time() - started:.1f} s", flush=True)

        # phase 1: every edge trains and publishes v1; every device must end up serving it
        jobs = {e["name"]: request("POST", e["url"] + "/jobs", ADMIN)["job_id"] for e in edges}
        finished: dict[str, float] = {}
        deadline = time.time() + args.timeout
        while len(finished) < len(edges) and time.time() < deadline:
            for e in edges:
                job = request("GET", f"{e['url']}/jobs/{jobs[e['name']]}", ADMIN)
                if job["status"] == "failed":
                    raise SystemExit(f"{e['name']} job failed: {job.get('error')}")
                if job["status"] == "finished":
                    finished[e["name"]] = job["finished"]
            time.sleep(0.5)
        while time.time() < deadline and not all(1 in d.installed for d in devices):
            time.sleep(0.2)
        latencies = [d.installed[1] - finished[d.edge] for d in devices if 1 in d.installed]
        serving = sum(1 in d.installed for d in devices)
        time.sleep(2)  # last heartbeats
        seen = sum(r["running_version"] == 1 for e in edges for r in request("GET", e["url"] + "/devices", ADMIN)
                   if r["name"].startswith("camera-"))
        print(f"v1: {serving}/{len(devices)} devices serving; job finished -> device serving: median "
              f"{statistics.median(latencies):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, last "
              f"{max(latencies):.2f} s; edges see {seen} devices on v1 in heartbeats", flush=True)

        # phase 2: the last edge publishes a tampered v2 (manifest version rewritten, signature stale)
        bad = edges[-1]
        root = work / bad["name"]
        source, target = root / "bundles" / "v1", root / "bundles" / "v2"
        shutil.copytree(source, target)
        manifest = json.loads((target / MANIFEST).read_text())
        manifest["version"] = 2
        (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
        from emoshield.tiers.store import EdgeStore

        EdgeStore(root, bad["db"][1] if bad["db"] else None).add_bundle(2, None)
        announcer = EdgeAnnouncer(broker, bad["name"], lambda *_: None)
        announcer.start()
        announcer.announce(2, manifest)
        victims = [d for d in devices if d.edge == bad["name"]]
        deadline = time.time() + 60
        while time.time() < deadline and not all(d.refused for d in victims):
            time.sleep(0.2)
        announcer.stop()
        on_bad = sum(d.store.current_version() == 2 for d in devices)
        refused = sum(bool(d.refused) for d in victims)
        still_v1 = sum(d.store.current_version() == 1 for d in devices)
        print(f"tampered v2 on {bad['name']}: {refused}/{len(victims)} devices refused it, {on_bad} installed it; "
              f"{still_v1}/{len(devices)} devices serve the verified v1", flush=True)
        reason = victims[0].refused[0].split(": ", 2)[-1][:120] if victims and victims[0].refused else "-"
    finally:
        for d in devices:
            d.stop.set()
        for d in devices:
            d.join(timeout=5)
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if postgres is not None:
            from emoshield.tiers.postgres import stop_postgres

            stop_postgres(postgres)
    keys = {"fleet_devices": len(devices), "fleet_serving_v1": serving,
            "fleet_update_median_s": round(statistics.median(latencies), 3),
            "fleet_update_p95_s": round(percentile(latencies, 0.95), 3),
            "fleet_update_last_s": round(max(latencies), 3),
            "fleet_tampered_installed": on_bad, "fleet_tampered_refused": refused}
    markdown = "\n".join([
        f"`python bench/fleet.py --edges {args.edges} --devices {args.devices} --database {args.database}`: "
        f"1 cloud, {args.edges} edge nodes ({args.database} metadata), {args.devices} devices each "
        f"({len(devices)} in all, threads with their own MQTT connection, HTTP client and bundle store, running "
        "the device's real update path: announcement -> fetch -> signature/hash verification -> onnxruntime "
        "health check -> install), one Mosquitto, all on 127.0.0.1. Every edge trains a defended smallcnn "
        "(32 px, 1 epoch) at the same time; times are from the edge's \"job finished\" to the device serving it.", "",
        "| figure | value |", "|---|---:|",
        f"| devices serving the new v1 | {serving}/{len(devices)} |",
        f"| job finished -> device serving, median | {statistics.median(latencies):.2f} s |",
        f"| ... p95 | {percentile(latencies, 0.95):.2f} s |",
        f"| ... last device (\"job finished\" to \"last device serving\") | {max(latencies):.2f} s |",
        f"| edges seeing v1 in device heartbeats | {seen}/{len(devices)} |",
        f"| tampered v2 from {bad['name']}: devices that refused it | {refused}/{len(victims)} |",
        f"| devices left on the tampered bundle | **{on_bad}** |", "",
        f"Refusal reason logged by the devices: `{reason}`."])
    record("fleet", keys, markdown)
    print(markdown)
    return 0 if on_bad == 0 and serving == len(devices) else 1


if __name__ == "__main__":
    sys.exit(main())
