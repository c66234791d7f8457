import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emoshield.errors import EmoshieldError
from emoshield.models import ModelConfig, build_model
from emoshield.training import TensorData, TrainConfig, Trainer
from emoshield.training.augment import augment_batch, mix_batch

TRAIN_ARGS = ["--dataset", "ckplus48", "--classes", "happy,sad,surprise", "--limit-per-class", "60",
              "--backbone", "smallcnn", "--epochs", "10", "--batch-size", "16", "--quiet"]


def _toy_data(n=64, seed=0):
    """Two separable classes: bright vs dark images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels.view(-1, 1, 1, 1) == 1, 170, 60)
    pixels = (base + torch.randint(-40, 40, (n, 1, 24, 24), generator=g)).clamp(0, 255).to(torch.uint8)
    return TensorData(pixels, labels)


def test_trainer_learns_and_selects_best_epoch(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig("smallcnn", ["happy", "sad"], 24))
    saved = []
    trainer = Trainer(model, TrainConfig(epochs=8, batch_size=16, schedule="constant", augment="flip"), tmp_path,
                      save_best=lambda m: saved.append(m.head.fc2.weight.detach().clone()), progress=False,
                      log=lambda _m: None)
    result = trainer.fit(_toy_data(), _toy_data(32, seed=1))
    assert [r["epoch"] for r in result.history] == list(range(1, 9))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # BatchNorm's running statistics need a few epochs before eval-mode accuracy catches up
    assert result.best_val_score == max(r["val_accuracy"] for r in result.history) >= 0.9
    best = result.history[result.best_epoch - 1]
    assert all(r["val_accuracy"] < best["val_accuracy"] or r["val_loss"] >= best["val_loss"] for r in result.history)
    assert saved and json.loads((tmp_path / "history.json").read_text()) == result.history


def test_the_model_trains_in_the_layout_asked_for_and_saves_plain_tensors(tmp_path):
    for layout, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        torch.manual_seed(0)
        model = build_model(ModelConfig("smallcnn", ["happy", "sad"], 24))
        result = Trainer(model, TrainConfig(epochs=2, batch_size=16, memory_format=layout), tmp_path / layout,
                         progress=False, log=lambda _m: None).fit(_toy_data(), None)
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
        saved = load_file(str(tmp_path / layout / "checkpoint.safetensors"))
        assert all(t.is_contiguous() for t in saved.values())


def test_existing_checkpoint_needs_resume(tmp_path):
    model = build_model(ModelConfig("smallcnn", ["happy", "sad"], 24))
    Trainer(model, TrainConfig(epochs=1, batch_size=16), tmp_path, progress=False, log=lambda _m: None).fit(
        _toy_data(), None)
    with pytest.raises(EmoshieldError, match="pass --resume"):
        Trainer(model, TrainConfig(epochs=1, batch_size=16), tmp_path, progress=False).fit(_toy_data(), None)
    with pytest.raises(EmoshieldError, match="other training options"):
        Trainer(model, TrainConfig(epochs=2, batch_size=8), tmp_path, progress=False,
                log=lambda _m: None).fit(_toy_data(), None, resume=True)


def test_bad_training_options_are_refused():
    for bad in (dict(epochs=0), dict(batch_size=1), dict(lr=0), dict(optimizer="rmsprop"), dict(augment="mix"),
                dict(memory_format="nhwc"), dict(mix="mosaic"), dict(mix="mixup", mix_alpha=0),
                dict(mix_alpha=float("nan")), dict(label_smoothing=1.0), dict(label_smoothing=-0.1)):
        with pytest.raises(EmoshieldError):
            TrainConfig(**bad).validate()


def test_augmentation_is_seeded_and_keeps_range():
    x = torch.rand(8, 3, 32, 32)
    a = augment_batch(x, "standard", torch.Generator().manual_seed(1))
    b = augment_batch(x, "standard", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, x)
    flipped = augment_batch(x, "flip", torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))


def test_strong_augmentation_erases_rectangles_and_jitters_light():
    x = torch.rand(64, 1, 32, 32)
    a = augment_batch(x, "strong", torch.Generator().manual_seed(3))
    assert torch.equal(a, augment_batch(x, "strong", torch.Generator().manual_seed(3)))
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    # an erased rectangle is one constant value over >= 4% of the pixels; random pixels never repeat so
    # often (0 and 1 do: jitter clips there)
    top_share = torch.tensor([v[(v > 0) & (v < 1)].unique(return_counts=True)[1].max() / v.numel()
                              for v in a.flatten(1)])
    erased = top_share >= 0.04
    assert 16 <= int(erased.sum()) <= 48  # about half the batch
    assert (top_share[~erased] < 0.01).all()
    # lighting: a flat grey face comes out brighter or darker, within +-25%
    lit = augment_batch(torch.full((64, 1, 32, 32), 0.5), "strong", torch.Generator().manual_seed(4))
    means = lit.mean(dim=(1, 2, 3))
    assert means.std() > 0.03 and 0.5 * 0.75 - 1e-6 <= means.min() and means.max() <= 0.5 * 1.25 + 1e-6


def test_mixup_blends_pairs_and_cutmix_weighs_labels_by_the_pixels_they_own():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 24, 24, generator=g)
    y = torch.arange(16)
    same = [mix_batch(x, y, "mixup", 0.4, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(same[0][0], same[1][0]) and same[0][3] == same[1][3]  # seeded: a resume repeats it
    mixed, ya, yb, lam = same[0]
    assert 0 < lam < 1 and torch.equal(ya, y) and sorted(yb.tolist()) == y.tolist()
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[yb], atol=1e-6)  # yb = y[partner] = partner here
    lams = []
    for seed in range(20):
        mixed, ya, yb, lam = mix_batch(x, y, "cutmix", 1.0, torch.Generator().manual_seed(seed))
        own = (mixed == x).flatten(1).float().mean(1)  # random pixels: only the kept ones equal the original
        pasted = (mixed == x[yb]).flatten(1).float().mean(1)
        moved = yb != y
        assert torch.allclose(own[moved], torch.full_like(own[moved], lam), atol=1e-6)
        assert torch.allclose(pasted[moved], torch.full_like(pasted[moved], 1 - lam), atol=1e-6)
        lams.append(lam)
    assert 0.2 < sum(lams) / len(lams) < 0.8 and min(lams) < 0.5 < max(lams)  # Beta(1, 1) = uniform
    assert mix_batch(x, y, "none", 1.0, g)[0] is x
    with pytest.raises(EmoshieldError, match="unknown mix"):
        mix_batch(x, y, "mosaic", 1.0, g)


def test_training_with_cutmix_learns_and_resumes_exactly_and_refuses_the_defense(tmp_path):
    from emoshield.training import DefenseConfig

    class Stop(Exception):
        pass

    def stop_after_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise Stop  # after the epoch's checkpoint, like a SIGKILL between epochs

    def run(out, resume=False, log=lambda _m: None):
        torch.manual_seed(0)
        model = build_model(ModelConfig("smallcnn", ["happy", "sad"], 24))
        config = TrainConfig(epochs=4, batch_size=16, schedule="constant", augment="flip", mix="cutmix",
                             label_smoothing=0.1, optimizer="adamw", lr=0.003)
        result = Trainer(model, config, out, progress=False, log=log).fit(_toy_data(), None, resume=resume)
        return model, result

    whole, result = run(tmp_path / "whole")
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    with pytest.raises(Stop):
        run(tmp_path / "resumed", log=stop_after_epoch_2)
    resumed, result = run(tmp_path / "resumed", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    model = build_model(ModelConfig("smallcnn", ["happy", "sad"], 24))
    with pytest.raises(EmoshieldError, match="--mix is for undefended training"):
        Trainer(model, TrainConfig(epochs=1, batch_size=16, mix="mixup"), tmp_path / "defended", progress=False,
                log=lambda _m: None, defense=DefenseConfig()).fit(_toy_data(), None)


def test_the_width_and_depth_variants_of_the_vgg_style_net():
    from emoshield.models.backbones import backbone_spec, torchvision_parts

    sizes = {}
    for name, convs in (("smallcnn", 8), ("widecnn", 8), ("deepcnn", 12), ("widedeepcnn", 12)):
        features, _ = torchvision_parts(name)
        out = features(torch.zeros(1, 3, 48, 48))
        assert out.shape == (1, backbone_spec(name).feature_channels, 3, 3)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in features.modules()) == convs
        sizes[name] = sum(p.numel() for p in features.parameters())
    assert sizes["smallcnn"] == 1_173_216  # the shipped library entry's architecture, unchanged
    assert sizes["smallcnn"] < sizes["deepcnn"] < sizes["widecnn"] < 15e6 / 4  # float32 under 15 MB
    # both levers at once (bench/cloud_final.py takes it when both win): over 15 MB in float32
    assert 15e6 / 4 < sizes["widedeepcnn"] < 15e6 / 2


def _epoch_of(out):
    try:
        with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["state"])["epoch"]
    except Exception:
        return 0


def _cli(out, data_root, *extra):
    return [sys.executable, "-m", "emoshield", "train", *TRAIN_ARGS, "--data-root", str(data_root),
            "--out", str(out), *extra]


@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_nothing_lost(tmp_path, data_root):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, data_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _epoch_of(killed) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = _epoch_of(killed)
    assert 3 <= stopped_at < 10
    resumed = subprocess.run(_cli(killed, data_root, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from epoch {stopped_at} of 10" in resumed.stderr
    history = json.loads((killed / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 11))

    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, data_root), check=True, capture_output=True, timeout=300)
    a, b = load_file(str(killed / "checkpoint.safetensors")), load_file(str(straight / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in
                                                  json.loads((straight / "history.json").read_text())]


def test_the_lever_table_flags_rows_trained_in_another_precision_than_the_baseline():
    """A session on a CPU without native bfloat16 trains the remaining levers in float32: their rows
    must say their difference includes the precision's (the float32 lever's own row is that)."""
    import argparse
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("cloud_levers", ROOT / "bench" / "cloud_levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)

    def row(name, precision):
        return {"name": name, "change": "x", "backbone": "smallcnn", "parameters": 1e6, "epochs": 30, "seed": 0,
                "counts": {"train": 1, "val": 1, "test": 1}, "public_test": 0.6, "best_epoch": 3,
                "private_test": 0.6, "private_test_balanced": 0.6, "seconds_per_epoch": 100.0,
                "precision": precision, "device": "cpu"}

    args = argparse.Namespace(epochs=30, limit_per_class=None, work="w", out="o")
    same = levers.markdown([row("baseline", "bfloat16"), row("wider", "bfloat16"), row("float32", "float32")], args)
    assert "another precision" not in same
    mixed = levers.markdown([row("baseline", "bfloat16"), row("wider", "bfloat16"), row("mixup", "float32"),
                             row("float32", "float32")], args)
    assert "**Trained in another precision than the baseline (bfloat16): mixup**" in mixed
    # the last epoch's training accuracy beside PublicTest's shows the overfitting gap; a row saved
    # before training accuracy was kept shows an empty cell, not a made-up figure
    fitted = dict(row("schedule-2x", "bfloat16"), history=[{"epoch": 1, "train_accuracy": 0.5},
                                                           {"epoch": 2, "train_accuracy": 0.8914}])
    gaps = levers.markdown([row("baseline", "bfloat16"), fitted], args).splitlines()
    assert "| train (last epoch) |" in gaps[4]
    assert next(line for line in gaps if line.startswith("| baseline |")).split(" | ")[-4] == ""
    assert next(line for line in gaps if line.startswith("| schedule-2x |")).split(" | ")[-4] == "89.1"


def test_cloud_levers_bench_trains_one_change_at_a_time_and_resumes_without_retraining(tmp_path, data_root):
    """bench/cloud_levers.py on a slice of FER2013: each lever is the baseline's flags plus its own,
    the table has a row per lever, a re-run reuses the finished runs and a run of other epochs is refused."""
    from tests.conftest import ROOT

    bench = [sys.executable, str(ROOT / "bench" / "cloud_levers.py"), "--data-root", str(data_root), "--epochs", "1",
             "--limit-per-class", "6", "--only", "baseline,cutmix", "--work", str(tmp_path / "work"),
             "--out", str(tmp_path / "out"), "--device", "cpu"]
    from tests.conftest import hold_step

    holder = hold_step(tmp_path / "work" / "cutmix")  # another live process holds cutmix's training
    try:
        proc = subprocess.run(bench, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cutmix: training in another process" in proc.stdout and "left to other processes: cutmix" in proc.stdout
    partial = json.loads((tmp_path / "out" / "levers.json").read_text())
    levers = ["baseline", "wider", "schedule-2x", "augment-strong", "spatial-head", "deeper", "mixup",
              "baseline-seed1", "cutmix", "label-smoothing", "adamw", "float32", "baseline-seed2"]  # the order they train in
    others = [n for n in levers if n not in ("baseline", "cutmix")]
    # the table is the whole ablation's (whatever --only this process had): what is missing is pending
    assert partial["complete"] is False and partial["pending"] == levers[1:] and partial["levers"] == levers
    assert [r["name"] for r in partial["runs"]] == ["baseline"]
    assert "Still training (re-run the command to go on): wider, schedule-2x, augment-strong," in \
        (tmp_path / "out" / "levers.md").read_text()
    proc = subprocess.run(bench, capture_output=True, text=True, timeout=300)  # the holder is gone, its lock with it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trained = [line.split()[1] for line in proc.stdout.splitlines() if "cloud pretrain" in line]
    assert trained == ["cutmix:"]  # the baseline is not trained again
    result = json.loads((tmp_path / "out" / "levers.json").read_text())
    assert result["complete"] is False and result["pending"] == others
    base, cutmix = result["runs"]
    assert base["train_config"]["mix"] == "none" and cutmix["train_config"]["mix"] == "cutmix"
    assert {k: v for k, v in base["train_config"].items() if k not in ("mix", "mix_alpha")} == {
        k: v for k, v in cutmix["train_config"].items() if k not in ("mix", "mix_alpha")}
    assert base["precision"] in ("bfloat16", "float32") and 0 <= cutmix["private_test"] <= 1
    table = (tmp_path / "out" / "levers.md").read_text()
    assert "| baseline |" in table and "| cutmix |" in table and "a quick run, not a result" in table
    assert (tmp_path / "out" / "levers.png").stat().st_size > 0
    assert f"--work {tmp_path / 'work'} --out {tmp_path / 'out'}" in table  # the command that goes on
    written = (tmp_path / "out" / "levers.json").stat().st_mtime_ns
    again = subprocess.run([*bench[:9], "cutmix", *bench[10:]], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "cloud pretrain" not in again.stdout  # nothing retrained
    # nothing new: the table is not rewritten (an idle worker polls this), and --only cutmix keeps the baseline row
    assert (tmp_path / "out" / "levers.json").stat().st_mtime_ns == written
    assert [r["name"] for r in json.loads((tmp_path / "out" / "levers.json").read_text())["runs"]] == ["baseline", "cutmix"]
    # another work folder (a session on another machine): the table's rows are results, not retrained nor dropped
    elsewhere = subprocess.run([*bench[:11], str(tmp_path / "work2"), *bench[12:]], capture_output=True, text=True,
                               timeout=300)
    assert elsewhere.returncode == 0 and "cloud pretrain" not in elsewhere.stdout, elsewhere.stdout + elsewhere.stderr
    assert "baseline: in " in elsewhere.stdout and not (tmp_path / "work2" / "baseline").exists()
    assert json.loads((tmp_path / "out" / "levers.json").read_text()) == result
    other = subprocess.run([*bench[:5], "2", *bench[6:]], capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "is a table of" in other.stderr and other.stderr.strip().count("\n") == 0
    table = (tmp_path / "out" / "levers.json").read_bytes()
    for damaged in (b"<<<<<<< HEAD\n" + table, b'{"epochs": 1, "runs": [3]}'):  # e.g. a merge conflict
        (tmp_path / "out" / "levers.json").write_bytes(damaged)
        refused = subprocess.run(bench, capture_output=True, text=True, timeout=300)  # its rows would be lost
        assert refused.returncode != 0 and "repair or move it" in refused.stderr and "cloud pretrain" not in refused.stdout
        assert (tmp_path / "out" / "levers.json").read_bytes() == damaged
    (tmp_path / "out" / "levers.json").write_bytes(table)
    other = subprocess.run([*bench[:5], "2", *bench[6:13], str(tmp_path / "out2"), *bench[14:]], capture_output=True,
                           text=True, timeout=300)  # its own table, but WORK's runs are of 1 epoch: refused too
    assert other.returncode != 0 and "was trained with" in other.stderr and other.stderr.strip().count("\n") == 0


def test_the_backbone_cost_bench_times_every_backbone_and_thread_count(capsys, tmp_path):
    """bench/backbone_cost.py (what a FER2013 run costs per backbone): one line per backbone and
    thread count, its epoch figure 449 steps of the timed one; a bad thread count is a usage error."""
    import importlib.util
    import re

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("backbone_cost", ROOT / "bench" / "backbone_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--backbones", "smallcnn,deepcnn", "--threads", "1,all", "--repeats", "1", "--steps", "1",
                           "--batch-size", "4", "--input-size", "32", "--no-record"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    counts = sorted({1, len(os.sched_getaffinity(0))})
    assert [(line.split()[0], int(line.split()[2])) for line in lines] == [(b, n) for b in ("smallcnn", "deepcnn")
                                                                          for n in counts]
    for line in lines:
        ms, epoch = (float(v) for v in re.search(r"([\d.]+) ms/step.*?([\d.]+) s of steps", line).groups())
        assert ms > 0 and epoch == pytest.approx(ms / 1000 * 7178, rel=0.01, abs=1)  # 28,709 faces / batch 4
    for bad in (["--threads", "0"], ["--threads", "x"], ["--threads", "-1"], ["--threads", ","], ["--backbones", ","]):
        with pytest.raises(SystemExit):
            bench.main([*bad, "--no-record"])
    assert torch.get_num_threads() == threads  # main() leaves the caller's thread count as it was
    # recorded: the JSON rows (speedup over the fewest threads, ratio to the first backbone) and one
    # BENCHMARKS.md section with a row per backbone and thread count
    recorded = {}
    bench.ROOT = tmp_path
    bench.record = lambda section, keys, markdown: recorded.update(section=section, keys=keys, markdown=markdown)
    state = torch.random.get_rng_state()
    assert bench.main(["--backbones", "smallcnn,deepcnn", "--threads", "1,2", "--repeats", "1", "--steps", "1",
                       "--batch-size", "4", "--input-size", "32"]) == 0
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
    rows = json.loads((tmp_path / "bench" / "results" / "backbone_cost.json").read_text())["rows"]
    assert [(r["backbone"], r["threads"]) for r in rows] == [(b, n) for b in ("smallcnn", "deepcnn") for n in (1, 2)]
    by = {(r["backbone"], r["threads"]): r for r in rows}
    for (b, n), r in by.items():
        assert r["thread_speedup"] == pytest.approx(by[(b, 1)]["seconds_per_step"] / r["seconds_per_step"])
        assert r["vs_first_backbone"] == pytest.approx(r["seconds_per_step"] / by[("smallcnn", n)]["seconds_per_step"])
    assert recorded["section"] == "backbone_cost" and set(recorded["keys"]) == {
        "backbone_cost_smallcnn_epoch_seconds_2_threads", "backbone_cost_deepcnn_epoch_seconds_2_threads"}
    assert recorded["markdown"].count("\n| smallcnn |") == recorded["markdown"].count("\n| deepcnn |") == 2


def test_the_eta_is_not_inflated_by_one_paused_epoch():
    """The progress line's ETA: the median epoch so far times the epochs left. A run paused for 20
    minutes mid-epoch (SIGSTOP while CI ran beside it) showed "ETA 22:54:24" for a ~5 h run with the
    mean of the elapsed time."""
    from emoshield.training.trainer import eta_seconds

    steady = [180.0, 1500.0, 163.0, 182.0, 179.0]  # epoch 2 spanned the pause
    assert eta_seconds(steady, 95) == pytest.approx(180.0 * 95)
    assert eta_seconds([180.0, 1500.0], 10) == pytest.approx(840.0 * 10)  # two epochs: their mean, nothing better
    assert eta_seconds([100.0], 3) == 300.0
    assert eta_seconds([], 5) == 0.0 and eta_seconds([100.0], 0) == 0.0
