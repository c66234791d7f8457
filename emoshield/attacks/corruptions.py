"""Camera and environment corruptions (the natural noise SPEC §8 asks for), 5 severities each.

Modelled on ImageNet-C (Hendrycks & Dietterich 2019), scaled for small face crops. All act
on images in [0, 1] (N x C x H x W), return images in [0, 1], and are deterministic for a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EmoshieldError

SEVERITIES = (1, 2, 3, 4, 5)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_noise(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    sigma = (0.04, 0.06, 0.08, 0.10, 0.14)[severity - 1]
    return (x + sigma * torch.randn(x.shape, generator=_generator(seed))).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Photon (Poisson) noise: fewer photons per pixel = noisier, as in dim scenes."""
    photons = (120.0, 60.0, 30.0, 15.0, 8.0)[severity - 1]
    return (torch.poisson(x * photons, generator=_generator(seed)) / photons).clamp(0, 1)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    k = kernel.to(x.dtype).expand(channels, 1, *kernel.shape)
    pad = (kernel.shape[1] // 2, kernel.shape[1] // 2, kernel.shape[0] // 2, kernel.shape[0] // 2)
    return F.conv2d(F.pad(x, pad, mode="replicate"), k, groups=channels).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Out-of-focus blur; sigma grows with the image size (given for 48 px)."""
    sigma = (0.5, 0.75, 1.0, 1.5, 2.0)[severity - 1] * x.shape[-1] / 48
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return _depthwise(x, torch.outer(g, g).float())


def motion_blur(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Camera or head motion: a line kernel with a seeded angle (lengths given for <= 48 px, scaled up above)."""
    length = round((3, 5, 7, 9, 11)[severity - 1] * max(1.0, x.shape[-1] / 48))
    size = length if length % 2 else length + 1
    angle = float(torch.rand(1, generator=_generator(seed))) * math.pi
    kernel = torch.zeros(size, size)
    centre = size // 2
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
        kernel[round(centre + t * math.sin(angle)), round(centre + t * math.cos(angle))] = 1.0
    return _depthwise(x, kernel / kernel.sum())


def jpeg(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """JPEG compression artefacts (quality 30, 20, 15, 10, 7)."""
    import cv2

    quality = (30, 20, 15, 10, 7)[severity - 1]
    images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in images:
        gray = image.shape[2] == 1 or (np.array_equal(image[..., 0], image[..., 1])
                                       and np.array_equal(image[..., 1], image[..., 2]))
        src = image[..., 0] if gray else image
        ok, buf = cv2.imencode(".jpg", src, [cv2.IMWRITE_JPEG_QUALITY, quality])
        dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        dec = np.repeat(dec[..., None], image.shape[2], 2) if dec.ndim == 2 else dec
        out.append(dec)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.dtype).div(255)


def low_light(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Under-exposure: scale brightness down, with a gamma that crushes shadows."""
    gain = (0.7, 0.55, 0.4, 0.3, 0.2)[severity - 1]
    return (gain * x.pow(1.2)).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Low contrast (haze, glare): pull every pixel toward the image mean."""
    factor = (0.6, 0.45, 0.3, 0.2, 0.12)[severity - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


CORRUPTIONS = {f.__name__: f for f in (gaussian_noise, shot_noise, gaussian_blur, motion_blur, jpeg, low_light,
                                       contrast)}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply one named corruption at severity 1-5 (deterministic for the seed)."""
    if name not in CORRUPTIONS:
        raise EmoshieldError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)} or all")
    if severity not in SEVERITIES:
        raise EmoshieldError(f"corruption severity must be 1-5, got {severity}")
    with torch.no_grad():
        return CORRUPTIONS[name](x.detach(), severity, seed)


def parse_corruptions(spec: str | None) -> list[str]:
    if not spec:
        return []
    names = list(CORRUPTIONS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in CORRUPTIONS:
            raise EmoshieldError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)} or all")
    return names
