"""The model library: backbones, weights sources, the localization head and EmotionNet."""

from .heads import LocalizationHead
from .backbones import BACKBONES, backbone_spec, imagenet_available, install_packaged_weights
from .network import HEADS, EmotionNet, ModelConfig, build_model, load_model, save_model

__all__ = [
    "BACKBONES", "HEADS", "EmotionNet", "LocalizationHead", "ModelConfig", "backbone_spec",
    "build_model", "imagenet_available", "install_packaged_weights", "load_model", "save_model",
]
