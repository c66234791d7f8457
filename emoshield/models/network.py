"""EmotionNet = input normalization + backbone feature extractor + head; built, saved and loaded here.

Weights are saved as safetensors with the model's config in the file's metadata, so a
saved model rebuilds itself without pickle and without the code that trained it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import EmoshieldError, one_line
from .heads import LocalizationHead
from .backbones import backbone_spec, load_imagenet_state_dict, resize_own_head, torchvision_parts
from .normalization import IMAGENET_MEAN, IMAGENET_STD, Normalize

HEADS = ("localization", "backbone")


@dataclass
class ModelConfig:
    """Everything needed to rebuild an EmotionNet (saved beside its weights)."""

    backbone: str
    classes: list[str]
    input_size: int
    head: str = "localization"
    pooling: str = "global"
    hidden: int = 256
    dropout: float = 0.0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    weights: str = "scratch"  # where the initial weights came from
    align: str = "none"  # face alignment of its inputs (emoshield.data.faces.align_face): eval and device too

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class EmotionNet(nn.Module):
    """Images in [0, 1] (N x 3 x S x S) -> logits, one per emotion class.

    forward_features / forward_head split the pretrained extractor from the head (as timm does).
    """

    def __init__(self, config: ModelConfig, features: nn.Module, head: nn.Module):
        super().__init__()
        self.config = config
        self.normalize = Normalize(tuple(config.mean), tuple(config.std))
        self.features = features
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def freeze_features(self, frozen: bool = True) -> None:
        """Stop (or restart) training the feature extractor; the trainer keeps its BatchNorm in eval mode."""
        for p in self.features.parameters():
            p.requires_grad_(not frozen)


def _feature_map_size(features: nn.Module, backbone: str, input_size: int) -> tuple[int, int]:
    spec = backbone_spec(backbone)
    if input_size < spec.min_input_size:
        raise EmoshieldError(f"input size {input_size} is too small for {backbone} (needs >= {spec.min_input_size})")
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, 3, input_size, input_size))
    except RuntimeError:
        raise EmoshieldError(f"input size {input_size} is too small for {backbone}") from None
    finally:
        features.train(was_training)
    return int(out.shape[2]), int(out.shape[3])


def build_model(config: ModelConfig) -> EmotionNet:
    """Build an EmotionNet and load its initial weights from `config.weights` (see library.py)."""
    backbone_spec(config.backbone)  # an unknown name is one line, before any torchvision lookup
    if not 0 <= config.dropout < 1 or not 1 <= config.hidden <= 16384:  # what load_model accepts back
        raise EmoshieldError(f"dropout {config.dropout} must be in [0, 1) and the head's hidden width "
                             f"{config.hidden} in [1, 16384]")
    if config.head not in HEADS:
        raise EmoshieldError(f"unknown head {config.head!r}; choose one of {', '.join(HEADS)}")
    if config.num_classes < 2:
        raise EmoshieldError("a model needs at least two classes")
    source = config.weights or "scratch"
    state_dict = None
    if source == "imagenet" or source.startswith("imagenet:"):
        state_dict, config.weights = load_imagenet_state_dict(config.backbone, source.partition(":")[2] or None)
    elif source.startswith("library:"):
        from .library import exact_weights, read_weights_spec

        meta, library_file = read_weights_spec(source)
        config.weights = exact_weights(meta)  # which exact weights, for provenance
    elif source != "scratch" and not source.endswith(".safetensors"):
        raise EmoshieldError(f"unknown weights {source!r}; use scratch, imagenet[:ENTRY], library:NAME "
                             "or a .safetensors file")
    features, own_head = torchvision_parts(config.backbone, state_dict)
    if config.head == "backbone":
        head = resize_own_head(own_head, config.num_classes)
    else:
        fmap = _feature_map_size(features, config.backbone, config.input_size)
        head = LocalizationHead(backbone_spec(config.backbone).feature_channels, fmap, config.num_classes,
                                config.pooling, config.hidden, config.dropout)
    model = EmotionNet(config, features, head)
    if source.endswith(".safetensors"):
        load_compatible_weights(model, Path(source))
    elif source.startswith("library:"):
        load_compatible_weights(model, library_file)
    return model


# ---- safetensors I/O ---------------------------------------------------------------------------

def save_model(model: EmotionNet, path: Path, metadata: dict | None = None) -> None:
    """Write weights + config (and optional JSON-able metadata) as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "emoshield.EmotionNet/1", "config": json.dumps(asdict(model.config))}
    if metadata:
        meta["metadata"] = json.dumps(metadata)
    tmp = Path(path).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header metadata of a safetensors file; a one-line error if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EmoshieldError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for bad files
        raise EmoshieldError(f"{path} is not a valid safetensors weights file ({exc.__class__.__name__})") from None


_CONFIG_TYPES = {"backbone": str, "classes": list, "input_size": int, "head": str, "pooling": str, "hidden": int,
                 "dropout": (int, float), "mean": list, "std": list, "weights": str, "align": str}


def saved_config(meta: dict, path: Path) -> ModelConfig:
    """The ModelConfig a safetensors file's metadata holds, checked: a file edited, cut or written
    by something else is a one-line EmoshieldError naming it, never a TypeError deep in a build."""
    if "config" not in meta:
        raise EmoshieldError(f"{path} has no emoshield model config (was it saved by emoshield?)")
    try:
        values = json.loads(meta["config"])
    except (ValueError, RecursionError) as exc:
        raise EmoshieldError(f"{path}: its model config is not JSON ({type(exc).__name__})") from None
    if not isinstance(values, dict):
        raise EmoshieldError(f"{path}: its model config is not an object")
    unknown = sorted(set(values) - set(_CONFIG_TYPES))
    wrong = [k for k, kind in _CONFIG_TYPES.items() if k in values and
             (not isinstance(values[k], kind) or isinstance(values[k], bool))]
    missing = [k for k in ("backbone", "classes", "input_size") if k not in values]
    if unknown or wrong or missing:
        raise EmoshieldError(f"{path}: its model config does not fit this emoshield (unknown "
                             f"{', '.join(repr(k)[:24] for k in unknown)[:80] or '-'}; mistyped {', '.join(wrong) or '-'}; "
                             f"missing {', '.join(missing) or '-'})")
    # (hidden and dropout ranges: build_model's check, which load_model runs with this file's name)
    if not all(isinstance(c, str) for c in values["classes"]) or not 8 <= values["input_size"] <= 4096 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in values.get("mean", []) + values.get("std", [])):
        raise EmoshieldError(f"{path}: its model config has classes, input_size or normalization out of range")
    return ModelConfig(**values)


def load_model(path: Path) -> EmotionNet:
    """Rebuild an EmotionNet saved by save_model (a file, or a training output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors, meta = read_safetensors(path)
    config = saved_config(meta, path)
    try:
        model = build_model(ModelConfig(**{**asdict(config), "weights": "scratch"}))
    except EmoshieldError as exc:  # an unknown backbone, head or pooling
        raise EmoshieldError(f"{path}: {exc}") from None
    except (TypeError, ValueError, RuntimeError) as exc:  # sizes that build no network
        raise EmoshieldError(f"{path}: its model config builds no network ({one_line(exc, 160)})") from None
    model.config = config
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise EmoshieldError(f"{path}: weights do not match its config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model


def load_compatible_weights(model: EmotionNet, path: Path) -> dict[str, int]:
    """Seed `model` from a safetensors file: all feature-extractor tensors must match; head
    tensors are taken where name and shape match. Returns counts of what was loaded."""
    tensors, _meta = read_safetensors(path)
    own = model.state_dict()
    feature_keys = [k for k in own if k.startswith("features.")]
    missing = [k for k in feature_keys if k not in tensors or tensors[k].shape != own[k].shape]
    if missing:
        raise EmoshieldError(f"{path}: not {model.config.backbone} feature weights "
                             f"({len(missing)} of {len(feature_keys)} feature tensors missing or of another shape)")
    take = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape and not k.startswith("normalize.")}
    model.load_state_dict(take, strict=False)
    return {"features": len(feature_keys), "head": sum(1 for k in take if k.startswith("head."))}
