"""Signed bundles, the device's bundle store and the torch-free device runtime, on a small
model trained on real CK+48 faces."""

import json
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from emoshield.errors import EmoshieldError
from emoshield.tiers.bundle import ONNX_INT8, BundleError, read_manifest, seal_bundle, verify_bundle
from emoshield.tiers.device import BundleStore
from emoshield.tiers.signing import generate_keys, load_private_key
from tests.conftest import FIVE
from tests.test_cli import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("tiers") / "run"
    run("train", "--dataset", "ckplus48", "--data-root", data_root, "--classes", FIVE, "--protocol", "subject",
        "--fold", "0", "--limit-per-class", "40", "--backbone", "mobilenet_v2", "--weights", "imagenet",
        "--input-size", "48", "--epochs", "8", "--batch-size", "32", "--schedule", "cosine", "--out", out, "--quiet")
    # 8 epochs: a model that learned something (~70%); int8 agreement is meaningless near chance
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    generate_keys(folder)
    return folder


@pytest.fixture(scope="module")
def bundle(trained, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "v1"
    proc = run("bundle", "export", "--model", trained, "--key", keys / "private.key", "--out", out,
               "--calibration-images", "64")
    assert "int8 accuracy change" in proc.stdout
    return out


def test_keys_are_private_and_never_overwritten(keys):
    assert stat.S_IMODE((keys / "private.key").stat().st_mode) == 0o600
    with pytest.raises(EmoshieldError, match="already holds a key pair"):
        generate_keys(keys)


def test_bundle_holds_onnx_equal_to_torch_and_an_accurate_int8_model(bundle, keys, trained):
    manifest = verify_bundle(bundle, keys / "public.key")
    assert set(manifest["files"]) == {"weights.safetensors", "model.onnx", "model.int8.onnx"}
    assert manifest["classes"] == ["disgust", "fear", "happy", "sad", "surprise"]
    assert manifest["preprocessing"]["input_size"] == 48 and manifest["preprocessing"]["channels"] == "gray"
    assert manifest["backbone"]["name"] == "mobilenet_v2" and len(manifest["backbone"]["sha256"]) == 64
    assert manifest["training"]["protocol"] == "subject" and manifest["version"] == 1
    m = manifest["metrics"]
    trained_metrics = json.loads((trained / "metrics.json").read_text())
    assert m["test_accuracy"] == pytest.approx(trained_metrics["test_accuracy"])
    assert m["onnx_max_abs_diff"] < 1e-4 and m["onnx_fp32_accuracy"] == m["test_accuracy"]
    assert abs(m["int8_accuracy_change"]) <= 0.05 and m["int8_prediction_agreement"] >= 0.9
    assert (bundle / ONNX_INT8).stat().st_size < 0.5 * (bundle / "model.onnx").stat().st_size


@pytest.mark.parametrize("tamper, reason", [
    (lambda b: b.joinpath(ONNX_INT8).write_bytes(b.joinpath(ONNX_INT8).read_bytes()[:-1] + b"\x00"), "sha256"),
    (lambda b: b.joinpath("manifest.json").write_text(
        b.joinpath("manifest.json").read_text().replace('"version": 1', '"version": 9')), "bad signature"),
    (lambda b: b.joinpath("model.onnx").unlink(), "model.onnx is missing"),
    (lambda b: b.joinpath("manifest.sig").unlink(), "unsigned"),
])
def test_verify_refuses_tampered_bundles_with_one_line(bundle, keys, tmp_path, tamper, reason):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    assert run("bundle", "verify", copy, "--pubkey", keys / "public.key").returncode == 0
    tamper(copy)
    proc = run("bundle", "verify", copy, "--pubkey", keys / "public.key", check=False)
    assert proc.returncode == 2 and reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_verify_refuses_another_key_and_old_versions(bundle, keys, tmp_path):
    generate_keys(tmp_path / "other")
    proc = run("bundle", "verify", bundle, "--pubkey", tmp_path / "other" / "public.key", check=False)
    assert proc.returncode == 2 and "bad signature" in proc.stderr
    proc = run("bundle", "verify", bundle, "--pubkey", keys / "public.key", "--newer-than", "1", check=False)
    assert proc.returncode == 2 and "not newer" in proc.stderr
    assert "mobilenet_v2" in run("bundle", "inspect", bundle).stdout


def _resigned(bundle, keys, dst, version, break_model=False):
    shutil.copytree(bundle, dst)
    if break_model:
        (dst / ONNX_INT8).write_bytes(b"not an onnx graph")
    manifest = {k: v for k, v in read_manifest(dst).items() if k not in ("files", "format")}
    seal_bundle(dst, {**manifest, "version": version}, load_private_key(keys / "private.key"))
    return dst


def test_store_installs_newer_verified_bundles_and_rolls_back(bundle, keys, tmp_path):
    store = BundleStore(tmp_path / "store", keys / "public.key")
    assert store.current_version() is None
    store.install(bundle)
    assert store.state() == {"current": 1, "previous": None}
    with pytest.raises(BundleError, match="not newer"):
        store.install(bundle)
    store.install(_resigned(bundle, keys, tmp_path / "v2", 2))
    assert store.state() == {"current": 2, "previous": 1}
    # signed but broken: the health check refuses it and nothing changes
    with pytest.raises(BundleError, match="health check failed"):
        store.install(_resigned(bundle, keys, tmp_path / "v3", 3, break_model=True))
    assert store.state() == {"current": 2, "previous": 1} and not (tmp_path / "store/bundles/v3").exists()
    tampered = _resigned(bundle, keys, tmp_path / "v4", 4)
    (tampered / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match="sha256"):
        store.install(tampered)
    assert store.rollback("v2 misbehaved") == 1 and store.current_version() == 1
    assert not list((tmp_path / "store" / "staging").iterdir())


def test_device_runs_on_a_video_of_real_faces_without_torch(bundle, keys, trained, tmp_path):
    video = tmp_path / "faces.mp4"
    proc = run("data", "video", "--model", trained, "--per-class", "2", "--hold", "3", "--out", video)
    truth = json.loads((tmp_path / "faces.mp4.labels.json").read_text())["frames"]
    assert len(truth) == 5 * 2 * 3
    script = (
        "import sys\n"
        "from emoshield.cli import main\n"
        f"rc = main(['device', 'run', '--source', {str(video)!r}, '--bundle', {str(bundle)!r}, '--pubkey', "
        f"{str(keys / 'public.key')!r}, '--jsonl', {str(tmp_path / 'out.jsonl')!r}, '--truth', "
        f"{str(tmp_path / 'faces.mp4.labels.json')!r}, '--smooth', '0.5'])\n"
        "assert 'torch' not in sys.modules, 'the device runtime imported torch'\n"
        "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FPS" in proc.stderr and "accuracy" in proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(len(truth)))
    with_face = [r for r in lines if r["box"] is not None]
    assert len(with_face) >= 0.9 * len(lines)  # Haar finds the padded CK+ faces
    for r in with_face:
        assert r["label"] in r["probabilities"] and abs(sum(r["probabilities"].values()) - 1) < 1e-3
        assert r["bundle_version"] == 1


def test_device_preprocessing_matches_training_and_reproduces_int8_accuracy(bundle, trained):
    """Given the dataset's own face crops, the device's preprocessing is the trainer's and its
    int8 model scores exactly the accuracy the manifest states."""
    from emoshield.data.images import decode_images, to_model_input
    from emoshield.pipeline import saved_split_records
    from emoshield.tiers.device import EmotionClassifier

    import cv2

    classifier = EmotionClassifier(bundle)
    records, root, _ = saved_split_records(trained / "model.safetensors", "test")
    decoded = decode_images(root, records, classifier.input_size)
    expected = to_model_input(__import__("torch").from_numpy(decoded.pixels)).numpy()
    faces = np.concatenate([classifier.face_tensor(cv2.imread(str(root / r.path)), None) for r in decoded.records])
    assert np.array_equal(faces, expected)
    labels = np.array([classifier.classes.index(r.label) for r in decoded.records])
    accuracy = float((classifier.probabilities(faces).argmax(1) == labels).mean())
    assert accuracy == pytest.approx(read_manifest(bundle)["metrics"]["onnx_int8_accuracy"])


def test_device_refuses_an_unverified_bundle(bundle, tmp_path):
    generate_keys(tmp_path / "k")
    proc = run("device", "run", "--source", tmp_path, "--bundle", bundle, "--pubkey", tmp_path / "k" / "public.key",
               check=False)
    assert proc.returncode == 2 and "bad signature" in proc.stderr


def _iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax1, bx1) - max(a[0], b[0])), max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_mtcnn_option_finds_the_faces_haar_finds(data_root):
    import cv2

    from emoshield.data.faces import face_detector

    haar, mtcnn = face_detector("haar"), face_detector("mtcnn")
    for path in sorted((data_root / "jaffe").iterdir())[:3]:
        frame = cv2.imread(str(path))
        a, b = haar(frame), mtcnn(frame)
        assert a and b and _iou(a[0], b[0]) > 0.5, (path.name, a, b)
    assert mtcnn(np.zeros((120, 160, 3), np.uint8)) == []
    with pytest.raises(EmoshieldError, match="unknown face detector"):
        face_detector("yolo")


def test_cloud_pretrain_adds_a_fer2013_backbone_that_training_loads_by_name(tmp_path, data_root, monkeypatch):
    from safetensors.torch import load_file

    from emoshield.tiers.library import read_entry

    library, name = tmp_path / "library", "smallcnn-fer2013-32px"
    pretrain = ["cloud", "pretrain", "--data-root", data_root, "--backbone", "smallcnn", "--weights", "scratch",
                "--input-size", "32", "--epochs", "1", "--limit-per-class", "30", "--library", library,
                "--work", tmp_path / "pretrain", "--quiet"]
    proc = run(*pretrain)
    assert f"fine-tune with --weights library:{name}" in proc.stdout
    meta, weights = read_entry(name, library)
    assert meta["classes"] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert meta["data"].startswith("fer2013 official split") and meta["accuracy"]["test_images"] > 0
    again = run(*pretrain, check=False)
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    # the edge-side trainer loads it by name (features only: the 7-class head does not fit 5 classes)
    monkeypatch.setenv("EMOSHIELD_LIBRARY", str(library))
    out = tmp_path / "finetune"
    run("train", "--dataset", "ckplus48", "--data-root", data_root, "--classes", FIVE, "--protocol", "subject",
        "--limit-per-class", "10", "--backbone", "smallcnn", "--weights", f"library:{name}", "--input-size", "32",
        "--epochs", "1", "--freeze-features", "--out", out, "--quiet")
    recorded = json.loads((out / "run.json").read_text())["model_config"]["weights"]
    assert recorded == f"library:{name}@{meta['sha256'][:12]}"
    pretrained, tuned = load_file(weights), load_file(out / "model.safetensors")
    features = [k for k in pretrained if k.startswith("features.")]
    assert features and all(np.array_equal(pretrained[k].numpy(), tuned[k].numpy()) for k in features)


def _fake_entry(root, name, backbone):
    from emoshield.tiers.bundle import sha256_file

    folder = root / name
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(name.encode())
    meta = {"name": name, "backbone": backbone, "input_size": 48, "data": "", "sha256": sha256_file(folder / "weights.safetensors")}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return meta


def test_library_search_path_user_entries_first_then_the_embedded_library(tmp_path, monkeypatch):
    from emoshield.tiers import library as lib

    user, embedded = tmp_path / "user", tmp_path / "embedded"
    monkeypatch.setattr(lib, "EMBEDDED_LIBRARY", embedded)
    monkeypatch.setenv("EMOSHIELD_LIBRARY", str(user))
    _fake_entry(embedded, "shipped", "smallcnn")
    _fake_entry(embedded, "both", "smallcnn")
    _fake_entry(user, "both", "resnet18")
    _fake_entry(user, "mine", "resnet18")

    entries = {e["name"]: e for e in lib.list_entries()}
    assert sorted(entries) == ["both", "mine", "shipped"]
    assert entries["shipped"].get("embedded") is True
    assert entries["both"]["backbone"] == "resnet18" and "embedded" not in entries["both"]  # the user's overrides
    meta, weights = lib.read_entry("shipped")
    assert meta["embedded"] and weights == embedded / "shipped" / "weights.safetensors"
    assert lib.read_entry("both")[1] == user / "both" / "weights.safetensors"
    # writing never targets the embedded library; an explicit library is searched alone
    assert lib.entry_dir("shipped") == user / "shipped"
    assert [e["name"] for e in lib.list_entries(user)] == ["both", "mine"]
    with pytest.raises(EmoshieldError, match="no library entry 'shipped'"):
        lib.read_entry("shipped", user)
    (embedded / "shipped" / "weights.safetensors").write_bytes(b"replaced")
    with pytest.raises(EmoshieldError, match="sha256 does not match"):
        lib.read_entry("shipped")


def test_the_embedded_smallcnn_has_the_fer2013_accuracy_its_metadata_states(tmp_path, data_root, monkeypatch):
    """The shipped entry verifies, loads by name with no user library, and really scores its stated
    PrivateTest accuracy on all 3,589 FER2013 test images (one forward pass, ~10 s on 2 cores)."""
    import torch

    from emoshield.data import make_split
    from emoshield.data.images import decode_images
    from emoshield.models import load_model
    from emoshield.pipeline import DataOptions, load_data
    from emoshield.tiers.library import read_entry
    from emoshield.training.trainer import predict_logits

    monkeypatch.setenv("EMOSHIELD_LIBRARY", str(tmp_path / "empty"))
    meta, weights = read_entry("smallcnn-fer2013-48px")  # sha256 checked
    assert meta["embedded"] and meta["backbone"] == "smallcnn" and meta["input_size"] == 48
    assert weights.stat().st_size < 15e6  # small enough to ship

    dataset = load_data(DataOptions("fer2013", str(data_root), protocol="official"))
    test = make_split(dataset, "official").test
    decoded = decode_images(dataset.root, test, 48)
    assert len(decoded.records) == meta["accuracy"]["test_images"] == 3589
    model = load_model(weights)
    assert list(model.config.classes) == list(dataset.classes)
    labels = torch.tensor([dataset.classes.index(r.label) for r in decoded.records])
    with torch.no_grad():
        predicted = predict_logits(model, torch.from_numpy(decoded.pixels)).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy == pytest.approx(meta["accuracy"]["test"], abs=0.002)
    assert accuracy > 0.55  # chance is 1/7; the always-"happy" answer scores 24.5%
