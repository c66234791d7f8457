"""The device's frame gap while an update downloads and installs (issue 20): frames are
recognised on the main thread while `BackgroundUpdate` pulls bundle v2 through TUF (metadata,
download, hashes, install, int8 self-check) on its worker thread, as `emoshield device run`
does. The edge is a separate process serving a real TUF repository over HTTP
(`python -m http.server`), so its work does not share the device's interpreter.

Reported, side by side in one run: the interval between consecutive frames before the update
(median, p99, max) and while it runs (median, p99, max), the update's duration, and the frames
recognised during it. The device runs on one core (`taskset -c 0`, one onnxruntime and OpenCV
thread), like a camera.

    .venv/bin/python bench/update_gap.py --bundle runs/demo/edge/bundles/v1 --keys runs/demo/keys \
        --video runs/demo/faces.mp4          # (make demo leaves all three)

Writes bench/results/update_gap.json and the "update-gap" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, machine, record  # noqa: E402

sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stats_ms(intervals: list[float]) -> dict:
    return {"frames": len(intervals), "median_ms": statistics.median(intervals) * 1e3,
            "p99_ms": percentile(intervals, 0.99) * 1e3, "max_ms": max(intervals) * 1e3}


def device_side(args) -> dict:
    """Runs in the pinned child: the frame loop plus one background update."""
    import cv2

    from emoshield.device.recognizer import FrameAnalyzer, health_check
    from emoshield.device.run import open_frames
    from emoshield.device.store import BundleStore
    from emoshield.device import sync as sync_module
    from emoshield.device.sync import BackgroundUpdate, EdgeSync
    from emoshield.tiers.client import EdgeClient

    sync_module.UPDATE_NICENESS = args.niceness
    cv2.setNumThreads(1)
    work = Path(args.work)
    store = BundleStore(work / "store", work / "keys" / "public.key")
    store.install(work / "site" / "bundles" / "1")
    trust_root = (work / "site" / "tuf" / "1.root.json").read_bytes()
    sync = EdgeSync(store, EdgeClient(args.edge_url, "bench-device-token"), trust_root, lambda m: print(m, file=sys.stderr))
    update = BackgroundUpdate(sync, lambda folder: health_check(folder, "int8", 1))
    analyzer = FrameAnalyzer(health_check(store.current_dir(), "int8", 1))
    frames = []
    while len(frames) < args.frames:
        source, _ = open_frames(args.video)
        frames.extend(frame for _, _, frame in source)
    frames = frames[:args.frames]
    stamps, phase, window = [], [], [None, None]
    for index, frame in enumerate(frames):
        if index == args.warmup:
            window[0] = time.perf_counter()
            update.start()
        ready = update.take()
        if ready is not None:
            analyzer.classifier = ready
            window[1] = time.perf_counter()
        analyzer.analyze(index, 0.0, frame)
        stamps.append(time.perf_counter())
        phase.append("before" if window[0] is None else "during" if window[1] is None else "after")
    update.join()
    intervals = {"before": [], "during": [], "after": []}
    for i in range(1, len(stamps)):
        intervals[phase[i]].append(stamps[i] - stamps[i - 1])
    return {"installed": store.current_version(), "sync": sync.status.to_dict(),
            "update_seconds": (window[1] - window[0]) if window[1] else None,
            "before": stats_ms(intervals["before"]), "during": stats_ms(intervals["during"]) if intervals["during"] else None,
            "after": stats_ms(intervals["after"]) if intervals["after"] else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs/demo/edge/bundles/v1"))
    parser.add_argument("--keys", default=str(ROOT / "runs/demo/keys"))
    parser.add_argument("--video", default=str(ROOT / "runs/demo/faces.mp4"))
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--device-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--edge-url", help=argparse.SUPPRESS)
    parser.add_argument("--niceness", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device_child:
        print(json.dumps(device_side(args)))
        return 0

    from emoshield.tiers.bundle import MANIFEST, SIGNATURE, read_manifest, seal_bundle
    from emoshield.tiers.signing import load_private_key
    from emoshield.tiers.trust import TrustRepository

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(args.keys, work / "keys")
        trust = TrustRepository.init(work / "edge" / "trust", work / "offline-root.key")
        site = work / "site"
        (site / "bundles").mkdir(parents=True)
        for version in (1, 2):
            folder = site / "bundles" / str(version)
            shutil.copytree(args.bundle, folder)
            manifest = {k: v for k, v in read_manifest(folder).items() if k not in ("files", "format")}
            seal_bundle(folder, {**manifest, "version": version}, load_private_key(work / "keys" / "private.key"))
            trust.publish(version, folder, [MANIFEST, SIGNATURE, *read_manifest(folder)["files"]])
        shutil.copytree(trust.metadata_dir, site / "tuf")
        sizes = {name: (site / "bundles" / "2" / name).stat().st_size for name in ("model.int8.onnx", "model.onnx")}
        port = 8765 + os.getpid() % 1000
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = {}
        try:
            time.sleep(1.0)
            for niceness in (0, 10, 0, 10):  # interleaved: each setting twice, the second run kept
                shutil.rmtree(work / "store", ignore_errors=True)
                child = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--device-child", "--work",
                                        str(work), "--edge-url", f"http://127.0.0.1:{port}", "--video", args.video,
                                        "--frames", str(args.frames), "--warmup", str(args.warmup),
                                        "--niceness", str(niceness)],
                                       capture_output=True, text=True, check=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
                run = json.loads(child.stdout.strip().splitlines()[-1])
                assert run["installed"] == 2, (run, child.stderr)
                results[niceness] = run
        finally:
            server.terminate()
            server.wait(timeout=10)
    result = {"update_thread_niceness": {str(k): v for k, v in results.items()}}
    manifest = read_manifest(Path(args.bundle))
    result.update({"bundle": str(args.bundle), "backbone": manifest.get("backbone", {}).get("name"),
                   "input_size": manifest["preprocessing"]["input_size"], "video": str(args.video),
                   "downloaded_mb": round(sum(sizes.values()) / 1e6, 2), "machine": machine()})
    out = ROOT / "bench" / "results" / "update_gap.json"
    out.write_text(json.dumps(result, indent=1))
    rows = "\n".join(f"| {niceness} | {run['update_seconds']:.2f} | {phase} | {run[phase]['frames']} | "
                     f"{run[phase]['median_ms']:.1f} | {run[phase]['p99_ms']:.1f} | {run[phase]['max_ms']:.1f} |"
                     for niceness, run in results.items() for phase in ("before", "during", "after") if run[phase])
    default = results[10]
    markdown = f"""## Frame gap while an update downloads (`python bench/update_gap.py`)
Device on one core (`taskset -c 0`, 1 thread), default pipeline (Haar on every full 640x480 frame,
int8), {result['backbone']} {result['input_size']} px bundle, `make demo`'s video; the update (TUF
metadata, {result['downloaded_mb']} MB of ONNX from an HTTP server in another process,
hashes, install, one int8 self-check) runs on the device's worker thread, at the process's
priority (nice 0) or, as `device run` does, at nice 10 (Linux: one nice value per thread).
Two runs per setting, interleaved, the second kept. CPU: {result['machine']['cpu_isa']}.

| update thread nice | update (s) | frames | count | median interval (ms) | p99 (ms) | max (ms) |
|---:|---:|---|---:|---:|---:|---:|
{rows}
"""
    record("update-gap", {"update_frame_gap_max_ms": round(default["during"]["max_ms"], 1),
                          "update_frame_gap_median_ms_before": round(default["before"]["median_ms"], 1),
                          "update_seconds": round(default["update_seconds"], 2)}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
