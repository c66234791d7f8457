"""Device path cost (issues 6c and 16), side by side in one run: per-face latency at batch 1 on
one thread for torch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 (interleaved repeats,
medians) and what the int8 self-check adds to loading a bundle; then the whole `emoshield
device run` pipeline (decode + detect + track + classify) pinned to one core with `taskset -c
0` on a 640x480 video of real test faces: the default (no tuning flags) against detecting on
every full-size frame, with peak RSS, accuracy against the per-frame ground truth and the
agreement of boxes and labels; and the cost of each extra face in the frame (videos with 1, 2
and 3 faces side by side); and what test-time augmentation costs (`--tta flip`: each face and its
mirror image; `--tta tencrop`: ten views; against none, interleaved; `--only tta` runs this part alone). Every row names the
CPU's instruction set.

    .venv/bin/python bench/device.py --model runs/defense_ckplus48/subject-defended-evalbn \
        [--work runs/bench_device] [--repeats 7] [--video-repeats 3] [--only tta]

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

from emoshield.data.faces import box_iou  # noqa: E402
from emoshield.views import TTA_MODES  # noqa: E402

# (detect_every, detect_width): the first is the reference the others are compared with
SETTINGS = [(1, 0), (1, 320), (0, 320)]
DEFAULT = (0, 320)  # `emoshield device run` with no tuning flags: its FPS is the headline `video_fps`
FACES = (1, 2, 3)  # faces per frame in the multi-face videos
MULTI_FACE_PX = 120  # three 120 px faces fit side by side in 640 px


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


def device_run(bundle: Path, pubkey: Path, video: Path, out: Path, every: int, width: int, tta: str = "none") -> dict:
    subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "emoshield", "device", "run", "--bundle",
                    bundle, "--pubkey", pubkey, "--source", video, "--threads", "1", "--detect-every",
                    str(every), "--detect-width", str(width), "--truth", f"{video}.labels.json", "--tta", tta,
                    "--jsonl", out.with_suffix(".jsonl"), "--summary", out],
                   check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pipeline(bundle: Path, pubkey: Path, video: Path, work: Path, repeats: int) -> list[dict]:
    runs = {s: [] for s in SETTINGS}
    for _ in range(repeats):
        for every, width in SETTINGS:  # interleaved
            runs[(every, width)].append(device_run(bundle, pubkey, video, work / f"every{every}-w{width}.json",
                                                   every, width))
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
            "detections": summaries[-1]["detections"],
            "accuracy_on_detected": summaries[-1]["accuracy_on_detected"],
            "accuracy_all_frames": summaries[-1]["accuracy_all_frames"],
            "detection_rate": summaries[-1]["detection_rate"],
            "box_iou_vs_reference": float(np.mean([box_iou(r["box"], o["box"]) for r, o in both])) if both else None,
            "label_agreement_vs_reference": float(np.mean([r["label"] == o["label"]
                                                           for r, o in zip(reference, frames[setting])])),
        })
    return rows


def tta_cost(bundle: Path, pubkey: Path, video: Path, work: Path, repeats: int) -> list[dict]:
    """The default pipeline with each `--tta` mode, interleaved: FPS, ms per frame, accuracy."""
    runs = {mode: [] for mode in TTA_MODES}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(device_run(bundle, pubkey, video, work / f"tta-{mode}.json", *DEFAULT, tta=mode))
    rows = [{"tta": mode, "fps": statistics.median(s["fps"] for s in summaries),
             "ms_per_frame": statistics.median(1e3 / s["fps"] for s in summaries),
             "accuracy_all_frames": summaries[-1]["accuracy_all_frames"],
             "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries)} for mode, summaries in runs.items()]
    for row in rows[1:]:
        row["ms_per_frame_vs_none"] = row["ms_per_frame"] / rows[0]["ms_per_frame"]
    return rows


def tta_markdown(rows: list[dict], isa: str, frames: int, repeats: int) -> list[str]:
    return ["", f"Test-time augmentation (`--tta flip`: every face and its mirror in one batch; `--tta tencrop`: "
                f"5 crops of 90% of the face and their mirrors; probabilities averaged), the default pipeline on the same {frames}-frame video, one core, median of {repeats} "
                "interleaved runs:", "",
            "| CPU | tta | FPS | ms / frame | x none | accuracy (all frames) | peak RSS MB |",
            "|---|---|---:|---:|---:|---:|---:|"] + [
        f"| {isa} | {r['tta']} | {r['fps']:.1f} | {r['ms_per_frame']:.2f} | {r.get('ms_per_frame_vs_none', 1.0):.2f} | "
        f"{r['accuracy_all_frames']:.1%} | {r['peak_rss_mb']:.0f} |" for r in rows]


def multi_face(bundle: Path, pubkey: Path, videos: dict[int, Path], work: Path, repeats: int) -> list[dict]:
    """The default pipeline on videos with 1, 2, 3 faces per frame: ms per frame and per extra face."""
    runs = {k: [] for k in videos}
    for _ in range(repeats):
        for k, video in videos.items():
            runs[k].append(device_run(bundle, pubkey, video, work / f"faces{k}.json", *DEFAULT))
    rows = []
    for k, summaries in runs.items():
        ms = statistics.median(1e3 / s["fps"] for s in summaries)
        rows.append({"faces_per_frame": k, "fps": statistics.median(s["fps"] for s in summaries),
                     "ms_per_frame": ms, "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries),
                     "face_detection_rate": summaries[-1].get("face_detection_rate"),
                     "face_accuracy_on_detected": summaries[-1].get("face_accuracy_on_detected"),
                     "track_switches": summaries[-1].get("track_switches")})
    one = rows[0]["ms_per_frame"]
    for row in rows[1:]:
        row["ms_per_extra_face"] = (row["ms_per_frame"] - one) / (row["faces_per_frame"] - 1)
    return rows


def self_check_cost(bundle: Path, repeats: int) -> dict:
    """Loading the bundle's int8 model with and without the self-check, interleaved (medians)."""
    from report import interleaved_medians

    from emoshield.device.recognizer import EmotionClassifier, load_classifier

    runners = {"load int8": lambda: EmotionClassifier(bundle, "int8"), "load int8 + self-check": lambda: load_classifier(bundle)}
    for run in runners.values():
        run()
    seconds = interleaved_medians(runners, repeats)
    check = load_classifier(bundle).check
    return {"ms": {k: v * 1e3 for k, v in seconds.items()},
            "self_check_ms": (seconds["load int8 + self-check"] - seconds["load int8"]) * 1e3,
            "probes": check.probes, "agreement": check.agreement, "precision": check.precision}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training output folder (emoshield train --out)")
    parser.add_argument("--work", default="runs/bench_device")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--video-repeats", type=int, default=3)
    parser.add_argument("--only", choices=["tta"], help="run one part alone (its own results file and section)")
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
    info = machine()
    isa = info["cpu_isa"]
    if args.only == "tta":
        rows = tta_cost(bundle, pubkey, video, work, args.video_repeats)
        manifest = json.loads((bundle / "manifest.json").read_text())
        model = str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir)
        (ROOT / "bench" / "results" / "device_tta.json").write_text(json.dumps(
            {"model": model, "backbone": manifest["backbone"]["name"], "training": manifest["training"],
             "machine": info, "tta": rows, "video": video.name}, indent=1))
        md = [f"## Device test-time augmentation (`python bench/device.py --model {model} --only tta`)", "",
              f"Model: {manifest['backbone']['name']} {manifest['preprocessing']['input_size']} px, "
              f"{manifest['training'].get('dataset')} ({manifest['training'].get('protocol')} protocol, "
              f"{manifest['training'].get('epochs')} epochs, seed {manifest['training'].get('seed')})."]
        md += tta_markdown(rows, isa, json.loads((work / "tta-none.json").read_text())["frames"], args.video_repeats)
        record("device_tta", {f"tta_{r['tta']}_ms_per_frame_vs_none": r["ms_per_frame_vs_none"] for r in rows[1:]},
               "\n".join(md))
        print("\n".join(md))
        return 0
    videos = {k: work / f"faces-{k}-per-frame.mp4" for k in FACES}
    for k, path in videos.items():
        if not path.is_file():  # the same faces each time, dealt into k slots
            emoshield("data", "video", "--model", model_dir, "--per-class", "6", "--hold", "15", "--face-px",
                      MULTI_FACE_PX, "--faces-per-frame", k, "--out", path)
    lat = latency(model_dir, bundle, args.repeats, args.iterations)
    check = self_check_cost(bundle, args.repeats)
    rows = pipeline(bundle, pubkey, video, work, args.video_repeats)
    faces = multi_face(bundle, pubkey, videos, work, args.video_repeats)
    tta = tta_cost(bundle, pubkey, video, work, args.video_repeats)
    manifest = json.loads((bundle / "manifest.json").read_text())
    default = next(r for r in rows if (r["detect_every"], r["detect_width"]) == DEFAULT)
    result = {"model": str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir),
              "backbone": manifest["backbone"]["name"], "training": manifest["training"],
              "machine": info, "latency": lat, "self_check": check, "pipeline": rows, "multi_face": faces,
              "tta": tta, "video": video.name}
    out = ROOT / "bench" / "results" / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    ms, vs = lat["median_ms"], lat["vs_eager"]
    training = manifest["training"]
    md = [f"## Device path (`python bench/device.py --model {result['model']}`)", "",
          f"Model: {manifest['backbone']['name']} {lat['input_size']} px trained on {training.get('dataset')} "
          f"({training.get('protocol')} protocol, {training.get('epochs')} epochs, seed {training.get('seed')}); "
          f"{info['cpus']} cores, torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}.", "",
          f"Per-face latency, batch 1, 1 thread, median of {lat['repeats']} interleaved runs of {lat['iterations']} "
          "faces:", "", "| CPU | runtime | ms / face | x eager |", "|---|---|---:|---:|"]
    md += [f"| {isa} | {name} | {ms[name]:.3f} | {vs[name]:.2f} |" for name in ms]
    md += ["", f"Installing a bundle: the int8 self-check on its {check['probes']} probe faces adds "
               f"{check['self_check_ms']:.1f} ms to loading the model ({check['ms']['load int8']:.1f} ms without it; "
               f"agreement {check['agreement']:.1%} here, so the device runs {check['precision']}), CPU {isa}.", "",
           f"`emoshield device run` (decode + detect + track + crop + int8 classify + JSON line) on a 640x480 video "
           f"of {rows[0]['frames']} frames (4 test faces per class of the model's split, 15 frames each; "
           f"`emoshield data video`), pinned to one core (`taskset -c 0`, `--threads 1`), median FPS of "
           f"{args.video_repeats} interleaved runs; box and label agreement are against detecting on every "
           "full-size frame:", "",
           "| CPU | detect every | detect width | FPS | detections | peak RSS MB | accuracy (all frames) | "
           "box IoU vs ref | label agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {isa} | {'auto (default)' if r['detect_every'] == 0 else r['detect_every']} | "
           f"{r['detect_width'] or 'full'} | {r['fps']:.1f} | {r['detections']} | {r['peak_rss_mb']:.0f} | "
           f"{r['accuracy_all_frames']:.1%} | {r['box_iou_vs_reference']:.3f} | "
           f"{r['label_agreement_vs_reference']:.1%} |" for r in rows]
    md += ["", f"Every face: the default pipeline on videos with 1, 2 and 3 real faces ({MULTI_FACE_PX} px) side by "
               "side in every frame, each face scored against its own truth:", "",
           "| CPU | faces / frame | FPS | ms / frame | ms per extra face | faces found | accuracy (found faces) | "
           "track switches |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {isa} | {r['faces_per_frame']} | {r['fps']:.1f} | {r['ms_per_frame']:.2f} | "
           f"{r.get('ms_per_extra_face', 0):.2f} | {r['face_detection_rate']:.1%} | "
           f"{r['face_accuracy_on_detected']:.1%} | {r['track_switches']} |" for r in faces]
    md += tta_markdown(tta, isa, rows[0]["frames"], args.video_repeats)
    record("device", {"int8_latency_vs_eager": vs["onnxruntime int8"],
                      "int8_latency_vs_onnxruntime_fp32": ms["onnxruntime int8"] / ms["onnxruntime fp32"],
                      "video_fps": default["fps"], "video_fps_detect_every_frame": rows[0]["fps"],
                      # the default pipeline's (README's figure) and the largest of every row measured
                      "device_peak_rss_mb_default_pipeline": default["peak_rss_mb"],
                      "device_peak_rss_mb": max(r["peak_rss_mb"] for r in rows + faces),
                      "self_check_ms": check["self_check_ms"],
                      "ms_per_extra_face": faces[-1].get("ms_per_extra_face"),
                      "tta_flip_ms_per_frame_vs_none": tta[1]["ms_per_frame_vs_none"]}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
