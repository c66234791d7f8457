import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FIVE

METRIC_KEYS = {"test_accuracy", "per_class_accuracy", "confusion_matrix", "classes", "protocol", "backbone",
               "input_size", "epochs", "seed", "dataset", "fold", "weights", "git_commit"}


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "emoshield", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_models_list_reports_weight_availability():
    out = run("models", "list").stdout
    assert "mobilenet_v2" in out and "available (IMAGENET1K_V1)" in out
    rows = {r["backbone"]: r for r in json.loads(run("models", "list", "--json").stdout)}
    assert {"vgg16", "alexnet", "resnet18", "mobilenet_v2"} <= set(rows)
    assert rows["mobilenet_v2"]["imagenet_weights"] == "IMAGENET1K_V1"


def test_data_summary_table(data_root):
    out = run("data", "summary", "--dataset", "ckplus48", "--data-root", data_root, "--classes", FIVE).stdout
    assert "| happy | 69 | 69 | 69 | 207 | 69 | 69 |" in out and "| **all** | 264 | 264 | 264 | 792 |" in out
    summary = json.loads(run("data", "summary", "--dataset", "fer2013", "--data-root", data_root, "--protocol",
                             "official", "--json").stdout)
    happy = next(r for r in summary["rows"] if r["class"] == "happy")
    assert (happy["train"], happy["val"], happy["test"]) == (7215, 895, 879)


def test_data_summary_of_a_nested_split_and_its_hostile_option(data_root, capsys):
    """--nested-in K/N splits fold K's training people only: JAFFE's outer fold 1 of 5 holds 2 of its
    10 people out, and no inner part holds a face of theirs; a malformed K/N is one line, exit 2."""
    summary = json.loads(run("data", "summary", "--dataset", "jaffe", "--data-root", data_root, "--protocol",
                             "subject", "--fold", "0", "--folds", "4", "--nested-in", "1/5", "--json").stdout)
    outer = json.loads(run("data", "summary", "--dataset", "jaffe", "--data-root", data_root, "--protocol",
                           "subject", "--fold", "1", "--folds", "5", "--json").stdout)
    inner_faces = sum(r["train"] + r["val"] + r["test"] for r in summary["rows"])
    outer_test = sum(r["test"] for r in outer["rows"])
    assert summary["nested_in"] == [1, 5] and inner_faces == 213 - outer_test
    assert "fold 0/4 of the training people of fold 1/5" in run(
        "data", "summary", "--dataset", "jaffe", "--data-root", data_root, "--protocol", "subject",
        "--folds", "4", "--nested-in", "1/5").stdout
    from emoshield.cli import build_parser

    for bad in ("x", "1/", "\uff11/5", "1/5/5", "1 /5", "9" * 5000 + "/5", "-1/5", ""):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["train", "--dataset", "jaffe", "--out", "o", "--nested-in", bad])
        error = capsys.readouterr().err
        assert exited.value.code == 2 and ("expected K/N" in error or "expected one argument" in error)
        assert len(error.splitlines()[-1]) < 200
    for args, why in ((["--nested-in", "5/5", "--protocol", "subject"], "--nested-in fold must be between 0 and 4, got 5"),
                      (["--nested-in", "1/5", "--protocol", "reference"], "needs --protocol subject")):
        failed = run("data", "summary", "--dataset", "jaffe", "--data-root", data_root, *args, check=False)
        assert failed.returncode != 0 and why in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.slow
def test_train_then_evaluate_end_to_end(trained, tmp_path, data_root, capsys):
    # the session's `trained` model (conftest: mobilenet_v2 ImageNet, CK+48 subject fold 0, 8 epochs),
    # trained by this same command; the stdout of `train` is checked in the corrupt-image test
    out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["classes"] == ["disgust", "fear", "happy", "sad", "surprise"]
    assert metrics["protocol"] == "subject" and metrics["fold"] == 0 and metrics["backbone"] == "mobilenet_v2"
    assert metrics["weights"] == "imagenet:IMAGENET1K_V1" and metrics["input_size"] == 48 and metrics["epochs"] == 8
    assert metrics["test_accuracy"] > 0.6  # chance is 0.2; pretrained features learn fast (measured ~0.83)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (5, 5) and matrix.sum() == metrics["num_images"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["test_accuracy"])
    split = json.loads((out / "split.json").read_text())
    subjects = {s: {e["subject"] for e in split["entries"] if e["split"] == s} for s in ("train", "val", "test")}
    assert not subjects["train"] & subjects["test"]
    assert len(json.loads((out / "history.json").read_text())) == 8
    for name in ("model.safetensors", "confusion_matrix.png", "training_curves.png", "report.md", "run.json"):
        assert (out / name).is_file(), name

    evaluation = tmp_path / "eval"
    run("evaluate", "--model", out, "--out", evaluation)
    again = json.loads((evaluation / "metrics.json").read_text())
    assert again["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert again["confusion_matrix"] == metrics["confusion_matrix"] and again["protocol"] == "subject"
    assert again["tta"] == "none"

    # test-time augmentation: the accuracy of the mean of each face and its mirror, attacks through both views
    from emoshield.models.tta import ViewAverage
    from emoshield.pipeline import _decode_for, model_test_data
    from emoshield.training import predict_logits

    flipped = tmp_path / "eval-flip"
    run("evaluate", "--model", out, "--tta", "flip", "--attacks", "fgsm", "--eps", "0.01", "--out", flipped)
    flip = json.loads((flipped / "metrics.json").read_text())
    model, records, root, _ = model_test_data(out)
    test, _ = _decode_for(model, records, root, metrics["classes"])
    expected = (predict_logits(ViewAverage(model, "flip"), test.pixels).argmax(1) == test.labels).float().mean().item()
    assert flip["tta"] == "flip" and flip["test_accuracy"] == pytest.approx(expected)
    robust = json.loads((flipped / "robustness.json").read_text())
    assert robust["model"]["tta"] == "flip" and robust["robustness"]["clean_accuracy"] == pytest.approx(expected)
    assert not any("training mode" in flag for flag in robust["robustness"]["sanity_flags"]), robust["robustness"]
    assert "test-time flip" in (flipped / "report.md").read_text()
    assert 0 <= robust["robustness"]["attacks"]["fgsm"]["0.01"]["accuracy"] <= expected

    cross = tmp_path / "jaffe"
    run("evaluate", "--model", out, "--dataset", "jaffe", "--data-root", data_root, "--protocol", "all", "--out", cross)
    jaffe = json.loads((cross / "metrics.json").read_text())
    assert jaffe["dataset"] == "jaffe" and 100 < jaffe["num_images"] < 160  # JAFFE's 5-class faces
    from emoshield.cli import main  # in-process: the exit status and the one line the command prints

    # AutoAttack at its own eps (the costly attack at fewer eps than the others)
    own_eps = tmp_path / "aa-eps"
    run("evaluate", "--model", out, "--dataset", "jaffe", "--data-root", data_root, "--protocol", "all",
        "--limit-per-class", "3", "--attacks", "fgsm,autoattack", "--eps", "0.01", "--autoattack-eps", "0.002",
        "--square-queries", "10", "--out", own_eps)
    attacks = json.loads((own_eps / "robustness.json").read_text())["robustness"]["attacks"]
    assert list(attacks["fgsm"]) == ["0.01"] and list(attacks["autoattack"]) == ["0.002"]
    assert not (own_eps / "partial").exists()
    # --checkpoints: a stopped evaluation keeps its attack batches there (not under OUT) and resumes from them
    import emoshield.evaluation.robustness as robustness_module

    real, calls = robustness_module.correct_under_resumable, []

    def stops_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C during the second attack
        calls.append(1)
        return real(*args, **kwargs)

    kept, stopped = tmp_path / "kept", tmp_path / "aa-stopped"
    command = ["evaluate", "--model", str(out), "--dataset", "jaffe", "--data-root", str(data_root), "--protocol",
               "all", "--limit-per-class", "3", "--attacks", "fgsm,pgd", "--eps", "0.01", "--pgd-steps", "2",
               "--out", str(stopped), "--checkpoints", str(kept)]
    robustness_module.correct_under_resumable = stops_after_one
    try:
        assert main(command) == 130
    finally:
        robustness_module.correct_under_resumable = real
    assert "an evaluation resumes" in capsys.readouterr().err
    assert any((kept / "partial").iterdir()) and not (stopped / "partial").exists()
    other = kept / "partial" / "another-evaluation"  # another model's entries under the same root
    other.mkdir()
    (other / "entry.json").write_text("{}")
    assert main(command) == 0
    assert "resumed: 1 attack batch(es)" in capsys.readouterr().err
    assert [p.name for p in (kept / "partial").iterdir()] == ["another-evaluation"]  # only this run's folder went
    assert (other / "entry.json").is_file()
    for bad in (["--autoattack-eps", "0.01"], ["--attacks", "fgsm", "--autoattack-eps", "0.01"],
                ["--attacks", "autoattack", "--autoattack-eps", "nan"],
                ["--attacks", "autoattack", "--autoattack-eps", "2"], ["--attacks", "autoattack", "--autoattack-eps", "é"]):
        code = main(["evaluate", "--model", str(out), "--dataset", "jaffe", "--data-root", str(data_root),
                     "--protocol", "all", *bad, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("emoshield: error:"), (bad, err)

    # the training dataset under other split options would test on training images and subjects: refused
    for split in (["--protocol", "subject", "--fold", "1"], ["--protocol", "all"]):
        code = main(["evaluate", "--model", str(out), "--dataset", "ckplus48", "--data-root", str(data_root),
                     *split, "--out", str(tmp_path / "leak")])
        err = capsys.readouterr().err
        assert code == 2 and "training or validation data" in err, err
        assert len(err.strip().splitlines()) == 1


def test_corrupt_image_is_reported_and_training_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    for cls, level in (("happy", 200), ("sad", 50)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(12):
            img = np.clip(level + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "data" / cls / f"{i}.png"), img)
    (tmp_path / "data" / "sad" / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    proc = run("train", "--dataset", "folder", "--data-root", tmp_path / "data", "--protocol", "reference",
               "--backbone", "smallcnn", "--input-size", "32", "--epochs", "2", "--batch-size", "8", "--out", out,
               "--quiet")
    assert "test accuracy" in proc.stdout and "confusion matrix:" in proc.stdout
    assert "skipped 1 unreadable image(s): sad/bad.png: unreadable or corrupt image" in proc.stderr
    assert json.loads((out / "run.json").read_text())["unreadable"] == [["sad/bad.png", "unreadable or corrupt image"]]
    assert json.loads((out / "metrics.json").read_text())["unreadable_images"] == 1


@pytest.mark.parametrize("args, message", [
    (["--data-root", "/nonexistent"], "data root /nonexistent does not exist"),
    (["--classes", "happy,joyful"], "unknown class name 'joyful'"),
    (["--backbone", "alexnet", "--input-size", "48"], "too small for alexnet"),
    (["--weights", "missing.safetensors"], "weights file missing.safetensors does not exist"),
    (["--protocol", "official"], "official protocol needs a dataset with its own split"),
    (["--extra-train", "ckplus48"], "--extra-train ckplus48 is the dataset being split"),
    (["--extra-train", "jaffe", "--extra-train", "fer2013", "--extra-train", "jaffe"],
     "--extra-train jaffe is given more than once"),
    # a setting that cannot work is refused before any data is read (here: none could be)
    (["--mix", "mixup", "--defense", "fgsm", "--data-root", "/nonexistent"], "--mix is for undefended training"),
])
def test_bad_input_gives_one_line_error(tmp_path, data_root, args, message, capsys):
    from emoshield.cli import main  # in this process: the same main() the console script runs, no 4 s torch start

    base = ["train", "--dataset", "ckplus48", "--data-root", data_root, "--epochs", "1", "--out", tmp_path / "o"]
    assert main([str(a) for a in (*base, *args)]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("emoshield: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--defended-epochs", "0"], "--defended-epochs must be a whole number from 1 to 10000, got 0"),
    (["--defended-epochs", "-5"], "--defended-epochs must be a whole number from 1 to 10000, got -5"),
    (["--defended-epochs", "1000000000"], "--defended-epochs must be a whole number from 1 to 10000, got 1000000000"),
    (["--epochs", "0"], "--epochs must be a whole number from 1 to 10000, got 0"),
    (["--defended-epochs", "1.5"], "argument --defended-epochs: invalid int value: '1.5'"),
    (["--defended-epochs", "é"], "argument --defended-epochs: invalid int value: 'é'"),
    (["--finetune-lr", "0"], "--finetune-lr must be in (0, 1], got 0.0"),
    (["--finetune-lr", "0.001", "--weights", "scratch"], "--weights scratch makes every run start from scratch"),
])
def test_bad_study_options_give_one_line_error_and_write_nothing(tmp_path, data_root, args, message, capsys):
    """reproduce refuses a bad study option before it reads data or makes its folders: one error line
    (after argparse's usage lines where argparse refuses the type)."""
    from emoshield.cli import main

    out, work = tmp_path / "out", tmp_path / "work"
    try:
        code = main(["reproduce", "--dataset", "jaffe", "--protocol", "subject", "--data-root", str(data_root),
                     "--backbones", "smallcnn", "--out", str(out), "--work", str(work), *args])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in err, err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    assert not out.exists() and not work.exists()


def test_a_model_trained_with_another_datasets_faces_is_not_tested_on_them(tmp_path, data_root, keys, capsys):
    """`train --extra-train fer2013`: FER2013's training faces of the run's classes join CK+48's
    training part; the run says so, and evaluating on FER2013 tests only its unseen PrivateTest."""
    from emoshield.cli import main

    out = tmp_path / "joined"
    command = ["train", "--dataset", "ckplus48", "--data-root", str(data_root), "--protocol", "subject",
               "--classes", "happy,sad,surprise", "--limit-per-class", "12", "--extra-train", "fer2013",
               "--backbone", "smallcnn", "--input-size", "32", "--epochs", "1", "--out", str(out), "--quiet"]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "ckplus48 (+ fer2013 faces in training) (3 classes" in captured.out
    # resumed with other data, split.json would no longer say what the model saw: refused
    without_extra = [a for a in command if a not in ("--extra-train", "fer2013")]
    saved = (out / "split.json").read_bytes()
    for other in (without_extra, command + ["--fold", "1"]):  # no fer2013 faces; another fold's people
        assert main(other + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert "started on other images" in err and len(err.strip().splitlines()) == 1, err
        assert main(other) == 2  # without --resume: refused before split.json is rewritten
        assert "already holds a training checkpoint" in capsys.readouterr().err
        assert (out / "split.json").read_bytes() == saved
    assert main(command + ["--resume"]) == 0
    capsys.readouterr()
    run_json = json.loads((out / "run.json").read_text())
    split = json.loads((out / "split.json").read_text())
    extra = split["extra_train"][0]
    assert run_json["extra_train"] == ["fer2013"] and run_json["data_options"]["extra_train"] == ["fer2013"]
    assert run_json["counts"]["train"] == split["counts"]["train"] + extra["count"] == \
        split["counts"]["train"] + len(extra["entries"])
    assert {e["source_split"] for e in extra["entries"]} == {"train"}
    assert main(["evaluate", "--model", str(out), "--dataset", "fer2013", "--data-root", str(data_root),
                 "--protocol", "all", "--out", str(tmp_path / "leak")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "were in this model's training or validation data" in err, err
    assert main(["evaluate", "--model", str(out), "--dataset", "fer2013", "--data-root", str(data_root),
                 "--protocol", "official", "--out", str(tmp_path / "fer")]) == 0
    metrics = json.loads((tmp_path / "fer" / "metrics.json").read_text())
    private_test = len(list((data_root / "fer2013" / "test").glob("[hs]*/*")))  # happy, sad, surprise
    assert metrics["extra_train"] == ["fer2013"] and metrics["num_images"] == private_test > 0
    # the signed bundle's record of the training data names them too
    from emoshield.tiers.bundle import verify_bundle

    assert main(["bundle", "export", "--model", str(out), "--key", str(keys / "private.key"),
                 "--out", str(tmp_path / "bundle"), "--calibration-images", "8"]) == 0
    assert verify_bundle(tmp_path / "bundle", keys / "public.key")["training"]["extra_train"] == ["fer2013"]


@pytest.mark.parametrize("refresh", ["nan", "-1", "inf", "1e9"])
def test_cloud_serve_refuses_a_refresh_it_cannot_keep(refresh, capsys):
    from emoshield.cli import main

    assert main(["cloud", "serve", "--database", "sqlite://", "--refresh", refresh]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"emoshield: error: --refresh must be between 0 and 86400 seconds, not {float(refresh):g}"


def test_wrong_weights_file_is_named(tmp_path, data_root):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    proc = run("train", "--dataset", "ckplus48", "--data-root", data_root, "--limit-per-class", "10",
               "--backbone", "smallcnn", "--weights", bad, "--epochs", "1", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and f"{bad} is not a valid safetensors weights file" in proc.stderr


def test_another_dataset_is_tested_on_the_model_classes_it_has(tmp_path, data_root):
    """A 7-class JAFFE model on CK+48 (no neutral faces): every CK+48 face of the other six, labels
    indexed by the model's own class list, the absent class named; none in common: one clear error."""
    from emoshield.errors import EmoshieldError
    from emoshield.models import ModelConfig, build_model, save_model
    from emoshield.pipeline import DataOptions, _decode_for, model_test_data

    classes = ["neutral", "happy", "surprise"]
    folder = tmp_path / "jaffe-model"
    folder.mkdir()
    save_model(build_model(ModelConfig(backbone="smallcnn", classes=classes, input_size=32)), folder / "model.safetensors")
    data = DataOptions(dataset="ckplus48", data_root=data_root, protocol="all")
    model, records, root, meta = model_test_data(folder, data)
    assert meta["classes"] == classes and meta["classes_absent_from_dataset"] == ["neutral"]
    assert {r.label for r in records} == {"happy", "surprise"} and len(records) > 100
    test, _ = _decode_for(model, records[:20], root, classes)
    assert set(test.labels.tolist()) <= {1, 2}  # indices into the model's classes, never neutral's 0
    from emoshield.evaluation.report import describe_run

    assert "no images of neutral" in describe_run({**meta, "weights": "scratch", "epochs": 1, "seed": 0})
    faces = tmp_path / "faces"
    for cls in ("angry", "sad"):  # none of neutral, happy, surprise
        (faces / cls).mkdir(parents=True)
        cv2.imwrite(str(faces / cls / "a.png"), np.full((32, 32), 128, np.uint8))
    with pytest.raises(EmoshieldError, match="none of the model's classes"):
        model_test_data(folder, DataOptions(dataset="folder", data_root=str(faces), protocol="all"))


def test_a_busy_cpu_and_several_torch_threads_give_one_hint_line(tmp_path, capsys, monkeypatch):
    import os

    import torch

    from emoshield.cli import busy_cpu_hint, main

    assert busy_cpu_hint(1, 9.0, 2) is None  # one thread: nothing to wait on
    assert busy_cpu_hint(2, 0.3, 2) is None  # an idle machine
    assert "load 1.6 on 2 cores" in busy_cpu_hint(2, 1.6, 2) and "OMP_NUM_THREADS=1" in busy_cpu_hint(2, 1.6, 2)
    monkeypatch.setenv("EMOSHIELD_HINTS", "1")  # the suite turns hints off (conftest)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("emoshield: note: the CPU is busy (load 7.0 on") and err[1].startswith("emoshield: error")
    assert main(["models", "list"]) == 0 and "CPU is busy" not in capsys.readouterr().err  # no compute: no hint
    monkeypatch.setenv("EMOSHIELD_HINTS", "0")
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "CPU is busy" not in capsys.readouterr().err


def test_every_cloud_lever_parses_as_a_pretrain_command_and_float32_turns_amp_off():
    """bench/cloud_levers.py's variants are `emoshield cloud pretrain` flag lists: each must parse and
    differ from the baseline (the baseline from nothing), and the float32 lever must undo its --amp."""
    import importlib.util

    from emoshield.cli import build_parser
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("cloud_levers", ROOT / "bench" / "cloud_levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    parse = build_parser().parse_args
    base = parse(["cloud", "pretrain", *levers.variant_args("baseline", 30), "--name", "x"])
    assert base.amp is True and base.epochs == 30 and base.backbone == "smallcnn"
    for name in levers.LEVERS:
        args = parse(["cloud", "pretrain", *levers.variant_args(name, 30), "--name", "x"])
        changed = {k for k, v in vars(args).items() if vars(base).get(k) != v and k != "func"}
        assert bool(changed) == (name != "baseline"), (name, changed)
    assert parse(["cloud", "pretrain", *levers.variant_args("float32", 30), "--name", "x"]).amp is False
    assert parse(["cloud", "pretrain", *levers.variant_args("schedule-2x", 30), "--name", "x"]).epochs == 60


def test_the_lever_table_states_the_spread_over_the_baseline_seeds():
    """The other-seed rows of the baseline (baseline-seed1, -seed2) are the noise the one-seed
    differences carry: levers.md gives their sample standard deviation once two seeds are in,
    from the committed table's own rows."""
    import argparse
    import importlib.util
    import statistics

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("cloud_levers", ROOT / "bench" / "cloud_levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    assert levers.SEED_ROWS == ("baseline-seed1", "baseline-seed2")
    runs = json.loads((ROOT / "results" / "cloud_levers" / "levers.json").read_text())["runs"]
    args = argparse.Namespace(epochs=30, limit_per_class=None, work="w", out="o")
    rows = {r["name"]: r for r in runs}
    seeds = [rows[n] for n in ("baseline", *levers.SEED_ROWS) if n in rows]
    assert len(seeds) >= 2  # the committed table has seed 1 at least
    expected = 100 * statistics.stdev(r["public_test"] for r in seeds)
    assert levers.seed_spread(rows) == pytest.approx(expected)
    assert f"sample standard deviation of {expected:.2f} points on PublicTest" in levers.markdown(runs, args)
    alone = [r for r in runs if r["name"] not in levers.SEED_ROWS]
    assert levers.seed_spread({r["name"]: r for r in alone}) is None
    assert "Run-to-run spread measured" not in levers.markdown(alone, args)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.one_of(
    st.text(max_size=30), st.just("[" * 50_000),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                 max_leaves=8).map(json.dumps),
    st.builds(lambda key, value: json.dumps({"backbone": "smallcnn", "classes": ["a", "b"], "input_size": 32, key: value}),
              st.sampled_from(["backbone", "classes", "input_size", "head", "pooling", "hidden", "dropout", "mean", "std",
                               "align", "unknown"]),
              st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.text(max_size=6),
                        st.lists(st.integers(-2, 2), max_size=4)))))
def test_a_model_file_with_any_config_loads_or_is_refused_in_one_line(tmp_path_factory, config):
    """A safetensors file whose emoshield config was edited, cut or written elsewhere: load_model
    rebuilds the model or says in one line what is wrong, never a TypeError from deep inside."""
    import torch
    from safetensors.torch import save_file

    from emoshield.errors import EmoshieldError
    from emoshield.models.network import load_model

    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"config": config})
    try:
        load_model(path)
    except EmoshieldError as error:
        assert "\n" not in str(error) and str(path) in str(error)


@pytest.mark.parametrize("field, value", [("dropout", 1.0), ("dropout", -0.1), ("hidden", 0)])
def test_a_model_that_load_model_would_refuse_is_not_built(field, value):
    """Training refuses at once the head settings load_model refuses, instead of saving a model
    that no later command could load."""
    from emoshield.errors import EmoshieldError
    from emoshield.models import ModelConfig, build_model

    with pytest.raises(EmoshieldError, match="dropout .* hidden width"):
        build_model(ModelConfig(backbone="smallcnn", classes=["a", "b"], input_size=32, **{field: value}))
