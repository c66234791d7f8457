"""Face detectors: Haar, and MTCNN on onnxruntime checked against facenet-pytorch's own MTCNN."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from emoshield.data.faces import box_iou, face_detector
from emoshield.errors import EmoshieldError
from tests.conftest import ROOT


def _jaffe(data_root, count: int):
    return [cv2.imread(str(p)) for p in sorted((data_root / "jaffe").iterdir())[:: 213 // count][:count]]


def test_onnx_mtcnn_matches_facenet_pytorch_boxes_scores_and_landmarks(data_root):
    from facenet_pytorch import MTCNN

    from emoshield.data.mtcnn import OnnxMTCNN

    reference, ours = MTCNN(keep_all=True, min_face_size=24, device="cpu"), OnnxMTCNN(min_size=24)
    for frame in _jaffe(data_root, 6):
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        boxes, scores, marks = reference.detect(rgb, landmarks=True)
        got, got_scores, got_marks = ours.detect(rgb)
        assert len(got) == len(boxes) >= 1
        best = int(np.argmax(scores))  # the cascade's best face, compared box, score and eyes
        wh = lambda b: (b[0], b[1], b[2] - b[0], b[3] - b[1])  # noqa: E731
        assert box_iou(wh(got[0]), wh(boxes[best])) > 0.99
        assert np.abs(got[0] - boxes[best].astype(np.float32)).max() < 0.5  # pixels: same cascade, same resampling
        assert abs(got_scores[0] - scores[best]) < 1e-3
        assert np.abs(got_marks[0] - marks[best]).max() < 0.5
    assert len(ours.detect(np.zeros((96, 128, 3), np.uint8))[0]) == 0
    assert len(ours.detect(np.full((30, 30, 3), 200, np.uint8))[0]) == 0  # smaller than one pyramid cell


def test_mtcnn_option_finds_the_faces_haar_finds_and_runs_without_torch(data_root):
    haar, mtcnn = face_detector("haar"), face_detector("mtcnn")
    for frame in _jaffe(data_root, 3):
        a, b = haar(frame), mtcnn(frame)
        assert a and b and box_iou(a[0], b[0]) > 0.5, (a, b)
    assert mtcnn(np.zeros((120, 160, 3), np.uint8)) == []
    assert mtcnn(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))  # grey frames too
    with pytest.raises(EmoshieldError, match="unknown face detector"):
        face_detector("yolo")
    # a device without torch: the detector loads and finds the face, torch never imported
    code = ("import sys, cv2; sys.modules['torch'] = None; from emoshield.data.faces import face_detector; "
            f"boxes = face_detector('mtcnn', max_width=160)(cv2.imread({str(sorted((data_root / 'jaffe').iterdir())[0])!r})); "
            "print(len(boxes), 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["1", "False"]


def test_damaged_mtcnn_files_are_rebuilt_or_refused(tmp_path):
    from emoshield.data.mtcnn import MANIFEST, OnnxMTCNN, export_mtcnn

    folder = tmp_path / "mtcnn"
    files = export_mtcnn(folder)
    good = files[1].read_bytes()
    files[1].write_bytes(good[: len(good) // 2])  # truncated (a full disk, a torn copy)
    OnnxMTCNN(folder)  # re-exported where torch is here
    assert files[1].read_bytes() == good
    (folder / MANIFEST).write_text("{not json")
    files[0].write_bytes(b"\x00" * 100)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys; sys.modules['torch'] = None; from emoshield.data.mtcnn import OnnxMTCNN; "
            f"OnnxMTCNN({str(folder)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "no verified MTCNN ONNX files" in proc.stderr
    assert str(folder) in proc.stderr


def test_the_crop_margin_is_measured_from_how_training_faces_are_framed(data_root):
    from emoshield.data.faces import DEFAULT_MARGIN, calibrated_margin, largest_face_box

    grey = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in _jaffe(data_root, 24)]
    for grown in (0.0, 0.1, 0.3):  # JAFFE faces cropped as Haar box + `grown`: the measurement finds it
        views = []
        for image in grey:
            x, y, w, h = largest_face_box(image, grown)
            views.append(cv2.resize(image[y:y + h, x:x + w], (64, 64), interpolation=cv2.INTER_AREA))
        margin, measured = calibrated_margin(np.stack(views))
        assert measured >= 20 and abs(margin - grown) < 0.05, (grown, margin, measured)
    noise = np.random.default_rng(0).integers(0, 255, (12, 48, 48), dtype=np.uint8)
    assert calibrated_margin(noise) == (DEFAULT_MARGIN, 0)  # no faces found: the default, and says so


def _jaffe_crops(data_root, count: int = 20) -> list[np.ndarray]:
    from emoshield.data.faces import largest_face_box

    crops = []
    for path in sorted((data_root / "jaffe").iterdir())[:count]:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        x, y, w, h = largest_face_box(gray)
        crops.append(gray[y:y + h, x:x + w])
    return crops


def _rotated(face: np.ndarray, degrees: float) -> np.ndarray:
    h, w = face.shape[:2]
    return cv2.warpAffine(face, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0), (w, h),
                          borderMode=cv2.BORDER_REPLICATE)


def test_eye_alignment_measures_and_undoes_the_tilt_of_real_faces(data_root):
    """JAFFE faces turned by +-10 degrees: the measured eye-line angle moves by about that much, and
    aligning brings it back near level."""
    from emoshield.data.faces import align_face, eye_tilt

    moved, levelled, pairs = [], [], 0
    for face in _jaffe_crops(data_root):
        upright = eye_tilt(face)
        for degrees in (-10, 10):
            turned = _rotated(face, degrees)
            tilt = eye_tilt(turned)
            if upright is None or tilt is None:
                continue
            pairs += 1
            moved.append(abs((tilt - upright) + degrees) < 5)  # counter-clockwise turn: the right eye rises
            after = eye_tilt(align_face(turned))
            levelled.append(after is not None and abs(after) < 4)
    assert pairs >= 24, pairs  # measured 35 of 40 here
    assert np.mean(moved) >= 0.8 and np.mean(levelled) >= 0.75, (np.mean(moved), np.mean(levelled))


def test_alignment_leaves_faces_without_an_eye_pair_alone_and_refuses_unknown_modes(data_root):
    from emoshield.data.faces import align_face, eye_tilt

    face = _jaffe_crops(data_root, 1)[0]
    assert align_face(face, "none") is face
    for blank in (np.full((120, 120), 128, np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((200, 10), np.uint8)):
        assert eye_tilt(blank) is None and align_face(blank) is blank
    with pytest.raises(EmoshieldError, match="alignment"):
        align_face(face, "landmarks")


def test_alignment_travels_with_the_model_and_training_and_the_device_crop_alike(bundle, keys, data_root, tmp_path):
    """--align eyes is saved in the model's config and the bundle's manifest; the training decode and
    the device's face_tensor both rotate the crop before resizing, so they feed the model the same face."""
    import json
    import shutil

    from emoshield.data import load_dataset
    from emoshield.data.faces import align_face, expand_box
    from emoshield.data.images import decode_images, resize_face
    from emoshield.device.recognizer import EmotionClassifier
    from emoshield.models import ModelConfig, build_model, load_model, save_model
    from emoshield.tiers.bundle import BundleError

    model = build_model(ModelConfig("smallcnn", ["a", "b"], 32, align="eyes"))
    save_model(model, tmp_path / "model.safetensors")
    assert load_model(tmp_path / "model.safetensors").config.align == "eyes"

    from emoshield.data.faces import eye_tilt

    dataset = load_dataset("jaffe", data_root, "happy,sad")

    def crop_of(record):
        x, y, w, h = record.crop
        return cv2.imread(str(dataset.root / record.path), cv2.IMREAD_GRAYSCALE)[y:y + h, x:x + w]

    record = next(r for r in dataset.records if abs(eye_tilt(crop_of(r)) or 0) >= 1)  # a face alignment turns
    aligned = decode_images(dataset.root, [record], 48, align="eyes").pixels[0, 0]
    gray = cv2.imread(str(dataset.root / record.path), cv2.IMREAD_GRAYSCALE)
    x, y, w, h = record.crop
    expected = resize_face(align_face(gray[y:y + h, x:x + w]), 48)
    assert np.array_equal(aligned, expected)
    assert not np.array_equal(aligned, decode_images(dataset.root, [record], 48).pixels[0, 0])  # it did rotate

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["preprocessing"]["align"] == "none"  # the fixture's model was trained without it
    manifest["preprocessing"]["align"] = "eyes"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    classifier = EmotionClassifier(copy, "fp32")
    classifier.margin = 0.0  # the device's crop is then exactly the training crop (record.crop)
    frame = cv2.imread(str(dataset.root / record.path), cv2.IMREAD_COLOR)
    trained_on = decode_images(dataset.root, [record], classifier.input_size, align="eyes").pixels[0, 0]
    device_sees = classifier.face_tensor(frame, record.crop)[0, 0]
    assert np.allclose(device_sees, trained_on.astype(np.float32) / 255, atol=2 / 255)  # (warp before/after gray)
    assert not np.allclose(device_sees, decode_images(dataset.root, [record], classifier.input_size).pixels[0, 0]
                           .astype(np.float32) / 255, atol=2 / 255)  # and both did rotate
    assert expand_box(record.crop, frame.shape[:2], 0.0) == tuple(record.crop)
    manifest["preprocessing"]["align"] = "spin"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="alignment"):
        EmotionClassifier(copy, "fp32")

    # an aligned bundle is sealed as format /2: a device older than alignment refuses it rather than
    # running it on unaligned faces; this one reads and verifies both
    from emoshield.tiers.bundle import FORMAT, FORMAT_ALIGNED, read_manifest, seal_bundle, verify_bundle
    from emoshield.tiers.signing import load_private_key

    key = load_private_key(keys / "private.key")
    for align, fmt in (("eyes", FORMAT_ALIGNED), ("none", FORMAT)):
        manifest["preprocessing"]["align"] = align
        sealed = seal_bundle(copy, {k: v for k, v in manifest.items() if k not in ("files", "format")}, key)
        assert sealed["format"] == fmt == read_manifest(copy)["format"]
        assert verify_bundle(copy, keys / "public.key")["format"] == fmt


def test_aligned_decoding_on_worker_threads_matches_one_thread(data_root):
    """decode_images aligns on 4 worker threads; OpenCV's cascade is not safe to share between them
    (it changes state and releases the GIL), so each thread has its own. A shared one gave other
    eye pairs than a lone thread (measured: a JAFFE fold's aligned accuracy 54.8% vs 83.9%)."""
    from emoshield.data import load_dataset
    from emoshield.data.images import decode_images

    dataset = load_dataset("jaffe", data_root, "happy,sad,surprise,disgust,fear")
    records = dataset.records[:60]
    for _ in range(3):
        threaded = decode_images(dataset.root, records, 48, workers=4, align="eyes").pixels
        assert np.array_equal(threaded, decode_images(dataset.root, records, 48, workers=1, align="eyes").pixels)


def test_face_detection_on_threads_matches_one_thread_and_each_thread_has_its_cascade(data_root):
    """The face cascade is per thread too (the eye cascade's race above): detect_faces on 4 threads
    at once finds the boxes one thread finds, image by image."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from emoshield.data.faces import detect_faces, haar_cascade

    paths = sorted((data_root / "jaffe").rglob("*.tiff"))[:48]
    assert len(paths) == 48
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
    alone = [detect_faces(img) for img in images]
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(detect_faces, images)) == alone
    with ThreadPoolExecutor(2) as pool:
        theirs = list(pool.map(lambda _: haar_cascade(), range(2)))  # kept alive: no id reuse
    mine = haar_cascade()
    assert mine is haar_cascade() and all(c is not mine for c in theirs)
    assert haar_cascade("haarcascade_eye.xml") is not mine  # one per name too
