"""AutoAttack's attacks (APGD-CE, APGD-T, FAB-T, Square) against an independent implementation
(torchattacks 3.5.1) on a small model trained on real CK+48 faces, APGD's step-size rule as the
paper states it, the gradient-masking checks, and the evaluation fixes of the robustness
review (distinct worst-case keys, float32 attack passes, exact GPU resume state)."""

import pytest
import torch
import torchattacks  # the independent reference (make setup installs it): missing, the suite fails, never skips

from emoshield.attacks import APGD, APGDT, FABT, PGD, AutoAttack, Square, worst_case_correct
from emoshield.attacks.apgd import halve_step
from emoshield.attacks.base import attack_context
from tests.conftest import FIVE, small_trained_model


@pytest.fixture(scope="module")
def five_classes(data_root):
    """smallcnn at 32 px trained on CK+48's five reference classes, and 32 of its test faces."""
    return small_trained_model(data_root, FIVE, 8, 32)


def robust(model, adv, y) -> int:
    with torch.no_grad():
        return int((model(adv).argmax(1) == y).sum())


EPS = 0.005


def test_each_attack_matches_torchattacks_on_a_trained_model(five_classes):
    model, x, y = five_classes
    clean = robust(model, x, y)
    assert clean >= 24  # a model that learned something (32 faces, 5 classes)
    pairs = {  # same settings on both sides; 2 targets (torchattacks derives them from n_classes - 1)
        "apgd-ce": (APGD(EPS, steps=10), torchattacks.APGD(model, eps=EPS, steps=10, n_restarts=1, loss="ce")),
        "apgd-t": (APGDT(EPS, steps=10, targets=2),
                   torchattacks.APGDT(model, eps=EPS, steps=10, n_restarts=1, n_classes=3)),
        "fab-t": (FABT(EPS, steps=10, targets=2),
                  torchattacks.FAB(model, eps=EPS, steps=10, n_restarts=1, multi_targeted=True, n_classes=3)),
        # random search needs a larger ball to succeed within a test's query budget
        "square": (Square(4 * EPS, queries=150), torchattacks.Square(model, eps=4 * EPS, n_queries=150, n_restarts=1)),
    }
    for name, (ours, theirs) in pairs.items():
        adv = ours(model, x, y)
        assert (adv - x).abs().max() <= ours.eps + 1e-6 and 0 <= adv.min() and adv.max() <= 1, name
        a, b = robust(model, adv, y), robust(model, theirs(x, y), y)
        assert abs(a - b) <= 1, f"{name}: {a} robust here, {b} in torchattacks (of {len(y)})"
        assert a < clean, f"{name} fooled nothing"


def test_autoattack_is_the_per_sample_worst_case_of_its_attacks(five_classes):
    model, x, y = five_classes
    attack = AutoAttack(EPS, steps=10, queries=150, targets=2)
    adv = attack(model, x, y)
    stages = attack.stages()
    assert list(stages) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    values = list(stages.values())
    assert values == sorted(values, reverse=True)  # each attack only on what the earlier ones left
    assert stages["square"] == pytest.approx(robust(model, adv, y) / len(y))
    assert stages["square"] <= robust(model, APGD(EPS, steps=10)(model, x, y), y) / len(y)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert ((adv - x).abs().flatten(1).amax(1)[~fooled] == 0).all()  # unbroken images are returned as they were


def test_apgd_t_is_skipped_below_four_classes_and_says_so():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    attack = AutoAttack(0.03, steps=5, queries=20)
    attack(model, x, y)
    assert "4 classes" in attack.skipped["apgd-t"] and attack.stages()["apgd-t"] == attack.stages()["apgd-ce"]
    with pytest.raises(Exception, match="at least 4 classes"):
        APGDT(0.03, steps=5)(model, x, y)


def test_apgd_halves_its_step_by_the_paper_rule():
    rising = [torch.tensor([float(v)]) for v in range(6)]  # 5 comparisons, 5 rises
    no, yes = torch.tensor([False]), torch.tensor([True])
    best = torch.tensor([5.0])
    # rises in more than rho * k of the k steps and the best loss rose: keep the step
    assert not halve_step(rising, 0.75, no, torch.tensor([4.0]), best)
    # 3 rises of 5 comparisons (<= 0.75 * 5): halve
    three = [torch.tensor([v]) for v in (0.0, 1.0, 0.5, 1.5, 2.0, 1.8)]
    assert halve_step(three, 0.75, yes, torch.tensor([0.0]), torch.tensor([2.0]))
    # 4 rises of 5 (> 3.75): keep, even though the window before it counted one rise more
    four = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 1.5, 3.0, 4.0)]
    assert not halve_step(four, 0.75, yes, torch.tensor([3.0]), torch.tensor([4.0]))
    # best loss unchanged: halve only when the step was NOT halved at the previous checkpoint
    assert halve_step(rising, 0.75, no, best, best)
    assert not halve_step(rising, 0.75, yes, best, best)  # the old rule halved here too


def test_worst_case_keeps_attacks_that_differ_only_by_seed_apart(five_classes):
    model, x, y = five_classes
    correct = worst_case_correct(model, x, y, [PGD(EPS, steps=3, seed=0), PGD(EPS, steps=3, seed=1),
                                               PGD(EPS, steps=3, seed=1)])
    keys = [k for k in correct if k.startswith("PGD")]
    assert len(keys) == 3 and len(set(keys)) == 3 and any("seed=1" in k for k in keys)
    worst = correct["clean"].clone()
    for key in keys:
        worst &= correct[key]
    assert torch.equal(worst, correct["worst_case"])


def test_attack_passes_run_in_full_float32_and_the_callers_setting_comes_back():
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        model = torch.nn.Linear(2, 2)
        with attack_context(model):
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul


def test_a_checkpoint_keeps_the_grad_scaler_state(tmp_path):
    from emoshield.training.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for _ in range(4):  # moves the growth tracker and the scale
        optimizer.zero_grad()
        scaler.scale(model(torch.rand(4, 3)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    save_checkpoint(tmp_path, model, optimizer, torch.Generator(), {"epoch": 1}, scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    load_checkpoint(tmp_path, model, optimizer, torch.Generator(), fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() != 1024.0


class Rounding(torch.nn.Module):
    """Rounds its input: zero input gradients everywhere, a masked model by construction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


def test_square_breaking_what_gradients_cannot_is_flagged_as_gradient_masking():
    """A model that rounds its input has zero input gradients: APGD is stuck, Square is not."""
    from emoshield.evaluation.robustness import robustness_report

    model = Rounding().eval()
    pixels = torch.randint(0, 256, (32, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        labels = model(pixels.float() / 255).argmax(1)  # clean accuracy 100% by construction
    report = robustness_report(model, pixels, labels, list("abcd"), ["apgd", "square"], [0.1], apgd_steps=10,
                               square_queries=200)
    assert report["attacks"]["apgd"]["0.1"]["accuracy"] > report["attacks"]["square"]["0.1"]["accuracy"] + 0.2
    assert any("gradient-free Square" in f and "masked" in f for f in report["sanity_flags"])
    assert any("exactly zero" in f for f in report["sanity_flags"])


def test_the_sweep_flag_needs_apgd_to_stay_up_too():
    """PGD's fixed step can stall at large eps on a model APGD breaks: no masking flag then."""
    from emoshield.evaluation.robustness import result_flags

    def report(**checks):
        return {"masking_checks": {"sweep": {"0.03": 0.5, "0.1": 0.3}, **checks}, "attacks": {},
                "clean_accuracy": 1.0, "num_images": 10}

    def sweep_flags(r):
        return [f for f in result_flags(r) if f.startswith("PGD leaves")]

    assert sweep_flags(report()) == ["PGD leaves 30.0% accuracy at eps 0.1: accuracy must reach ~0 as eps grows; "
                                     "the gradients may be masked"]
    assert sweep_flags(report(sweep_apgd={"0.1": 0.01})) == []
    assert sweep_flags(report(sweep_apgd={"0.1": 0.2})) == [
        "PGD leaves 30.0% accuracy at eps 0.1 and APGD-CE 20.0%: accuracy must reach ~0 as eps grows; "
        "the gradients may be masked"]
    assert sweep_flags({**report(), "masking_checks": {"sweep": {"0.1": 0.05}}}) == []


def test_apgd_follows_a_sweep_that_stays_up_and_only_then(five_classes):
    """Zero input gradients: PGD and APGD both stay at 100%, flagged with both figures; a model whose
    sweep reaches the floor gets no follow-up run."""
    from emoshield.evaluation.robustness import robustness_report

    model = Rounding().eval()
    pixels = torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        labels = model(pixels.float() / 255).argmax(1)
    report = robustness_report(model, pixels, labels, list("abcd"), ["fgsm"], [0.01], apgd_steps=5, pgd_steps=3,
                               masking_sweep=(0.05, 0.1))
    pgd, apgd = report["masking_checks"]["sweep"]["0.1"], report["masking_checks"]["sweep_apgd"]["0.1"]
    assert pgd > 0.5 and apgd > 0.5  # PGD's random start moves a few; no gradient to follow from there
    assert f"PGD leaves {pgd:.1%} accuracy at eps 0.1 and APGD-CE {apgd:.1%}: accuracy must reach ~0" in \
        " ".join(report["sanity_flags"])

    model, x, y = five_classes
    pixels = (x * 255).round().to(torch.uint8)
    report = robustness_report(model, pixels, y, FIVE.split(","), ["fgsm"], [0.01], apgd_steps=5, pgd_steps=3,
                               masking_sweep=(0.5,))
    assert report["masking_checks"]["sweep"]["0.5"] <= 0.1 and "sweep_apgd" not in report["masking_checks"]


def test_a_robustness_report_with_autoattack_shows_each_stage(five_classes):
    from emoshield.evaluation.report import robustness_markdown
    from emoshield.evaluation.robustness import robustness_report

    model, x, y = five_classes
    pixels = (x * 255).round().to(torch.uint8)
    report = robustness_report(model, pixels, y, FIVE.split(","), ["autoattack"], [0.01], square_queries=50,
                               autoattack_steps=5, pgd_steps=3)
    entry = report["attacks"]["autoattack"]["0.01"]
    assert list(entry["stages"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert entry["accuracy"] == pytest.approx(entry["stages"]["square"])
    assert entry["stages"]["clean"] == pytest.approx(report["clean_accuracy"])
    assert report["settings"]["square_queries"] == 50 and report["settings"]["autoattack_steps"] == 5
    meta = {"dataset": "ckplus48", "classes": FIVE.split(","), "protocol": "reference", "backbone": "smallcnn",
            "head": "localization", "weights": "scratch", "input_size": 32, "epochs": 8, "seed": 0}
    markdown = robustness_markdown(report, meta)
    assert "| **AutoAttack** (standard) |" in markdown
    # each attack's cost is kept: the stages' seconds sum to at most the whole attack's
    parts = entry["stage_seconds"]
    assert list(parts) == ["apgd-ce", "apgd-t", "fab-t", "square"] and all(v >= 0 for v in parts.values())
    assert sum(parts.values()) <= entry["seconds"] + 0.05 and entry["seconds"] > 0
    assert "## Attack cost" in markdown and "AutoAttack eps 0.01:" in markdown
