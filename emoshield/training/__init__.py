"""Training: the trainer, learning-rate schedules (Algorithm 1), augmentation and checkpoints."""

from .defense import DEFENSE_METHODS, SELECTIONS, DefenseConfig, parse_defense
from .schedule import SCHEDULES, lr_schedule, reference_lr_schedule
from .trainer import OPTIMIZERS, TensorData, TrainConfig, Trainer, TrainResult, predict_logits

__all__ = [
    "DEFENSE_METHODS", "DefenseConfig", "SELECTIONS", "parse_defense",
    "OPTIMIZERS", "SCHEDULES", "TensorData", "TrainConfig", "TrainResult", "Trainer", "lr_schedule",
    "predict_logits", "reference_lr_schedule",
]
