"""Where training runs: `--device auto|cpu|cuda[:N]`, and mixed precision (`--amp`).

Mixed precision covers the training passes only (forward and loss under autocast: bfloat16 on
CPU, float16 with a gradient scaler on CUDA). Attack passes always run in float32, unless a
caller opts out: FGSM and PGD use the SIGN of the input gradient, and in float16 small gradient
components round to zero (sign 0: that pixel is not perturbed) or flip, which weakens the attack
and overstates robustness; the extra cost is one float32 pass per attack step.

bfloat16 pays on CPUs that compute it natively (AVX512-BF16 or AMX: 1.8x faster SmallCNN epochs
measured on a Xeon); elsewhere (e.g. AVX2-only EPYC Zen 3) oneDNN emulates it, so `--amp` on such
a CPU trains in float32 and says so.
"""

from __future__ import annotations

import torch

from ..errors import EmoshieldError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto = the GPU when there is one; under torchrun each process takes its LOCAL_RANK's GPU."""
    base, _, index = name.partition(":")
    if base not in DEVICES or (index and not index.isdigit()):
        raise EmoshieldError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if base == "auto":
        base = "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EmoshieldError(f"--device {name}: no CUDA GPU is visible to torch on this machine")
    return torch.device("cuda", int(index) if index else local_rank % torch.cuda.device_count())


def autocast(device: torch.device, enabled: bool):
    """The training passes' autocast context (a no-op when disabled)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """float16 gradients need loss scaling; bfloat16 (CPU) has float32's range and does not."""
    return torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the flags
        try:
            flags = set(open("/proc/cpuinfo").read().split())
        except OSError:
            return False
        return bool(flags & {"avx512_bf16", "amx_bf16"})


def effective_amp(device: torch.device, requested: bool, log=None) -> bool:
    """--amp as it will run here: on a CPU without native bfloat16 it falls back to float32."""
    if requested and device.type == "cpu" and not native_bfloat16():
        if log is not None:
            log("--amp: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where oneDNN would emulate it; "
                "training in float32")
        return False
    return requested
