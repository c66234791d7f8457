"""The trainer: SGD (or Adam) on in-memory face tensors, per-epoch validation and model
selection, a checkpoint every epoch, and exact resume.

All randomness (shuffling, augmentation) comes from one seeded torch.Generator whose
state is checkpointed, so an interrupted and resumed run gives the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.images import to_model_input
from ..errors import EmoshieldError
from .augment import AUGMENTATIONS, MIXES, augment_batch, mix_batch
from .checkpoint import has_checkpoint, load_checkpoint, refuse_unless_resuming, save_checkpoint
from .schedule import SCHEDULES, lr_schedule

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults follow SPEC §4 where it says)."""

    epochs: int = 50
    # 32, not SPEC §4's 128: on face sets of a few hundred images 128 gives ~5 steps per epoch;
    # 32 measured +5 FGSM and +13 PGD points on CK+48 (results/defense_variants). 128 reproduces SPEC.
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "reference"
    decay_rate: float = 0.9
    decay_stride: int = 5
    augment: str = "strong"  # standard + photometric jitter + random erasing: +10 PGD points measured
    label_smoothing: float = 0.0
    mix: str = "none"  # mixup or cutmix of image pairs after augmentation (undefended training only)
    mix_alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    freeze_features: bool = False
    seed: int = 0
    eval_batch_size: int = 256
    device: str = "auto"  # auto = the GPU when there is one (not part of the resume check)
    amp: bool = False  # mixed precision for the training passes; attacks stay float32 (devices.py)
    # channels_last: oneDNN's (and cuDNN's) fast convolution layout, 1.1x (resnet18), 1.3x (smallcnn)
    # and 2.0x (mobilenet_v2) faster training steps on CPU; torch's channels_last CPU BatchNorm
    # sums in float32, so "contiguous" is the layout whose runs match across process counts to 1e-5
    memory_format: str = "channels_last"

    def validate(self, defense=None) -> None:
        """One clear error for a bad setting, before any data is loaded; `defense` the run's DefenseConfig."""
        if self.mix != "none" and defense is not None:
            raise EmoshieldError("--mix is for undefended training: the defense's perturbations are made for "
                                 "each image's own label")
        if self.epochs < 1:
            raise EmoshieldError("--epochs must be >= 1")
        if self.batch_size < 2:
            raise EmoshieldError("--batch-size must be >= 2 (BatchNorm needs two samples)")
        if not self.lr > 0:
            raise EmoshieldError("--lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise EmoshieldError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise EmoshieldError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.augment not in AUGMENTATIONS:
            raise EmoshieldError(f"unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if self.mix not in MIXES:
            raise EmoshieldError(f"unknown mix {self.mix!r}; choose one of {', '.join(MIXES)}")
        if not (self.mix_alpha > 0 and math.isfinite(self.mix_alpha)):
            raise EmoshieldError("--mix-alpha must be a finite number > 0")
        if not 0 <= self.label_smoothing < 1:
            raise EmoshieldError("--label-smoothing must be in [0, 1)")
        if self.memory_format not in MEMORY_FORMATS:
            raise EmoshieldError(f"unknown memory format {self.memory_format!r}; "
                                 f"choose one of {', '.join(MEMORY_FORMATS)}")
        from .devices import resolve_device

        resolve_device(self.device)


@dataclass
class TensorData:
    """uint8 images (N x C x S x S, C = 1 or 3) and int64 labels, in memory."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: int
    best_val_score: float | None  # validation accuracy, or the defense's selection score
    seconds: float


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

# settings of the resume check that do not change what is computed
RESUME_FREE = ("device",)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (on the CPU) of the model in eval mode for uint8 images (caller's mode restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        outs = [model(to_model_input(pixels[i:i + batch_size].to(device))).cpu()
                for i in range(0, pixels.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def validation_metrics(model: torch.nn.Module, data: TensorData, batch_size: int, defense=None,
                       seed: int = 0) -> dict:
    """Validation loss and accuracy; with a defense also each method's accuracy on perturbed copies
    made with the current model (eval mode), the robust (worst over S) accuracy, the
    differential loss and the selection score."""
    logits = predict_logits(model, data.pixels, batch_size)
    clean_correct = logits.argmax(1) == data.labels
    out = {"val_loss": F.cross_entropy(logits, data.labels).item(),
           "val_accuracy": clean_correct.float().mean().item()}
    if defense is None:
        out["val_score"] = out["val_accuracy"]
        return out
    was_training = model.training
    model.eval()
    robust = clean_correct.clone()
    diff_loss = defense.beta0 * out["val_loss"]
    accuracies = [out["val_accuracy"]]
    for name, beta in defense.methods.items():
        attack = defense.attack(name, "eval", seed)
        losses, correct = [], []
        for i in range(0, len(data), batch_size):
            device = model_device(model)
            x, y = to_model_input(data.pixels[i:i + batch_size].to(device)), data.labels[i:i + batch_size].to(device)
            with torch.no_grad():
                adv_logits = model(attack(model, x, y))
            losses.append(F.cross_entropy(adv_logits, y, reduction="sum").cpu())
            correct.append((adv_logits.argmax(1) == y).cpu())
        correct_all = torch.cat(correct)
        out[f"val_{name}_accuracy"] = correct_all.float().mean().item()
        accuracies.append(out[f"val_{name}_accuracy"])
        robust &= correct_all
        diff_loss += (1 - defense.beta0) * beta * (torch.stack(losses).sum() / len(data)).item()
    model.train(was_training)
    out["val_robust_accuracy"] = robust.float().mean().item()
    out["val_differential_loss"] = diff_loss
    out["val_score"] = {"clean": out["val_accuracy"], "robust": out["val_robust_accuracy"],
                        "mean": sum(accuracies) / len(accuracies)}[defense.select]
    return out


@contextlib.contextmanager
def frozen_batchnorm_stats(model: torch.nn.Module):
    """BatchNorm layers keep their running statistics (momentum 0) while attacks run in train mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def _same_config(saved: dict | None, current: dict) -> bool:
    """Resume only with the same settings; device is free, and settings added since the checkpoint
    was written count as their defaults."""
    if saved is None:
        return False
    defaults = asdict(TrainConfig())
    return all(saved.get(k, defaults[k]) == v for k, v in current.items() if k not in RESUME_FREE)


def eta_seconds(epoch_seconds: list[float], remaining: int) -> float:
    """Seconds left: the median wall time of this process's epochs so far times the epochs left. The
    median, not the mean: one epoch that spanned a pause (SIGSTOP, a suspended laptop, a CI run
    beside it) would otherwise inflate the estimate for the rest of the run."""
    if not epoch_seconds or remaining <= 0:
        return 0.0
    return statistics.median(epoch_seconds) * remaining


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Trains an EmotionNet; writes OUT/checkpoint.safetensors every epoch, OUT/model.safetensors
    (best epoch on validation) and OUT/history.json."""

    def __init__(self, model, config: TrainConfig, out_dir: Path, save_best=None, progress: bool = True,
                 log=None, defense=None, dist=None):
        """dist: a DistContext (torchrun); by default the launch's, None for one process."""
        from .distributed import init_distributed

        config.validate(defense)
        if defense is not None:
            defense.validate()
        self.defense = defense
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir)
        self.save_best = save_best  # callable(model) that writes the selected model
        self.dist = dist if dist is not None else init_distributed()
        self.is_main = self.dist is None or self.dist.is_main
        self.progress = progress and self.is_main
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log = log if self.is_main else (lambda msg: None)
        from .devices import effective_amp, grad_scaler, resolve_device

        self.device = resolve_device(config.device, 0 if self.dist is None else self.dist.local_rank)
        # config.amp stays as asked (the resume check), self.amp is what runs on this machine
        self.amp = effective_amp(self.device, config.amp, self.log)
        self.scaler = grad_scaler(self.device, self.amp)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.freeze_features:
            self.model.features.eval()  # frozen extractor: keep its BatchNorm statistics fixed

    def fit(self, train: TensorData, val: TensorData | None, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.model.to(self.device, memory_format=MEMORY_FORMATS[cfg.memory_format])
        if self.amp:
            self.log(f"mixed precision on {self.device.type}: training passes in "
                     f"{'float16' if self.device.type == 'cuda' else 'bfloat16'}, attacks in float32")
        self.model.freeze_features(cfg.freeze_features)
        optimizer = make_optimizer(self.model, cfg)
        rates = lr_schedule(cfg.schedule, cfg.epochs, cfg.lr, cfg.decay_rate, cfg.decay_stride)
        history: list[dict] = []
        best = {"epoch": 0, "score": -1.0, "loss": math.inf}
        start_epoch = 1
        refuse_unless_resuming(self.out_dir, resume)
        if has_checkpoint(self.out_dir):
            state = load_checkpoint(self.out_dir, self.model, optimizer, generator, self.scaler)
            if not _same_config(state.get("train_config"), asdict(cfg)) or state.get("defense") != self._defense_json():
                raise EmoshieldError(f"{self.out_dir}: the checkpoint was made with other training options; "
                                     "resume with the same options")
            history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
            self.log(f"resuming from epoch {state['epoch']} of {cfg.epochs} in {self.out_dir}")
        if self.dist is not None:
            self.dist.broadcast_model(self.model)
            self.log(f"data parallel over {self.dist.world_size} processes ({self.dist.backend}): global batch "
                     f"{cfg.batch_size}, {cfg.batch_size // self.dist.world_size} per process")
        use_val = val is not None and len(val) > 0
        if not use_val:
            self.log("no validation images: the last epoch is kept as the model")
        epoch_walls: list[float] = []  # each epoch's wall time in this process, checkpointing included
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = rates[epoch - 1]
            train_loss, train_acc = self._train_epoch(train, optimizer, generator, epoch)
            record = {"epoch": epoch, "lr": rates[epoch - 1], "train_loss": train_loss, "train_accuracy": train_acc}
            if self.dist is not None:
                self.dist.average_buffers(self.model)  # one model on every rank from here
                if not self.is_main:
                    continue  # rank 0 validates, selects and writes; the others go on training
            if use_val:
                metrics = validation_metrics(self.model, val, cfg.eval_batch_size, self.defense, cfg.seed + epoch)
                record.update(metrics)
                val_loss, val_acc, score = metrics["val_loss"], metrics["val_accuracy"], metrics["val_score"]
                improved = score > best["score"] or (score == best["score"] and val_loss < best["loss"])
            else:
                val_loss, val_acc, improved = math.nan, math.nan, True
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if improved:
                best = {"epoch": epoch, "score": score if use_val else -1.0, "loss": val_loss if use_val else math.inf}
                if self.save_best is not None:
                    self.save_best(self.model)
            save_checkpoint(self.out_dir, self.model, optimizer, generator,
                            {"epoch": epoch, "history": history, "best": best, "train_config": asdict(cfg),
                             "defense": self._defense_json()}, self.scaler)
            (self.out_dir / "history.json").write_text(json.dumps(history, indent=1))
            epoch_walls.append(time.perf_counter() - t0)
            eta = eta_seconds(epoch_walls, cfg.epochs - epoch)
            val_text = f" | val loss {val_loss:.3f} acc {val_acc:.3f}" if use_val else ""
            if use_val and self.defense is not None:
                val_text += " " + " ".join(f"{m} {record[f'val_{m}_accuracy']:.3f}" for m in self.defense.methods)
            self.log(f"epoch {epoch}/{cfg.epochs} train loss {train_loss:.3f} acc {train_acc:.3f}{val_text} "
                     f"| lr {rates[epoch - 1]:.2e} | {record['seconds']:.1f}s | ETA {_format_seconds(eta)}"
                     + (" *" if improved and use_val else ""))
        if self.dist is not None:
            self.dist.barrier()
        total = sum(r["seconds"] for r in history)
        return TrainResult(history, best["epoch"], best["score"] if use_val else None, total)

    def _defense_json(self) -> dict | None:
        return asdict(self.defense) if self.defense is not None else None

    def _train_epoch(self, data: TensorData, optimizer, generator: torch.Generator, epoch: int) -> tuple[float, float]:
        from tqdm import tqdm

        cfg = self.config
        self._set_train_mode()
        order = torch.randperm(len(data), generator=generator)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        world = 1 if self.dist is None else self.dist.world_size
        if len(batches) > 1 and len(batches[-1]) < 2 * world:
            batches.pop()  # a last batch (or shard) of one sample breaks BatchNorm
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not self.progress,
                   file=sys.stderr, unit="batch",
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file gets a line per 30 s
        for index in bar:
            # the whole global batch is augmented on every rank, so the random stream (and the
            # images) are those of a single process; each rank then keeps its shard
            x = augment_batch(to_model_input(data.pixels[index]), cfg.augment, generator)
            y = data.labels[index]
            x, y, y_mix, lam = mix_batch(x, y, cfg.mix, cfg.mix_alpha, generator)  # the global batch
            global_size = len(y)
            scale = 1.0
            self._noise_shard = None
            if self.dist is not None:
                self._noise_shard = (self.dist.rank, self.dist.world_size, global_size)  # see LinfAttack.shard
                x, y, y_mix = self.dist.shard(x), self.dist.shard(y), self.dist.shard(y_mix)
                scale = self.dist.loss_scale(len(y), global_size)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            y_mix = y_mix.to(self.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if self.defense is None:
                with self._synced():
                    with self._autocast():
                        logits = self.model(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                        if lam < 1:
                            loss = lam * loss + (1 - lam) * F.cross_entropy(
                                logits.float(), y_mix, label_smoothing=cfg.label_smoothing)
                    self.scaler.scale(loss * scale).backward()
            else:
                seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
                loss, logits = self._defended_backward(x, y, seed, scale)
            if self.dist is not None:
                self.dist.average_gradients(self.model, 1 / self.dist.world_size)
            self.scaler.step(optimizer)
            self.scaler.update()
            total_loss += loss.item() * len(y)
            predicted = logits.argmax(1)  # under mixing: each label counts with its weight
            correct += lam * float((predicted == y).sum()) + (1 - lam) * float((predicted == y_mix).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        if self.dist is not None:
            total_loss, correct, seen = self.dist.sum(total_loss, correct, seen)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def _autocast(self):
        from .devices import autocast

        return autocast(self.device, self.amp)

    def _synced(self):
        """Global-batch BatchNorm statistics under torchrun; nothing to do in one process."""
        return contextlib.nullcontext() if self.dist is None else self.dist.synced_batchnorm(self.model)

    def _defended_backward(self, x: torch.Tensor, y: torch.Tensor, seed: int,
                           scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradients of the differential loss (see defense.py); return (loss, clean logits).

        Every perturbation is made with the model as it is at the start of the step: eval-mode
        attacks run before any pass of this step updates BatchNorm's running statistics;
        train-mode attacks do not depend on them.
        """
        d = self.defense
        active = [(name, beta) for name, beta in d.methods.items() if beta > 0]
        perturbed: dict[str, torch.Tensor] = {}
        if d.attack_bn == "eval":
            # one BatchNorm-folded copy of this step's model serves every method's attack
            from ..attacks.base import attack_context
            from ..attacks.folding import eval_graph

            with attack_context(self.model, "eval"):
                graph = eval_graph(self.model, gradient_images=x.shape[0] * len(active))
            for name, _beta in active:
                perturbed[name] = self._attack(name, "eval", seed, fast=False)(graph, x, y)
        with self._synced():
            return self._differential_backward(x, y, seed, scale, active, perturbed)

    def _attack(self, name: str, mode: str, seed: int, fast: bool = True):
        """The defense's attack for this step; under torchrun its random start is this rank's
        rows of the global batch's (the same perturbations as one process)."""
        attack = self.defense.attack(name, mode, seed, fast=fast)
        attack.shard = getattr(self, "_noise_shard", None)
        return attack

    def _differential_backward(self, x, y, seed: int, scale: float, active: list, perturbed: dict):
        d, smoothing = self.defense, self.config.label_smoothing
        # the clean pass's input gradient is FGSM's only in float32 (see devices.py)
        fused_fgsm = d.attack_bn == "train" and not self.amp and any(name == "fgsm" for name, _ in active)
        x_clean = x.detach().requires_grad_(fused_fgsm)
        with self._autocast():
            logits = self.model(x_clean)
            clean_loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        self.scaler.scale(d.beta0 * scale * clean_loss).backward()
        total = d.beta0 * clean_loss.detach()
        if d.attack_bn == "train":
            for name, _beta in active:
                if name == "fgsm" and fused_fgsm:  # the clean pass's input gradient is FGSM's, exactly
                    perturbed[name] = (x + d.eps * x_clean.grad.sign()).clamp_(0, 1)
                else:
                    with frozen_batchnorm_stats(self.model):
                        perturbed[name] = self._attack(name, "keep", seed)(self.model, x, y)
        for name, beta in active:
            with self._autocast():
                adv_loss = F.cross_entropy(self.model(perturbed[name]).float(), y, label_smoothing=smoothing)
            self.scaler.scale((1 - d.beta0) * beta * scale * adv_loss).backward()
            total = total + (1 - d.beta0) * beta * adv_loss.detach()
        return total, logits.detach()
