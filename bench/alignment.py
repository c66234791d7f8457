"""Does face alignment (`--align eyes`: rotate each face crop so its eyes are level) help on people
the model never saw? The same training with and without it, on the subject folds of JAFFE and
CK+48, test accuracy of each (issue 18 item 2).

    EMOSHIELD_DATA=../shared/data .venv/bin/python bench/alignment.py \
        [--datasets jaffe:5,ckplus48:1] [--backbone smallcnn] [--weights library:smallcnn-fer2013-48px] \
        [--input-size 48] [--epochs 30] [--seed 0] [--work runs/bench/alignment] [--out results/alignment]

Undefended localization-head training with emoshield's defaults (the recipe of `emoshield
reproduce`'s localization runs, fewer epochs); `DATASET:N` runs subject folds 0..N-1 of 5. A
finished run is skipped and an interrupted one resumes, so the command can be re-run until done.
Then the device: each CK+48 fold-0 model as a signed bundle, `emoshield device run --truth` on one
video of that fold's test faces (`emoshield data video`, 4 per class): the accuracy a camera
measures with and without alignment. Writes OUT/results.json and OUT/results.md; also reports how
often an eye pair was found.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIVE = "happy,sad,surprise,disgust,fear"


def train(dataset: str, fold: int, align: str, args, work: Path) -> dict:
    out = work / f"{dataset}-fold{fold}-{align}"
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "emoshield", "train", "--dataset", dataset, "--classes", FIVE,
                   "--protocol", "subject", "--fold", str(fold), "--backbone", args.backbone, "--weights", args.weights,
                   "--input-size", str(args.input_size), "--epochs", str(args.epochs), "--seed", str(args.seed),
                   "--align", align, "--quiet", "--out", str(out)]
        if (out / "checkpoint.pt").is_file() or (out / "checkpoint.safetensors").is_file():
            command.append("--resume")
        print("$ " + " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


def emoshield(*args) -> None:
    print("$ emoshield " + " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "emoshield", *map(str, args)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def device_accuracy(work: Path, dataset: str) -> dict:
    """Video accuracy of the fold-0 models of `dataset` on the device, with and without alignment."""
    keys, video = work / "keys", work / f"{dataset}-fold0-faces.mp4"
    if not (keys / "private.key").is_file():
        emoshield("keys", "generate", "--out", keys)
    if not video.is_file():
        emoshield("data", "video", "--model", work / f"{dataset}-fold0-none", "--per-class", "4", "--hold", "10",
                  "--out", video)
    found = {}
    for align in ("none", "eyes"):
        bundle, summary = work / f"{dataset}-fold0-{align}-bundle", work / f"{dataset}-fold0-{align}-device.json"
        if not (bundle / "manifest.sig").is_file():
            emoshield("bundle", "export", "--model", work / f"{dataset}-fold0-{align}", "--key", keys / "private.key",
                      "--out", bundle)
        if not summary.is_file():
            emoshield("device", "run", "--bundle", bundle, "--pubkey", keys / "public.key", "--source", video,
                      "--truth", f"{video}.labels.json", "--jsonl", summary.with_suffix(".jsonl"), "--summary", summary)
        found[align] = json.loads(summary.read_text())["accuracy_all_frames"]
    return found


def eye_pairs_found(dataset: str) -> tuple[int, int]:
    """(faces with an eye pair, faces) over the dataset's 5-class images, as training crops them."""
    from emoshield.data.faces import eye_tilt
    from emoshield.data.images import decode_images
    from emoshield.pipeline import DataOptions, load_data

    data = load_data(DataOptions(dataset=dataset, classes=FIVE), 0)
    crops = decode_images(data.root, data.records, 96).pixels  # the crops before alignment, at the search width
    found = sum(eye_tilt(face[0] if face.shape[0] == 1 else face.transpose(1, 2, 0)) is not None for face in crops)
    return found, len(crops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="jaffe:5,ckplus48:1")
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--weights", default="library:smallcnn-fer2013-48px")
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench/alignment")
    parser.add_argument("--out", default="results/alignment")
    args = parser.parse_args()
    work, out = ROOT / args.work, ROOT / args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows, found = [], {}
    for spec in args.datasets.split(","):
        dataset, _, folds = spec.partition(":")
        found[dataset] = eye_pairs_found(dataset)
        for fold in range(int(folds or 1)):
            accuracy = {align: train(dataset, fold, align, args, work)["test_accuracy"] for align in ("none", "eyes")}
            rows.append({"dataset": dataset, "fold": fold, "none": accuracy["none"], "eyes": accuracy["eyes"],
                         "change": accuracy["eyes"] - accuracy["none"]})
    device = {dataset: device_accuracy(work, dataset) for dataset in found if dataset == "ckplus48"}
    result = {"backbone": args.backbone, "weights": args.weights, "input_size": args.input_size,
              "epochs": args.epochs, "seed": args.seed, "protocol": "subject (5 folds of people)", "defense": None,
              "eye_pairs_found": {k: {"found": a, "faces": b} for k, (a, b) in found.items()}, "rows": rows,
              "device_video_accuracy": device}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = [f"# Face alignment (`--align eyes`) on people held out of training (`python bench/alignment.py "
          f"--datasets {args.datasets}`)", "",
          f"{args.backbone} ({args.weights}), localization head, {args.input_size} px, {args.epochs} epochs, seed "
          f"{args.seed}, undefended, 5 classes ({FIVE}), subject protocol (whole people held out per fold).", "",
          "| dataset | fold | no alignment | eyes levelled | change (points) |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['dataset']} | {r['fold']} | {r['none']:.1%} | {r['eyes']:.1%} | {100 * r['change']:+.1f} |"
           for r in rows]
    for dataset in found:
        changes = [r["change"] for r in rows if r["dataset"] == dataset]
        md.append(f"| {dataset} | mean of {len(changes)} | | | {100 * statistics.mean(changes):+.1f} |")
    md += ["", "Eye pairs found by OpenCV's eye cascade (faces alignment turns, by at least 1 degree, or leaves "
           "level): " + "; ".join(
        f"{k} {a} of {b} ({a / b:.0%})" for k, (a, b) in found.items()) + "."]
    for dataset, accuracy in device.items():
        md += ["", f"On the device (`emoshield device run --truth`, int8, the {dataset} fold-0 models as bundles, one "
                   f"video of 4 test faces per class of that fold, 10 frames each): {accuracy['none']:.1%} of frames "
                   f"right without alignment, {accuracy['eyes']:.1%} with it."]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
