import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emoshield.attacks import FGSM, RFGSM
from emoshield.errors import EmoshieldError
from emoshield.evaluation.robustness import robustness_report
from emoshield.models import ModelConfig, build_model
from emoshield.training import DefenseConfig, TrainConfig, Trainer, parse_defense
from emoshield.training.trainer import frozen_batchnorm_stats
from tests.test_cli import run


def test_parse_defense():
    assert parse_defense("fgsm:0.5,rfgsm:0.5") == {"fgsm": 0.5, "rfgsm": 0.5}
    assert parse_defense("fgsm,rfgsm") == {"fgsm": 0.5, "rfgsm": 0.5}
    for bad, message in (("fgsm:0.5,cw:0.5", "unknown defense method 'cw'"), ("fgsm:x", "bad weight"),
                         ("fgsm:0.5,rfgsm", "every defense method or to none"), ("fgsm,fgsm", "given twice")):
        with pytest.raises(EmoshieldError, match=message):
            parse_defense(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta0=0.4), "beta0 must be in"),
    (dict(methods={"fgsm": 1.2, "rfgsm": -0.2}), "must be >= 0"),
    (dict(methods={"fgsm": 0.5, "rfgsm": 0.6}), "sum to 1"),
    (dict(eps=0.01, alpha=0.01), "larger than --alpha"),
    (dict(eps=0.01, alpha=0.02), "larger than --alpha"),
    (dict(select="best"), "--select"),
])
def test_bad_defense_settings_are_refused(kwargs, message):
    with pytest.raises(EmoshieldError, match=message):
        DefenseConfig(**kwargs).validate()


def _model_and_batch(n: int = 16):
    torch.manual_seed(0)
    model = build_model(ModelConfig("smallcnn", ["happy", "sad", "surprise"], 32))
    g = torch.Generator().manual_seed(1)
    return model.train(), torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_fused_fgsm_is_exact_and_attack_passes_leave_batchnorm_statistics_alone():
    model, x, y = _model_and_batch()
    x_clean = x.clone().requires_grad_(True)
    (0.5 * F.cross_entropy(model(x_clean), y)).backward()
    fused = (x + 0.01 * x_clean.grad.sign()).clamp(0, 1)
    stats = [b.clone() for b in model.buffers()]
    with frozen_batchnorm_stats(model):
        separate = FGSM(0.01, mode="keep")(model, x, y)
        RFGSM(0.01, mode="keep")(model, x, y)
    assert torch.equal(fused, separate)
    moved = [not torch.equal(a, b) for a, b in zip(stats, model.buffers())]
    assert not any(m for m, b in zip(moved, model.buffers()) if b.dtype.is_floating_point)
    assert model.features[1].momentum == 0.1, "momentum restored"


@pytest.mark.parametrize("attack_bn, batch", [("eval", 16), ("eval", 48), ("train", 16)],
                         ids=["eval-unfolded", "eval-folded", "train"])
def test_defended_step_gradient_equals_the_differential_loss_gradient(tmp_path, attack_bn, batch):
    """48 images x 2 attacks is over FOLD_MIN_GRADIENT_IMAGES: the BatchNorm-folded copy that
    production batches attack is what this case checks; 16 x 2 runs the module as it is."""
    from emoshield.attacks.folding import FOLD_MIN_GRADIENT_IMAGES

    assert (batch * 2 >= FOLD_MIN_GRADIENT_IMAGES) == (batch == 48)
    model, x, y = _model_and_batch(batch)
    start = copy.deepcopy(model)  # the model as it was at the start of the step
    defense = DefenseConfig(methods={"fgsm": 0.3, "rfgsm": 0.7}, beta0=0.6, eps=0.02, attack_bn=attack_bn)
    trainer = Trainer(model, TrainConfig(augment="none"), tmp_path, progress=False, defense=defense)
    trainer._defended_backward(x, y, seed=5)
    ours = [p.grad.clone() for p in model.parameters()]
    assert model.training
    model = start
    # the same quantities, step by step: perturbations from the model at the start of the step
    mode = "keep" if attack_bn == "train" else "eval"
    target = model
    if batch == 48:  # the folded copy of the start model: the same function up to float rounding,
        from emoshield.attacks.base import attack_context  # whose sign flips would blur the comparison
        from emoshield.attacks.folding import FoldedModel

        with attack_context(model, "eval"):
            target = FoldedModel(model).eval()
    with frozen_batchnorm_stats(model):
        x_fgsm = FGSM(0.02, mode=mode, fast=False)(target, x, y)
        x_rfgsm = RFGSM(0.02, mode=mode, seed=5, fast=False)(target, x, y)
    loss = 0.6 * F.cross_entropy(model(x), y) + 0.4 * (0.3 * F.cross_entropy(model(x_fgsm), y)
                                                        + 0.7 * F.cross_entropy(model(x_rfgsm), y))
    loss.backward()
    for a, p in zip(ours, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


def test_sanity_flags_catch_probabilities_zero_gradients_and_training_mode():
    torch.manual_seed(0)
    base = build_model(ModelConfig("smallcnn", ["happy", "sad"], 16)).eval()
    pixels = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 4)
    probs = torch.nn.Sequential(base, torch.nn.Softmax(dim=1))
    flags = robustness_report(probs, pixels, labels, ["happy", "sad"], ["fgsm"], [0.01])["sanity_flags"]
    assert any("probabilities" in f for f in flags)

    class Masked(torch.nn.Module):  # rounds its input: gradients are zero everywhere
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, x):
            return self.net(x + (torch.round(x * 4) / 4 - x))

    flags = robustness_report(Masked(), pixels, labels, ["happy", "sad"], [], [0.01])["sanity_flags"]
    assert any("gradients are exactly zero" in f for f in flags)
    base.train()
    flags = robustness_report(base, pixels, labels, ["happy", "sad"], [], [0.01])["sanity_flags"]
    assert any("training mode" in f for f in flags) and base.training


def test_defense_cli_end_to_end(tmp_path, data_root):
    common = ["train", "--dataset", "ckplus48", "--data-root", data_root, "--classes", "happy,sad,surprise",
              "--limit-per-class", "30", "--backbone", "smallcnn", "--input-size", "32", "--epochs", "3",
              "--batch-size", "32", "--quiet"]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--defense", "fgsm:0.5,rfgsm:0.5", "--beta0", "0.5", "--eps", "0.01", "--out", tmp_path / "def")
    history = json.loads((tmp_path / "def" / "history.json").read_text())
    assert {"val_fgsm_accuracy", "val_rfgsm_accuracy", "val_robust_accuracy", "val_differential_loss"} <= set(history[0])
    metrics = json.loads((tmp_path / "def" / "metrics.json").read_text())
    assert metrics["defense"]["methods"] == {"fgsm": 0.5, "rfgsm": 0.5} and metrics["defense"]["select"] == "mean"
    assert metrics["defense"]["attack_bn"] == "eval"

    out = tmp_path / "eval"
    run("evaluate", "--model", tmp_path / "def", "--baseline", tmp_path / "plain", "--attacks",
               "fgsm,rfgsm,pgd,apgd", "--eps", "0.005,0.01", "--apgd-steps", "5", "--pgd-steps", "3",
               "--corruptions", "jpeg,contrast", "--out", out)
    result = json.loads((out / "robustness.json").read_text())
    assert not (out / "partial").exists()  # the resume checkpoints go once the report is written
    rob = result["robustness"]
    assert set(rob["attacks"]) == {"fgsm", "rfgsm", "pgd", "apgd"} and set(rob["attacks"]["fgsm"]) == {"0.005", "0.01"}
    assert set(rob["corruptions"]) == {"jpeg", "contrast"} and len(rob["corruptions"]["jpeg"]) == 5
    for eps, worst in rob["worst_case"].items():
        assert worst["accuracy"] <= min(rob["attacks"][n][eps]["accuracy"] for n in rob["attacks"])
    fgsm = result["improvement"]["attacks"]["fgsm"]["0.01"]
    base_acc = result["baseline_robustness"]["attacks"]["fgsm"]["0.01"]["accuracy"]
    assert fgsm["baseline_accuracy"] == base_acc
    assert fgsm["points"] == pytest.approx((rob["attacks"]["fgsm"]["0.01"]["accuracy"] - base_acc) * 100)
    assert set(rob["per_class_accuracy"]["clean"]) == {"happy", "sad", "surprise"}
    # gradient-masking checks: PGD at growing eps, and PGD transferred from the undefended baseline
    checks = rob["masking_checks"]
    assert list(checks["sweep"]) == ["0.03", "0.05", "0.1"] and set(checks["transfer"]) == {"0.005", "0.01"}
    assert checks["sweep"]["0.1"] <= checks["sweep"]["0.03"] <= rob["attacks"]["pgd"]["0.01"]["accuracy"] + 0.02
    assert all(0 <= v["accuracy"] <= 1 for v in checks["transfer"].values())
    report = (out / "report.md").read_text()
    for row in ("| FGSM |", "| R+FGSM |", "| Average |", "| PGD-3 |", "| APGD-CE-5 |", "Worst case", "## Gradient-masking checks", "## Sanity flags"):
        assert row in report, row
    assert "%)" in report and ("↑" in report or "↓" in report or "=" in report)
    for png in ("accuracy_vs_eps.png", "accuracy_bars.png", "per_class_boxes.png", "confusion_matrix.png"):
        assert (out / png).stat().st_size > 1000, png
    _recheck_an_old_report_whose_sweep_stayed_up(out, tmp_path / "def", tmp_path / "plain")

    sweep = tmp_path / "sweep"
    run("sweep", "--model", tmp_path / "def", "--attack", "fgsm", "--eps", "0:0.02:0.01", "--out", sweep)
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert [p["eps"] for p in points] == [0.0, 0.01, 0.02]
    assert points[0]["accuracy"] >= points[-1]["accuracy"] and (sweep / "sweep.png").is_file()


def test_bad_defense_cli_fails_before_any_work(tmp_path):
    proc = run("train", "--dataset", "ckplus48", "--defense", "fgsm:0.5,rfgsm:0.6", "--out", tmp_path / "o",
               check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "emoshield: error: defense weights must sum to 1, got 1.1 ({'fgsm': 0.5, 'rfgsm': 0.6})")
    assert not (tmp_path / "o").exists()


def _recheck_an_old_report_whose_sweep_stayed_up(out, model, baseline):
    """scripts/recheck_masking.py on a report as the code before the APGD follow-up wrote it, with
    PGD's sweep stuck at 50% at eps 0.1 for the model and its baseline: APGD-CE is run there on the
    real models (the baseline on the model's images), the flag goes only if it reaches the floor,
    every other number and flag stays; another model, other images, a missing baseline are refused."""
    import subprocess
    import sys

    from emoshield.evaluation.robustness import MASKING_FLOOR, result_flags

    path = out / "robustness.json"
    result = json.loads(path.read_text())
    in_run, kept_flags = {}, {}
    for key in ("robustness", "baseline_robustness"):
        rob = result[key]
        in_run[key] = rob["masking_checks"].pop("sweep_apgd", None)  # what the run's own follow-up found, if any
        rob["sanity_flags"] = [f for f in rob["sanity_flags"] if not f.startswith("PGD leaves")]
        kept_flags[key] = list(rob["sanity_flags"])  # model flags and (model's) transfer flags: must stay as they are
        rob["masking_checks"]["sweep"]["0.1"] = 0.5
        old_flag = [f for f in result_flags(rob) if f.startswith("PGD leaves 50.0%")]
        assert old_flag and "APGD-CE" not in old_flag[0]
        rob["sanity_flags"] = old_flag + rob["sanity_flags"]
    untouched = {k: {n: v for n, v in r.items() if n not in ("masking_checks", "sanity_flags")}
                 for k, r in result.items() if k in ("robustness", "baseline_robustness")}
    path.write_text(json.dumps(result))
    stale = path.read_text()
    root = Path(__file__).parents[1]

    def recheck(*args):
        return subprocess.run([sys.executable, "scripts/recheck_masking.py", "--out", str(out), *map(str, args)],
                              capture_output=True, text=True, cwd=root)

    missing = recheck("--model", model)  # the baseline's sweep needs it too
    assert missing.returncode == 2 and "pass --baseline" in missing.stderr and path.read_text() == stale
    swapped = recheck("--model", baseline, "--baseline", model)  # not the models the report names
    assert swapped.returncode == 2 and "is not the model the report evaluated" in swapped.stderr
    assert len(swapped.stderr.strip().splitlines()) == 1 and path.read_text() == stale
    done = recheck("--model", model, "--baseline", baseline)
    assert done.returncode == 0, done.stderr
    rechecked = json.loads(path.read_text())
    for key in ("robustness", "baseline_robustness"):
        rob = rechecked[key]
        apgd = rob["masking_checks"]["sweep_apgd"]["0.1"]
        assert in_run[key] is None or in_run[key] == {"0.1": apgd}  # the same APGD-CE (seeded) as the evaluation's
        assert rob["masking_checks"]["sweep_apgd_by"]  # the commit that added it (the attacks ran at evaluated_by)
        sweep_flags = [f for f in rob["sanity_flags"] if f.startswith("PGD leaves")]
        assert sweep_flags == ([f"PGD leaves 50.0% accuracy at eps 0.1 and APGD-CE {apgd:.1%}: accuracy must reach ~0 "
                                "as eps grows; the gradients may be masked"] if apgd > MASKING_FLOOR else [])
        assert [f for f in rob["sanity_flags"] if not f.startswith("PGD leaves")] == kept_flags[key]
        assert {n: v for n, v in rob.items() if n not in ("masking_checks", "sanity_flags")} == untouched[key]
        assert f"{key}: APGD-CE at eps 0.1: {apgd:.2%}" in done.stdout
    assert "APGD-CE (adaptive step)" in (out / "report.md").read_text()
    again = recheck("--model", model, "--baseline", baseline)
    assert again.returncode == 0 and "nothing to add" in again.stdout
    result = json.loads(path.read_text())  # a report of other images (per-class figures differ): refused
    del result["robustness"]["masking_checks"]["sweep_apgd"]
    first = next(iter(result["robustness"]["per_class_accuracy"]["clean"]))
    result["robustness"]["per_class_accuracy"]["clean"][first] = 0.123
    path.write_text(json.dumps(result))
    refused = recheck("--model", model, "--baseline", baseline)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "not the images" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and json.loads(path.read_text()) == result
