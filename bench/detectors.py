"""Face detectors side by side (issue 16 item 4): how often Haar, MTCNN on onnxruntime (the
device's torch-free option) and facenet-pytorch's MTCNN (torch) find the face, on real faces
under the conditions where Haar is known to fail, and what a 640x480 frame costs each on one
thread (interleaved repeats, medians).

Sets (all real faces; JAFFE has one face per image, so a detection is "at least one box" and
extra boxes are false positives):
  jaffe            the 213 JAFFE photos as they are (256 x 256, grey)
  jaffe-dark       the same at a tenth of the brightness with sensor noise (sigma 4)
  jaffe-tilted     the same turned 25 degrees in the image plane (alternately left and right)
  jaffe-small      the photo shrunk to 96 px (face ~45 px) inside a 640x480 frame
  ckplus48-frame   CK+48 faces (tight crops, 40 per class) at 150 px in a 640x480 frame as the
                   device's test videos show them; a detection must overlap the true box (IoU >= 0.3)

    .venv/bin/python bench/detectors.py [--repeats 5]

Writes bench/results/detectors.json, headline keys in bench/results.json and the "detectors"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, interleaved_medians, machine, record  # noqa: E402

from emoshield.data.faces import box_iou, face_detector  # noqa: E402

FRAME = (480, 640)


def _in_frame(image: np.ndarray, side: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    frame = np.full((*FRAME, 3), 96, np.uint8)
    face = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if side < image.shape[0] else cv2.INTER_CUBIC)
    x, y = int(rng.integers(0, FRAME[1] - side)), int(rng.integers(0, FRAME[0] - side))
    frame[y:y + side, x:x + side] = face if face.ndim == 3 else face[:, :, None]
    return frame, (x, y, side, side)


def face_sets(data_root: Path, seed: int = 0) -> dict[str, list[tuple[np.ndarray, tuple | None]]]:
    """name -> [(BGR image, true box or None when only "a face is there" is known)]."""
    rng = np.random.default_rng(seed)
    jaffe = [cv2.imread(str(p)) for p in sorted((data_root / "jaffe").iterdir()) if p.suffix.lower() == ".tiff"]
    sets = {"jaffe": [(im, None) for im in jaffe]}
    sets["jaffe-dark"] = [(np.clip(im * 0.1 + rng.normal(0, 4, im.shape), 0, 255).astype(np.uint8), None)
                          for im in jaffe]
    tilted = []
    for k, im in enumerate(jaffe):
        turn = cv2.getRotationMatrix2D((im.shape[1] / 2, im.shape[0] / 2), 25 if k % 2 else -25, 1.0)
        tilted.append((cv2.warpAffine(im, turn, im.shape[1::-1], borderMode=cv2.BORDER_REPLICATE), None))
    sets["jaffe-tilted"] = tilted
    sets["jaffe-small"] = [(_in_frame(im, 96, rng)[0], None) for im in jaffe]
    ck = data_root / "ckplus48"
    faces = []
    for folder in sorted(p for p in ck.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        for i in rng.choice(len(files), min(40, len(files)), replace=False):
            faces.append(_in_frame(cv2.imread(str(files[i])), 150, rng))
    sets["ckplus48-frame"] = faces
    return sets


def torch_mtcnn():
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(1)
    net = MTCNN(keep_all=True, min_face_size=24, device="cpu")

    def detect(frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        found, probs = net.detect(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if found is None:
            return []
        return [(int(x0), int(y0), int(x1 - x0), int(y1 - y0)) for (x0, y0, x1, y1), p in zip(found, probs) if p >= 0.9]
    return detect


def score(detect, items) -> dict:
    found = extra = 0
    for image, truth in items:
        boxes = detect(image)
        hit = any(box_iou(b, truth) >= 0.3 for b in boxes) if truth else bool(boxes)
        found += hit
        extra += max(0, len(boxes) - 1) if truth is None else sum(box_iou(b, truth) < 0.3 for b in boxes)
    return {"images": len(items), "detection_rate": found / len(items), "false_boxes_per_image": extra / len(items)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EMOSHIELD_DATA"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.data_root:
        parser.error("set EMOSHIELD_DATA or pass --data-root")
    cv2.setNumThreads(1)
    sets = face_sets(Path(args.data_root))
    detectors = {"haar": face_detector("haar"), "mtcnn (onnxruntime)": face_detector("mtcnn"),
                 "mtcnn (facenet-pytorch, torch)": torch_mtcnn()}
    rates = {name: {s: score(detect, items) for s, items in sets.items()} for name, detect in detectors.items()}
    frames = [im for im, _ in sets["jaffe-small"][:20]]
    runners = {name: (lambda d=detect: [d(f) for f in frames]) for name, detect in detectors.items()}
    shrunk = {f"{name} on a 320-px copy (device default)": face_detector(key, max_width=320)
              for name, key in (("haar", "haar"), ("mtcnn (onnxruntime)", "mtcnn"))}
    runners.update({name: (lambda d=detect: [d(f) for f in frames]) for name, detect in shrunk.items()})
    for run in runners.values():
        run()  # warm-up
    seconds = interleaved_medians(runners, args.repeats)
    ms = {name: s / len(frames) * 1e3 for name, s in seconds.items()}
    info = machine()
    result = {"machine": info, "sets": {s: len(items) for s, items in sets.items()}, "detection": rates,
              "ms_per_640x480_frame": ms, "repeats": args.repeats, "threads": 1}
    out = ROOT / "bench" / "results" / "detectors.json"
    out.write_text(json.dumps(result, indent=1))
    names = list(sets)
    md = [f"## Face detectors (`python bench/detectors.py`; CPU {info['cpu_isa']})", "",
          "Share of images where the face is found (JAFFE: one face per photo; CK+48 in a frame: a box overlapping "
          "the true one, IoU >= 0.3), and false boxes per image, on real faces: " + ", ".join(
              f"{s} ({len(sets[s])})" for s in names) + ". See the script's docstring for each set.", "",
          "| detector | " + " | ".join(names) + " | false boxes / image (all sets) |",
          "|---|" + "---:|" * (len(names) + 1)]
    for name, per in rates.items():
        false = sum(per[s]["false_boxes_per_image"] * per[s]["images"] for s in names) / sum(
            per[s]["images"] for s in names)
        md.append(f"| {name} | " + " | ".join(f"{per[s]['detection_rate']:.1%}" for s in names) + f" | {false:.3f} |")
    md += ["", f"Cost of one 640x480 frame holding a ~45 px face, 1 thread, median of {args.repeats} interleaved "
               f"rounds over 20 frames (torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}, "
               f"OpenCV {info.get('cv2')}):", "", "| detector | ms / frame | x haar |", "|---|---:|---:|"]
    md += [f"| {name} | {v:.1f} | {v / ms['haar']:.1f} |" for name, v in ms.items()]
    record("detectors", {"mtcnn_onnx_detection_rate_jaffe_dark": rates["mtcnn (onnxruntime)"]["jaffe-dark"]["detection_rate"],
                         "haar_detection_rate_jaffe_dark": rates["haar"]["jaffe-dark"]["detection_rate"],
                         "mtcnn_onnx_vs_torch_speed": ms["mtcnn (onnxruntime)"] / ms["mtcnn (facenet-pytorch, torch)"]},
           "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
