"""The edge under hostile load (issue 20), side by side in one run against one real edge
process on 127.0.0.1:
  - GET /health latency (p50/p99) idle, then while 20 devices upload maximum-size images
    concurrently (each a 2 MB noise PNG that the edge must fully decode), then while they
    upload decompression bombs (1 Gpixel PNGs and 600-byte JPEGs declaring 32768 x 32768);
  - the edge's peak RSS (VmHWM) after each phase.

    .venv/bin/python bench/edge_hostile.py [--seconds 10] [--devices 20]

Writes bench/results/edge_hostile.json and the "edge_hostile" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import ROOT, machine, record  # noqa: E402

from emoshield.tiers.client import EdgeClient, ServiceError, request, wait_healthy  # noqa: E402
from tests.conftest import FIVE, free_port  # noqa: E402
from tests.test_hostile import _jpeg_declaring, _png  # noqa: E402

ADMIN = "bench-admin-token"


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def health_latencies(url: str, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        request("GET", url + "/health", timeout=30)
        out.append((time.perf_counter() - started) * 1e3)
        time.sleep(0.02)


def phase(url: str, clients: list, image: bytes, seconds: float) -> dict:
    stop, latencies, answers = threading.Event(), [], {}
    lock = threading.Lock()

    def upload(client):
        while not stop.is_set():
            try:
                client.upload(image, "happy")
                status = 200
            except ServiceError as exc:
                status = exc.status
            with lock:
                answers[status] = answers.get(status, 0) + 1

    threads = [threading.Thread(target=health_latencies, args=(url, stop, latencies))]
    threads += [threading.Thread(target=upload, args=(c,)) for c in clients] if image else []
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    q = statistics.quantiles(latencies, n=100)
    return {"health_p50_ms": statistics.median(latencies), "health_p99_ms": q[98], "health_requests": len(latencies),
            "upload_answers": {str(k): v for k, v in sorted(answers.items(), key=lambda kv: str(kv[0]))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "emoshield", "keys", "generate", "--out", tmp / "keys"], check=True,
                       capture_output=True)
        (tmp / "admin.token").write_text(ADMIN)
        subprocess.run([sys.executable, "-m", "emoshield", "trust", "init", "--edge-root", tmp / "edge", "--root-key",
                        tmp / "offline-root.key"], check=True, capture_output=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        edge = subprocess.Popen([sys.executable, "-m", "emoshield", "edge", "serve", "--root", str(tmp / "edge"),
                                 "--key", str(tmp / "keys" / "private.key"), "--cloud", "http://127.0.0.1:9",
                                 "--backbone", "none", "--classes", FIVE, "--admin-token-file", str(tmp / "admin.token"),
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, edge)
            clients = [EdgeClient(url, EdgeClient(url, ADMIN).enrol(f"cam-{i}")["token"]) for i in range(args.devices)]
            noise = np.random.default_rng(0).integers(0, 256, (810, 810, 3), dtype=np.uint8)
            big = cv2.imencode(".png", noise)[1].tobytes()
            assert len(big) <= 2_000_000, len(big)
            bomb = _png(32768, 32768, (b"\x00" * 4097) * 32768)
            results = {}
            for name, image in (("idle", None), ("max-size uploads", big), ("PNG bombs", bomb),
                                ("JPEG bombs", _jpeg_declaring(32768, 32768))):
                results[name] = {**phase(url, clients, image, args.seconds), "edge_peak_rss_mb": vm_hwm_mb(edge.pid)}
                print(name, results[name], flush=True)
        finally:
            edge.terminate()
            edge.wait(timeout=30)
    out = {"devices": args.devices, "seconds_per_phase": args.seconds, "max_size_png_bytes": len(big),
           "bomb_png_bytes": len(bomb), "phases": results, "machine": machine()}
    (ROOT / "bench" / "results" / "edge_hostile.json").write_text(json.dumps(out, indent=1))
    lines = [f"### The edge under hostile load (`python bench/edge_hostile.py`; CPU {out['machine']['cpu_isa']})", "",
             f"{args.devices} devices uploading concurrently for {args.seconds:g} s per phase against one edge "
             f"process on 127.0.0.1; GET /health polled every 20 ms beside them. Max-size upload: a "
             f"{len(big) / 1e6:.2f} MB noise PNG (810 x 810 RGB, decoded in full); PNG bomb: {len(bomb) / 1e3:.0f} kB, "
             "32768 x 32768 when decoded; JPEG bomb: under 1 kB declaring 32768 x 32768.", "",
             "| phase | /health p50 ms | /health p99 ms | upload answers | edge peak RSS MB |", "|---|---:|---:|---|---:|"]
    for name, r in results.items():
        answers = ", ".join(f"{k}: {v}" for k, v in r["upload_answers"].items()) or "-"
        lines.append(f"| {name} | {r['health_p50_ms']:.1f} | {r['health_p99_ms']:.1f} | {answers} | "
                     f"{r['edge_peak_rss_mb']:.0f} |")
    record("edge_hostile", {"edge_health_p99_ms_under_uploads": results["max-size uploads"]["health_p99_ms"],
                            "edge_peak_rss_mb_under_bombs": results["JPEG bombs"]["edge_peak_rss_mb"]}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
