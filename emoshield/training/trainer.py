"""The trainer: SGD (or Adam) on in-memory face tensors, per-epoch validation and model
selection, a checkpoint every epoch, and exact resume.

All randomness (shuffling, augmentation) comes from one seeded torch.Generator whose
state is checkpointed, so an interrupted and resumed run gives the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.images import to_model_input
from ..errors import EmoshieldError
from .augment import AUGMENTATIONS, augment_batch
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .schedule import SCHEDULES, lr_schedule

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults follow SPEC §4 where it says)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "reference"
    decay_rate: float = 0.9
    decay_stride: int = 5
    augment: str = "standard"
    label_smoothing: float = 0.0
    freeze_features: bool = False
    seed: int = 0
    eval_batch_size: int = 256

    def validate(self) -> None:
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
    best_val_accuracy: float | None
    seconds: float


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of the model in eval mode for uint8 images (caller's mode restored)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(to_model_input(pixels[i:i + batch_size])) for i in range(0, pixels.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def _evaluate(model: torch.nn.Module, data: TensorData, batch_size: int) -> tuple[float, float]:
    logits = predict_logits(model, data.pixels, batch_size)
    loss = F.cross_entropy(logits, data.labels).item()
    accuracy = (logits.argmax(1) == data.labels).float().mean().item()
    return loss, accuracy


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Trains an EmotionNet; writes OUT/checkpoint.safetensors every epoch, OUT/model.safetensors
    (best epoch on validation) and OUT/history.json."""

    def __init__(self, model, config: TrainConfig, out_dir: Path, save_best=None, progress: bool = True,
                 log=None):
        config.validate()
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir)
        self.save_best = save_best  # callable(model) that writes the selected model
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.freeze_features:
            self.model.features.eval()  # frozen extractor: keep its BatchNorm statistics fixed

    def fit(self, train: TensorData, val: TensorData | None, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.model.freeze_features(cfg.freeze_features)
        optimizer = make_optimizer(self.model, cfg)
        rates = lr_schedule(cfg.schedule, cfg.epochs, cfg.lr, cfg.decay_rate, cfg.decay_stride)
        history: list[dict] = []
        best = {"epoch": 0, "accuracy": -1.0, "loss": math.inf}
        start_epoch = 1
        if has_checkpoint(self.out_dir):
            if not resume:
                raise EmoshieldError(f"{self.out_dir} already holds a training checkpoint; "
                                     "pass --resume to continue it or choose another --out")
            state = load_checkpoint(self.out_dir, self.model, optimizer, generator)
            if state.get("train_config") != asdict(cfg):
                raise EmoshieldError(f"{self.out_dir}: the checkpoint was made with other training options; "
                                     "resume with the same options")
            history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
            self.log(f"resuming from epoch {state['epoch']} of {cfg.epochs} in {self.out_dir}")
        use_val = val is not None and len(val) > 0
        if not use_val:
            self.log("no validation images: the last epoch is kept as the model")
        started = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = rates[epoch - 1]
            train_loss, train_acc = self._train_epoch(train, optimizer, generator, epoch)
            record = {"epoch": epoch, "lr": rates[epoch - 1], "train_loss": train_loss, "train_accuracy": train_acc}
            if use_val:
                val_loss, val_acc = _evaluate(self.model, val, cfg.eval_batch_size)
                record.update(val_loss=val_loss, val_accuracy=val_acc)
                improved = val_acc > best["accuracy"] or (val_acc == best["accuracy"] and val_loss < best["loss"])
            else:
                val_loss, val_acc, improved = math.nan, math.nan, True
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if improved:
                best = {"epoch": epoch, "accuracy": val_acc if use_val else -1.0, "loss": val_loss if use_val else math.inf}
                if self.save_best is not None:
                    self.save_best(self.model)
            save_checkpoint(self.out_dir, self.model, optimizer, generator,
                            {"epoch": epoch, "history": history, "best": best, "train_config": asdict(cfg)})
            (self.out_dir / "history.json").write_text(json.dumps(history, indent=1))
            done = epoch - start_epoch + 1
            eta = (time.perf_counter() - started) / done * (cfg.epochs - epoch)
            val_text = f" | val loss {val_loss:.3f} acc {val_acc:.3f}" if use_val else ""
            self.log(f"epoch {epoch}/{cfg.epochs} train loss {train_loss:.3f} acc {train_acc:.3f}{val_text} "
                     f"| lr {rates[epoch - 1]:.2e} | {record['seconds']:.1f}s | ETA {_format_seconds(eta)}"
                     + (" *" if improved and use_val else ""))
        total = sum(r["seconds"] for r in history)
        return TrainResult(history, best["epoch"], best["accuracy"] if use_val else None, total)

    def _train_epoch(self, data: TensorData, optimizer, generator: torch.Generator, epoch: int) -> tuple[float, float]:
        from tqdm import tqdm

        cfg = self.config
        self._set_train_mode()
        order = torch.randperm(len(data), generator=generator)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches.pop()  # a last batch of one sample breaks BatchNorm
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not self.progress,
                   file=sys.stderr, mininterval=1.0, unit="batch")
        for index in bar:
            x = augment_batch(to_model_input(data.pixels[index]), cfg.augment, generator)
            y = data.labels[index]
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        return total_loss / max(seen, 1), correct / max(seen, 1)
