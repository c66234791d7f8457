"""Device path cost (issue 6c), side by side in one run: per-face latency at batch 1 on one
thread for torch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 (interleaved repeats,
medians); then the whole `emoshield device run` pipeline (decode + detect + classify) pinned
to one core with `taskset -c 0` on a 640x480 video of real test faces, for several
detection settings, with peak RSS, accuracy against the per-frame ground truth, and the
agreement of boxes and labels with detecting on every full-size frame.

    .venv/bin/python bench/device.py --model runs/defense_ckplus48/subject-defended-evalbn \
        [--work runs/bench_device] [--repeats 7] [--video-repeats 3]

Writes bench/results/device.json, the headline keys in bench/results.json
(int8_latency_vs_eager, video_fps, device_peak_rss_mb) and the "device" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, machine, record  # noqa: E402

# (detect_every, detect_width): the first is the reference the others are compared with
SETTINGS = [(1, 0), (1, 320), (5, 320), (10, 320)]
FAST = (5, 320)  # the recommended fast setting whose FPS is the headline `video_fps`


def emoshield(*args) -> None:
    subprocess.run([sys.executable, "-m", "emoshield", *map(str, args)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def latency(model_dir: Path, bundle: Path, repeats: int, iterations: int) -> dict:
    import torch

    from emoshield.models import load_model
    from emoshield.tiers.export import onnx_session

    torch.set_num_threads(1)
    model = load_model(model_dir).eval()
    size = int(json.loads((bundle / "manifest.json").read_text())["preprocessing"]["input_size"])
    face = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    tensor = torch.from_numpy(face)
    fp32, int8 = onnx_session(bundle / "model.onnx", 1), onnx_session(bundle / "model.int8.onnx", 1)

    def eager():
        with torch.inference_mode():
            model(tensor)

    runners = {"torch eager fp32": eager, "onnxruntime fp32": lambda: fp32.run(None, {"image": face}),
               "onnxruntime int8": lambda: int8.run(None, {"image": face})}
    for run in runners.values():  # warm-up
        for _ in range(20):
            run()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():  # interleaved: drift hits all alike
            started = time.perf_counter()
            for _ in range(iterations):
                run()
            times[name].append((time.perf_counter() - started) / iterations * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"input_size": size, "iterations": iterations, "repeats": repeats, "median_ms": ms,
            "vs_eager": {name: m / ms["torch eager fp32"] for name, m in ms.items()}}


def _iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def pipeline(bundle: Path, pubkey: Path, video: Path, work: Path, repeats: int) -> list[dict]:
    runs = {s: [] for s in SETTINGS}
    for _ in range(repeats):
        for every, width in SETTINGS:  # interleaved
            name = f"every{every}-w{width}"
            subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "emoshield", "device", "run", "--bundle",
                            bundle, "--pubkey", pubkey, "--source", video, "--threads", "1", "--detect-every",
                            str(every), "--detect-width", str(width), "--truth", f"{video}.labels.json",
                            "--jsonl", work / f"{name}.jsonl", "--summary", work / f"{name}.json"],
                           check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
            runs[(every, width)].append(json.loads((work / f"{name}.json").read_text()))
    frames = {s: [json.loads(x) for x in (work / f"every{s[0]}-w{s[1]}.jsonl").read_text().splitlines()]
              for s in SETTINGS}
    reference = frames[SETTINGS[0]]
    rows = []
    for setting in SETTINGS:
        both = [(r, o) for r, o in zip(reference, frames[setting]) if r["box"] and o["box"]]
        summaries = runs[setting]
        rows.append({
            "detect_every": setting[0], "detect_width": setting[1], "frames": summaries[-1]["frames"],
            "fps": statistics.median(s["fps"] for s in summaries),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries),
            "accuracy_on_detected": summaries[-1]["accuracy_on_detected"],
            "accuracy_all_frames": summaries[-1]["accuracy_all_frames"],
            "detection_rate": summaries[-1]["detection_rate"],
            "box_iou_vs_reference": float(np.mean([_iou(r["box"], o["box"]) for r, o in both])) if both else None,
            "label_agreement_vs_reference": float(np.mean([r["label"] == o["label"]
                                                           for r, o in zip(reference, frames[setting])])),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training output folder (emoshield train --out)")
    parser.add_argument("--work", default="runs/bench_device")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--video-repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir, work = Path(args.model).resolve(), (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundle, pubkey, video = work / "bundle", work / "keys" / "public.key", work / "faces.mp4"
    if not (work / "keys" / "private.key").is_file():
        emoshield("keys", "generate", "--out", work / "keys")
    if not (bundle / "manifest.json").is_file():
        emoshield("bundle", "export", "--model", model_dir, "--key", work / "keys" / "private.key", "--out", bundle)
    if not video.is_file():
        emoshield("data", "video", "--model", model_dir, "--per-class", "4", "--hold", "15", "--out", video)

    lat = latency(model_dir, bundle, args.repeats, args.iterations)
    rows = pipeline(bundle, pubkey, video, work, args.video_repeats)
    manifest = json.loads((bundle / "manifest.json").read_text())
    fast = next(r for r in rows if (r["detect_every"], r["detect_width"]) == FAST)
    result = {"model": str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir),
              "backbone": manifest["backbone"]["name"], "training": manifest["training"],
              "machine": machine(), "latency": lat, "pipeline": rows, "video": video.name}
    out = ROOT / "bench" / "results" / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    ms, vs = lat["median_ms"], lat["vs_eager"]
    md = [f"## Device path (`python bench/device.py --model {result['model']}`)", "",
          f"Per-face latency, batch 1, 1 thread, {lat['input_size']} px, median of {lat['repeats']} interleaved "
          f"runs of {lat['iterations']} faces (CPU {result['machine']['cpu_isa']}, {result['machine']['cpus']} cores; torch "
          f"{result['machine'].get('torch')}, onnxruntime {result['machine'].get('onnxruntime')}):", "",
          "| runtime | ms / face | x eager |", "|---|---:|---:|"]
    md += [f"| {name} | {ms[name]:.3f} | {vs[name]:.2f} |" for name in ms]
    md += ["", f"`emoshield device run` (decode + Haar detection + crop + int8 classify + JSON line) on a 640x480 "
               f"video of {rows[0]['frames']} frames (4 test faces per class of the model's split, 15 frames each; "
               f"`emoshield data video`), {manifest['backbone']['name']} {lat['input_size']} px, "
               f"{manifest['quantization']['weights']} int8 weights, CPU {result['machine']['cpu_isa']}, pinned to one core "
               f"(`taskset -c 0`, `--threads 1`), median FPS of {args.video_repeats} interleaved runs; box and label "
               "agreement are against detecting on every full-size frame:", "",
           "| detect every | detect width | FPS | peak RSS MB | accuracy (frames with a face) | box IoU vs ref | "
           "label agreement |", "|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['detect_every']} | {r['detect_width'] or 'full'} | {r['fps']:.1f} | {r['peak_rss_mb']:.0f} | "
           f"{r['accuracy_on_detected']:.1%} | {r['box_iou_vs_reference']:.3f} | "
           f"{r['label_agreement_vs_reference']:.1%} |" for r in rows]
    record("device", {"int8_latency_vs_eager": vs["onnxruntime int8"],
                      "int8_latency_vs_onnxruntime_fp32": ms["onnxruntime int8"] / ms["onnxruntime fp32"],
                      "video_fps": fast["fps"], "video_fps_detect_every_frame": rows[0]["fps"],
                      "device_peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
