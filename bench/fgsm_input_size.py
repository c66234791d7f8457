"""Does input size explain why our undefended models survive FGSM that SPEC §7 says breaks
them (below chance once eps > 0.006, at 480 px)? The same undefended training at several input
sizes, each one's FGSM sweep, and per test image the first-order eps that flips it: an L-inf
step of eps changes the logit margin m by about eps x ||grad_x m||_1, a sum over pixels, which
grows with the pixel count unless the per-pixel gradient shrinks as fast.

    EMOSHIELD_DATA=../shared/data .venv/bin/python bench/fgsm_input_size.py \
        [--sizes 48,64,96,128] [--backbone mobilenet_v2] [--weights imagenet] [--dataset ckplus48] \
        [--protocol reference] [--classes ...] [--epochs 50] [--augment strong] [--seed 0] [--work runs/bench/fgsm_input_size] \
        [--out results/fgsm_input_size] [--also DIR,DIR]

Training uses emoshield's defaults (batch 32, `--augment strong`, SGD 0.01 + Algorithm 1),
the recipe of `emoshield reproduce`'s localization runs; finished sizes are skipped and an
interrupted one resumes. Writes OUT/results.json, OUT/results.md and OUT/sweep.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EPS = [0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03]


def flip_eps(model, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> tuple[list[float], list[float]]:
    """Per test image: the eps at which a first-order (linear) model of the logit margin
    m = z_y - max_{k != y} z_k reaches 0 under an L-inf step, eps* = m / ||grad_x m||_1
    (0 for images already misclassified), and ||grad_x m||_1 itself. FGSM at eps flips
    roughly the images with eps* < eps, so the median eps* says where accuracy halves."""
    from emoshield.attacks.base import attack_context
    from emoshield.training.trainer import to_model_input

    flips, norms = [], []
    with attack_context(model, "eval"):
        for i in range(0, len(x), batch):
            xb = to_model_input(x[i:i + batch]).requires_grad_(True)
            yb = y[i:i + batch]
            logits = model(xb)
            true = logits.gather(1, yb[:, None])[:, 0]
            other = logits.masked_fill(torch.nn.functional.one_hot(yb, logits.shape[1]).bool(), float("-inf")).amax(1)
            margin = true - other
            (grad,) = torch.autograd.grad(margin.sum(), xb)
            l1 = grad.abs().flatten(1).sum(1)
            norms += l1.tolist()
            flips += torch.where(margin > 0, margin.detach() / l1.clamp_min(1e-12), torch.zeros_like(l1)).tolist()
    return flips, norms


def train_size(args, size: int, log) -> Path:
    """Train (or resume, or find finished) the undefended model at `size` px; its folder."""
    from emoshield.pipeline import DataOptions, ModelOptions, train_model
    from emoshield.training import TrainConfig

    folder = Path(args.work) / (f"{args.backbone}-{size}px" + ("" if args.augment == "strong" else f"-{args.augment}")
                                + ("" if args.seed == 0 else f"-seed{args.seed}"))
    if not (folder / "metrics.json").is_file():
        resume = (folder / "checkpoint.safetensors").is_file()
        log(f"{size} px: {'resuming' if resume else 'training'} {args.backbone} ({args.weights}), {args.epochs} epochs")
        train_model(DataOptions(dataset=args.dataset, protocol=args.protocol, fold=0, classes=args.classes),
                    ModelOptions(backbone=args.backbone, weights=args.weights, input_size=size),
                    TrainConfig(epochs=args.epochs, seed=args.seed, augment=args.augment), folder, resume=resume,
                    progress=False,
                    log=lambda m: log(f"  {m}"))
    return folder


def analyse(folder: Path, log) -> dict:
    """FGSM sweep and first-order flip eps of the model in `folder`, on its own test split."""
    from emoshield.pipeline import _decode_for, model_test_data, sweep_model

    sweep = sweep_model(folder, "fgsm", EPS, folder / "sweep", log=lambda m: None)
    model, records, root, meta = model_test_data(folder)
    test, _ = _decode_for(model, records, root, meta["classes"])
    flips, norms = flip_eps(model, test.pixels, test.labels)
    chance = 1 / len(meta["classes"])
    below = [p["eps"] for p in sweep["points"] if p["eps"] > 0 and p["accuracy"] < chance]
    size = meta["input_size"]
    augment = json.loads((folder / "run.json").read_text())["train_config"]["augment"]
    history = folder / "history.json"
    seconds = sum(e.get("seconds", 0) for e in json.loads(history.read_text())) if history.is_file() else None
    label = f"{meta['backbone']} ({meta['weights']}, {meta['head']} head) {size} px, augment {augment}"
    median = statistics.median(flips)
    log(f"{label}: clean {sweep['points'][0]['accuracy']:.1%}, FGSM 0.01 "
        f"{next(p['accuracy'] for p in sweep['points'] if p['eps'] == 0.01):.1%}, median first-order flip eps {median:.4f}")
    return {"label": label, "input_size": size, "augment": augment, "meta": meta, "points": sweep["points"],
            "first_eps_below_chance": below[0] if below else None,
            "flip_eps_median": median, "flip_eps_share_below_0.006": sum(f < 0.006 for f in flips) / len(flips),
            "margin_gradient_l1_median": statistics.median(norms),
            "margin_gradient_l1_per_pixel_median": statistics.median(norms) / (3 * size * size),
            "seconds": seconds, "folder": str(folder)}


def short_label(row: dict) -> str:
    weights = row["meta"]["weights"]
    source = "FER2013" if weights.startswith("library:") else weights.split(":")[0]
    return (f"{row['meta']['backbone']} {source} {row['input_size']} px"
            + ("" if row["augment"] == "strong" else f", {row['augment']} aug."))


def plot(rows: list[dict], path: Path, title: str, chance: float) -> None:
    """One line per model: the input-size series in one colour map, the other rows dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    sizes = [r for r in rows if r.get("by_size")]
    for i, r in enumerate(rows):
        by_size = r.get("by_size")
        colour = plt.cm.viridis(0.1 + 0.75 * sizes.index(r) / max(len(sizes) - 1, 1)) if by_size else f"C{i % 10}"
        ax.plot([p["eps"] for p in r["points"]], [p["accuracy"] * 100 for p in r["points"]], marker="o",
                markersize=3, color=colour, linestyle="-" if by_size else "--", label=short_label(r))
    ax.axhline(chance * 100, color="gray", linewidth=0.8, linestyle=":", label="chance")
    ax.axvline(0.006, color="red", linewidth=0.6, linestyle=":", label="eps 0.006 (SPEC §7)")
    ax.set_xlabel("eps (L-inf, images in [0, 1])")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], args, out: Path) -> None:
    from emoshield.evaluation.report import describe_run

    out.mkdir(parents=True, exist_ok=True)
    chance = 1 / len(rows[0]["meta"]["classes"])
    (out / "results.json").write_text(json.dumps({"command": sys.argv, "chance": chance, "rows": rows}, indent=1,
                                                 default=str))
    plot(rows, out / "sweep.png", f"FGSM on undefended models, {args.dataset} {args.protocol} protocol, "
         f"{rows[0]['meta']['epochs']} epochs, seed {rows[0]['meta']['seed']}", chance)
    eps_cols = [e for e in EPS if e in (0.002, 0.004, 0.006, 0.01, 0.015, 0.02, 0.03)]
    lines = ["# FGSM accuracy of undefended models against input size", "",
             f"Rows by input size: {describe_run(dict(rows[0]['meta'], input_size='N'))}; emoshield defaults "
             f"(batch 32, SGD 0.01 + Algorithm 1; augmentation as named), undefended; training s = wall seconds of the 50 epochs on 2 shared CPU cores (other jobs running beside); other rows (`--also`): the "
             f"same data, split, epochs, seed and recipe with the backbone and weights named. Test images: the protocol's test split. "
             f"Chance = {chance:.0%}. Per test image, with the logit margin m = z_true - max other z: "
             "‖∇m‖₁ = L1 norm of its input gradient, and eps* = m / ‖∇m‖₁, the L-inf step at which the "
             "linearised margin reaches 0 (0 when already wrong); FGSM at eps flips roughly the images with "
             "eps* < eps. Medians over the test images.", "",
             "Command: `" + " ".join(["python", "bench/fgsm_input_size.py"] + sys.argv[1:]) + "`", "",
             "| model | clean | " + " | ".join(f"FGSM {e:g}" for e in eps_cols)
             + " | first eps below chance | median eps* | eps* < 0.006 | median ‖∇m‖₁ | per pixel | training s |",
             "|---|---:|" + "---:|" * len(eps_cols) + "---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = {p["eps"]: p["accuracy"] for p in r["points"]}
        first = r["first_eps_below_chance"]
        lines.append(f"| {r['label']} | {acc[0.0]:.1%} | " + " | ".join(f"{acc[e]:.1%}" for e in eps_cols)
                     + f" | {first if first is not None else '> 0.03'} | {r['flip_eps_median']:.4f} | "
                     f"{r['flip_eps_share_below_0.006']:.1%} | {r['margin_gradient_l1_median']:.0f} | "
                     f"{r['margin_gradient_l1_per_pixel_median']:.2e} | "
                     + (f"{r['seconds']:.0f} |" if r.get("seconds") is not None else "— |"))
    lines += ["", "![FGSM accuracy vs eps per input size](sweep.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="48,64,96,128")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--dataset", default="ckplus48")
    parser.add_argument("--protocol", default="reference")
    parser.add_argument("--classes", default=None, help="default: the reference's classes where the dataset has them")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--augment", default="strong", choices=["none", "flip", "standard", "strong"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench/fgsm_input_size")
    parser.add_argument("--out", default="results/fgsm_input_size")
    parser.add_argument("--also", help="comma-separated folders of other trained models to analyse the same way "
                                       "(e.g. a reproduce study's scratch runs)")
    args = parser.parse_args()
    from emoshield.reproduce import DEFAULT_CLASSES

    args.classes = args.classes or DEFAULT_CLASSES.get(args.dataset)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        rows.append(dict(analyse(train_size(args, size, log), log), by_size=True))
        write(rows, args, Path(args.out))  # a partial table after every size
    for folder in filter(None, (args.also or "").split(",")):
        rows.append(analyse(Path(folder), log))
        write(rows, args, Path(args.out))
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
