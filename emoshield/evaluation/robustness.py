"""Robustness of a model: accuracy under attacks at several eps, worst case over attacks,
camera corruptions, per-class figures, comparison with a baseline, and sanity flags in the
spirit of AutoAttack/RobustBench (the checks that catch gradient masking)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..attacks import corrupt, make_attack
from ..attacks.base import attack_context
from ..attacks.folding import eval_graph
from ..attacks.registry import LABELS, correct_under
from ..data.images import to_model_input
from .checkpoint import AttackCheckpoint, correct_under_resumable, fingerprint
from .masking import MASKING_FLOOR, MASKING_SWEEP, sweep_followup_eps


def _per_class(correct: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    return {c: (correct[labels == i].float().mean().item() if (labels == i).any() else None)
            for i, c in enumerate(classes)}


def _attack_options(name: str, pgd_steps: int, apgd_steps: int, restarts: int, seed: int,
                    square_queries: int = 5000, autoattack_steps: int = 100) -> dict:
    if name == "pgd":
        return {"steps": pgd_steps, "restarts": restarts, "seed": seed}
    if name == "apgd":
        return {"steps": apgd_steps, "restarts": restarts, "seed": seed}
    if name == "square":
        return {"queries": square_queries, "seed": seed}
    if name == "autoattack":
        return {"steps": autoattack_steps, "queries": square_queries, "seed": seed}
    return {"seed": seed}


def sanity_flags(model, x: torch.Tensor, y: torch.Tensor, was_training: bool) -> list[str]:
    """Model-level checks: training mode, probabilities instead of logits, zero input gradients."""
    flags = []
    if was_training:
        flags.append("model was in training mode when handed to the evaluator (evaluated in eval mode)")
    sample_x, sample_y = x[:64], y[:64]
    with torch.no_grad():
        out = model(sample_x)
    if out.min() >= 0 and out.max() <= 1 and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-3):
        flags.append("outputs look like probabilities (rows in [0,1] summing to 1), not logits: "
                     "cross-entropy attacks get weak gradients")
    with torch.enable_grad():
        xg = sample_x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg), sample_y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    if zero > 0.5:
        flags.append(f"input gradients are exactly zero for {zero:.0%} of samples (gradient masking?)")
    return flags


def result_flags(report: dict) -> list[str]:
    """Checks on the numbers: weak APGD, accuracy that does not fall with eps, attacks that help,
    a sweep that does not reach ~0, a transfer attack stronger than the white-box one."""
    flags = []
    sweep = report.get("masking_checks", {}).get("sweep", {})
    if sweep:
        largest = max(sweep, key=float)
        stronger = report["masking_checks"].get("sweep_apgd", {}).get(largest)
        if sweep[largest] > MASKING_FLOOR and (stronger is None or stronger > MASKING_FLOOR):
            flags.append(f"PGD leaves {sweep[largest]:.1%} accuracy at eps {largest}"
                         + ("" if stronger is None else f" and APGD-CE {stronger:.1%}")
                         + ": accuracy must reach ~0 as eps grows; the gradients may be masked")
    flags += transfer_flags(report)
    attacks, clean = report["attacks"], report["clean_accuracy"]
    for name, by_eps in attacks.items():
        eps_sorted = sorted(by_eps, key=float)
        accs = [by_eps[e]["accuracy"] for e in eps_sorted]
        for (e0, a0), (e1, a1) in zip(zip(eps_sorted, accs), zip(eps_sorted[1:], accs[1:])):
            if a1 > a0 + 0.02:
                flags.append(f"{LABELS[name]} accuracy rises from {a0:.1%} at eps {e0} to {a1:.1%} at eps {e1}")
        for e, a in zip(eps_sorted, accs):
            if float(e) > 0 and a > clean + 0.01:
                flags.append(f"{LABELS[name]} at eps {e} ({a:.1%}) is above clean accuracy ({clean:.1%})")
    for e in attacks.get("apgd", {}):
        if e in attacks.get("pgd", {}):
            apgd, pgd = attacks["apgd"][e]["accuracy"], attacks["pgd"][e]["accuracy"]
            if apgd > pgd + 0.02:
                flags.append(f"APGD ({apgd:.1%}) is weaker than PGD ({pgd:.1%}) at eps {e}")
    for e in attacks.get("pgd", {}):
        if e in attacks.get("fgsm", {}) and attacks["pgd"][e]["accuracy"] > attacks["fgsm"][e]["accuracy"] + 0.02:
            flags.append(f"PGD is weaker than FGSM at eps {e}: its step size or steps may be too small")
    n = report["num_images"]
    for e, entry in attacks.get("autoattack", {}).items():
        stages = entry.get("stages", {})
        if stages.get("square") is not None and stages.get("fab-t") is not None \
                and round((stages["fab-t"] - stages["square"]) * n) > 0:
            flags.append(f"gradient-free Square broke {round((stages['fab-t'] - stages['square']) * n)} image(s) at eps "
                         f"{e} that APGD-CE, APGD-T and FAB-T could not: the gradients may be masked")
    for e, entry in attacks.get("square", {}).items():
        gradient = [attacks[g][e]["accuracy"] for g in ("pgd", "apgd", "apgdt") if e in attacks.get(g, {})]
        if gradient and entry["accuracy"] < min(gradient) - 0.02:
            flags.append(f"gradient-free Square ({entry['accuracy']:.1%}) is stronger than every gradient attack "
                         f"({min(gradient):.1%}) at eps {e}: the gradients may be masked")
    return flags


def sweep_followup(model, x: torch.Tensor, labels: torch.Tensor, report: dict, apgd_steps: int = 50,
                   seed: int = 0, batch_size: int = 128, checkpoint: AttackCheckpoint | None = None,
                   progress=None) -> None:
    """When PGD leaves accuracy above the floor at the sweep's largest eps, run APGD-CE there too
    (masking_checks.sweep_apgd). PGD's fixed step (2.5 eps / steps) can stall at large eps on a
    model whose gradients are fine; APGD adapts its step. Carlini et al.'s checklist: try a
    stronger attack before calling the gradients masked, so only both staying up raises the flag."""
    largest = sweep_followup_eps(report)
    if largest is None:
        return
    sweep = report["masking_checks"]["sweep"]
    attack = make_attack("apgd", float(largest), steps=apgd_steps, restarts=1, seed=seed)
    correct, _ = correct_under_resumable(model, x, labels, attack, batch_size, checkpoint)
    report["masking_checks"]["sweep_apgd"] = {largest: correct.float().mean().item()}
    if progress:
        progress(f"masking sweep: PGD leaves {sweep[largest]:.2%} at eps {largest}; "
                 f"APGD-CE-{apgd_steps} there: {correct.float().mean().item():.2%}")


def robustness_report(model, pixels: torch.Tensor, labels: torch.Tensor, classes: list[str], attacks: list[str],
                      eps_list: list[float], corruptions: list[str] | None = None, pgd_steps: int = 10,
                      apgd_steps: int = 50, restarts: int = 1, seed: int = 0, batch_size: int = 128,
                      progress=None, square_queries: int = 5000, autoattack_steps: int = 100,
                      masking_sweep: tuple[float, ...] = MASKING_SWEEP,
                      attack_eps: dict[str, list[float]] | None = None,
                      checkpoint_dir: Path | None = None) -> dict:
    """Accuracy clean, per attack per eps (with per-class accuracy), worst case over attacks per eps,
    and per corruption per severity. `pixels` are uint8 N x C x S x S images. `attack_eps` gives an
    attack its own eps list (e.g. the costly AutoAttack at fewer eps than FGSM); the worst case at an
    eps is over the attacks run at it. With `checkpoint_dir`, every attack's result is kept there
    batch by batch and taken back on the next call with the same model, images and settings
    (emoshield.evaluation.checkpoint): a stopped evaluation resumes."""
    was_training = model.training
    model.eval()
    x_all = to_model_input(pixels)
    clean_correct = correct_under(model, x_all, labels, None, batch_size)
    if attacks:  # the folded copy every attack batch runs on, built before the first:
        with attack_context(model, "eval"):  # small batches must not depend on what earlier ones built
            eval_graph(model)                # (a resumed run skips those), so resumed = uninterrupted
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = AttackCheckpoint(checkpoint_dir, fingerprint(model, x_all, labels), progress)
    report = {"num_images": int(len(labels)), "classes": classes,
              "clean_accuracy": clean_correct.float().mean().item(),
              "per_class_accuracy": {"clean": _per_class(clean_correct, labels, classes)},
              "attacks": {}, "worst_case": {}, "corruptions": {},
              "settings": {"pgd_steps": pgd_steps, "pgd_step_size": "2.5*eps/steps", "apgd_steps": apgd_steps,
                           "restarts": restarts, "rfgsm_alpha": "eps/2", "seed": seed, "attack_mode": "eval",
                           "square_queries": square_queries,
                           "autoattack": f"standard: APGD-CE, APGD-T, FAB-T ({autoattack_steps} steps), Square",
                           "autoattack_steps": autoattack_steps,
                           "norm": "Linf", "pixel_range": [0, 1]}}
    attack_eps = {name: list((attack_eps or {}).get(name, eps_list)) for name in attacks}
    all_eps = sorted({e for values in attack_eps.values() for e in values} or set(eps_list))
    worst = {e: clean_correct.clone() for e in all_eps}
    for name in attacks:
        report["attacks"][name] = {}
        for eps in attack_eps[name]:
            attack = make_attack(name, eps, **_attack_options(name, pgd_steps, apgd_steps, restarts, seed,
                                                              square_queries, autoattack_steps))
            correct, seconds = correct_under_resumable(model, x_all, labels, attack, batch_size, checkpoint)
            worst[eps] &= correct
            report["attacks"][name][f"{eps:g}"] = {"accuracy": correct.float().mean().item(),
                                                   "per_class_accuracy": _per_class(correct, labels, classes),
                                                   "attack": repr(attack),
                                                   "seconds": round(seconds, 2)}
            if name == "autoattack":  # robust accuracy after each of its attacks, what it skipped, its cost
                report["attacks"][name][f"{eps:g}"].update(
                    stages=attack.stages(), skipped=attack.skipped,
                    stage_seconds={k: round(v, 2) for k, v in attack.seconds.items()})
            if progress:
                progress(f"{LABELS[name]} eps {eps:g}: {correct.float().mean().item():.2%}")
    if attacks:
        report["worst_case"] = {f"{e:g}": {"accuracy": w.float().mean().item(),
                                           "per_class_accuracy": _per_class(w, labels, classes),
                                           "over": ["clean"] + [a for a in attacks if e in attack_eps[a]]}
                                for e, w in worst.items()}
    for name in corruptions or []:
        report["corruptions"][name] = {}
        for severity in range(1, 6):
            with torch.no_grad():
                correct = torch.cat([model(corrupt(x_all[i:i + batch_size], name, severity, seed + i)).argmax(1)
                                     == labels[i:i + batch_size] for i in range(0, len(labels), batch_size)])
            report["corruptions"][name][str(severity)] = {"accuracy": correct.float().mean().item(),
                                                          "per_class_accuracy": _per_class(correct, labels, classes)}
        if progress:
            accs = [v["accuracy"] for v in report["corruptions"][name].values()]
            progress(f"{name}: mean over severities {sum(accs) / 5:.2%}")
    if attacks and masking_sweep:  # accuracy must fall to ~0 as eps grows, whatever the defense
        report["masking_checks"] = {"sweep": {}}
        for eps in masking_sweep:
            attack = make_attack("pgd", eps, steps=pgd_steps, seed=seed)
            correct, _ = correct_under_resumable(model, x_all, labels, attack, batch_size, checkpoint)
            report["masking_checks"]["sweep"][f"{eps:g}"] = correct.float().mean().item()
        sweep_followup(model, x_all, labels, report, apgd_steps, seed, batch_size, checkpoint, progress)
    if checkpoint is not None and checkpoint.resumed and progress:
        progress(f"resumed: {checkpoint.resumed} attack batch(es) taken from {checkpoint.folder}")
    report["sanity_flags"] = sanity_flags(model, x_all, labels, was_training) + result_flags(report)
    model.train(was_training)
    return report


def compare_with_baseline(report: dict, baseline: dict) -> dict:
    """Accuracy differences (points and relative %) of `report` over `baseline`, per attack and eps."""
    def delta(ours: float, base: float) -> dict:
        return {"points": (ours - base) * 100, "relative_percent": ((ours - base) / base * 100) if base else None,
                "baseline_accuracy": base}

    out = {"clean": delta(report["clean_accuracy"], baseline["clean_accuracy"]), "attacks": {}, "worst_case": {}}
    for name, by_eps in report["attacks"].items():
        for eps, value in by_eps.items():
            if eps in baseline["attacks"].get(name, {}):
                out["attacks"].setdefault(name, {})[eps] = delta(value["accuracy"],
                                                                 baseline["attacks"][name][eps]["accuracy"])
    for eps, value in report["worst_case"].items():
        if eps in baseline.get("worst_case", {}):
            out["worst_case"][eps] = delta(value["accuracy"], baseline["worst_case"][eps]["accuracy"])
    return out


def transfer_flags(report: dict) -> list[str]:
    """A transfer attack from the baseline stronger than white-box PGD: masked gradients."""
    flags = []
    for e, entry in report.get("masking_checks", {}).get("transfer", {}).items():
        white = report["attacks"].get("pgd", {}).get(e, {}).get("accuracy")
        if white is not None and entry["accuracy"] < white - 0.02:
            flags.append(f"PGD transferred from the baseline ({entry['accuracy']:.1%}) beats white-box PGD "
                         f"({white:.1%}) at eps {e}: the gradients may be masked")
    return flags


def transfer_check(model, source, x: torch.Tensor, labels: torch.Tensor, eps_list: list[float], pgd_steps: int = 10,
                   seed: int = 0, batch_size: int = 128) -> dict:
    """Accuracy of `model` on PGD examples made on `source` (e.g. the undefended twin), per eps:
    a defense that only masks its own gradients falls to attacks transferred from a model
    whose gradients are honest. `x` are model inputs shared by both models."""
    source.eval()
    model.eval()
    out = {}
    for eps in eps_list:
        attack = make_attack("pgd", eps, steps=pgd_steps, seed=seed)
        correct = []
        for i in range(0, len(labels), batch_size):
            xb, yb = x[i:i + batch_size], labels[i:i + batch_size]
            adv = attack(source, xb, yb)
            with torch.no_grad():
                correct.append(model(adv).argmax(1) == yb)
        out[f"{eps:g}"] = {"accuracy": torch.cat(correct).float().mean().item(), "attack": repr(attack)}
    return out
