"""`make demo`: the three tiers on loopback, on real faces.

cloud (model library service) + MQTT broker (Mosquitto) -> edge node (enrol a device, upload CK+48 training faces,
defended training on a backbone fetched from the cloud and verified by hash, signed
bundle) -> device (pulls, verifies and installs the bundle, recognises emotions on a
video built from real test faces, torch-free, heartbeats over MQTT) -> robustness table of the edge's model.
Every process it starts is stopped at the end, unless --keep: then the services stay up, a device
replays the video in a loop at its frame rate (live emotions on the dashboard), and the demo waits
for Ctrl-C. The edge's dashboard URL and its admin token are printed as soon as the edge is up.
Work folder: runs/demo (replaced each run).

    .venv/bin/python scripts/demo.py [--data-root DIR] [--epochs 8] [--input-size 48] [--keep] [--port PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from emoshield.errors import EmoshieldError
from emoshield.tiers.client import wait_healthy
from emoshield.tiers.mqtt import start_mosquitto

FIVE = "happy,sad,surprise,disgust,fear"
ADMIN = "demo-admin-token"


def emoshield(*args, capture: bool = False) -> subprocess.CompletedProcess:
    print("$ emoshield " + " ".join(map(str, args)), flush=True)
    return subprocess.run([sys.executable, "-m", "emoshield", *map(str, args)], check=True, text=True,
                          capture_output=capture)


def token_file(path: Path, token: str) -> Path:
    """Tokens live in 0600 files (or environment variables), never on command lines."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EMOSHIELD_DATA") or "../shared/data")
    parser.add_argument("--work", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--keep", action="store_true",
                        help="keep the services (and a looping device) up after the demo, until Ctrl-C")
    parser.add_argument("--port", type=int, default=0, help="the edge's port (default: a free one)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    procs: list[subprocess.Popen] = []
    try:
        print("\n== cloud: model library ==", flush=True)
        emoshield("keys", "generate", "--out", work / "keys")
        admin = token_file(work / "admin.token", ADMIN)
        emoshield("cloud", "add", "--library", work / "library", "--name", "mobilenet_v2-imagenet",
                  "--backbone", "mobilenet_v2", "--weights", "imagenet", "--input-size", args.input_size)
        cloud_url, edge_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{args.port or free_port()}"
        procs.append(subprocess.Popen([sys.executable, "-m", "emoshield", "cloud", "serve", "--library",
                                       str(work / "library"), "--port", cloud_url.rsplit(":", 1)[1]],
                                      stdout=open(work / "cloud.log", "w"), stderr=subprocess.STDOUT))
        wait_healthy(cloud_url, procs[-1])
        print(f"cloud serving on {cloud_url}", flush=True)

        print("\n== MQTT broker ==", flush=True)
        mqtt = []
        try:
            broker = f"127.0.0.1:{free_port()}"
            procs.append(start_mosquitto(int(broker.rsplit(":", 1)[1]), work))
            mqtt = ["--mqtt", broker]
            print(f"mosquitto on {broker}: the edge announces bundles there, devices send heartbeats", flush=True)
        except EmoshieldError as exc:
            print(f"no MQTT ({exc}); devices poll the edge over HTTP", flush=True)

        print("\n== edge node ==", flush=True)
        # the update repository's root key stays outside the edge's folder (offline in real life)
        emoshield("trust", "init", "--edge-root", work / "edge", "--root-key", work / "offline" / "root.key")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "emoshield", "edge", "serve", "--root", str(work / "edge"), "--key",
             str(work / "keys" / "private.key"), "--cloud", cloud_url, "--backbone", "mobilenet_v2-imagenet",
             "--classes", FIVE, "--admin-token-file", str(admin), "--name", "demo-edge", "--epochs", str(args.epochs),
             "--input-size",
             str(args.input_size), *mqtt, "--port", edge_url.rsplit(":", 1)[1]],
            stdout=open(work / "edge.log", "w"), stderr=subprocess.STDOUT))
        wait_healthy(edge_url, procs[-1])
        print(f"edge serving on {edge_url}\n  dashboard: {edge_url}/ (log in with the admin token "
              f"{ADMIN!r}, also in {admin})", flush=True)
        device = json.loads(emoshield("edge", "enrol", "--edge", edge_url, "--admin-token-file", admin, "--name",
                                      "camera-1", capture=True).stdout)
        print(f"enrolled device {device['device_id']}", flush=True)
        emoshield("edge", "upload", "--dataset", "ckplus48", "--data-root", args.data_root, "--classes", FIVE,
                  "--protocol", "subject", "--fold", "0", "--part", "train", "--edge", edge_url,
                  "--token-file", token_file(work / "device.token", device["token"]))
        job = json.loads(emoshield("edge", "job", "--edge", edge_url, "--admin-token-file", admin, "--wait",
                                   capture=True).stdout)
        print(f"job {job['id']} {job['status']}: bundle v{job['version']}, {job['metrics']}", flush=True)
        held_out = ("people held out of training (subject-tagged uploads)" if job["metrics"].get("protocol") == "subject"
                    else "random held-out faces of the same people (untagged uploads)")

        print("\n== device ==", flush=True)
        run_dir = work / "edge" / "jobs" / str(job["id"]) / "run"
        video = work / "faces.mp4"
        emoshield("data", "video", "--model", run_dir, "--per-class", "4", "--hold", "10", "--out", video)
        emoshield("device", "run", "--edge", edge_url, "--token-file", work / "device.token", "--pubkey",
                  work / "keys" / "public.key", "--trust-root", work / "edge" / "trust" / "metadata" / "1.root.json",
                  "--store", work / "device", "--source", video, "--smooth", "0.5",
                  "--jsonl", work / "device.jsonl", "--truth",
                  f"{video}.labels.json", "--heartbeat", "2", "--summary", work / "device-summary.json")
        # the annotated video is drawn afterwards from the JSON lines: the device carries no encoder
        emoshield("device", "annotate", "--source", video, "--jsonl", work / "device.jsonl",
                  "--out", work / "annotated.mp4")
        summary = json.loads((work / "device-summary.json").read_text())
        print(f"edge's test accuracy on {held_out}: {job['metrics']['test_accuracy']:.1%}; the device measured "
              f"{summary['accuracy_all_frames']:.1%} on the video of those faces ({summary['fps']:.0f} FPS, "
              f"peak RSS {summary['peak_rss_mb']:.0f} MB)", flush=True)
        if mqtt:
            from emoshield.tiers.client import request

            time.sleep(0.5)  # the last heartbeat is on its way through the broker
            row = [d for d in request("GET", edge_url + "/devices", ADMIN) if d["id"] == device["device_id"]][0]
            print(f"edge sees {row['name']} ({row['id']}) running bundle v{row['running_version']} via MQTT "
                  f"heartbeats: {row['telemetry']}", flush=True)
        lines = (work / "device.jsonl").read_text().splitlines()
        print("per-frame emotions (every 10th frame):")
        for line in lines[::10]:
            r = json.loads(line)
            print(f"  frame {r['frame']:>3}  t={r['time']:5.2f}s  {r['label'] or 'no face':<9} "
                  f"box={r['box']}  bundle v{r['bundle_version']}")

        print("\n== robustness of the edge's defended model ==", flush=True)
        emoshield("evaluate", "--model", run_dir, "--attacks", "fgsm,rfgsm,pgd", "--eps", "0.005,0.01,0.015",
                  "--out", work / "robustness")
        if args.keep:
            keep_running(procs, work, edge_url, admin, video)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is in {work}/ "
          "(all services stopped)")
    return 0


def keep_running(procs: list[subprocess.Popen], work: Path, edge_url: str, admin: Path, video: Path) -> None:
    """--keep: a device replaying the video at its frame rate (heartbeats every 2 s: the dashboard's
    live timeline), the services up, until Ctrl-C or SIGTERM."""
    import signal

    procs.append(subprocess.Popen(
        [sys.executable, "-m", "emoshield", "device", "run", "--edge", edge_url, "--token-file",
         str(work / "device.token"), "--pubkey", str(work / "keys" / "public.key"), "--trust-root",
         str(work / "edge" / "trust" / "metadata" / "1.root.json"), "--store", str(work / "device"),
         "--source", str(video), "--loop", "--realtime", "--smooth", "0.5", "--heartbeat", "2",
         "--jsonl", str(work / "device-live.jsonl")],
        stdout=open(work / "device-live.log", "w"), stderr=subprocess.STDOUT))
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    print(f"\n== kept running (--keep) ==\n  dashboard: {edge_url}/  (admin token in {admin})\n"
          f"  a device replays {video.name} in a loop; Ctrl-C stops everything", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        print(f"a service exited; stopping the others (logs in {work}/)", flush=True)
    except KeyboardInterrupt:
        print("\nstopping the services", flush=True)


if __name__ == "__main__":
    sys.exit(main())
