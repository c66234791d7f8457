"""--device and --amp: GPU selection with clear errors, bfloat16 training passes on CPU with
float32 attack passes, and checkpoints that resume across devices and older versions."""

import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from emoshield.errors import EmoshieldError
from emoshield.models import ModelConfig, build_model
from emoshield.training import DefenseConfig, TensorData, TrainConfig, Trainer
from emoshield.training.devices import resolve_device
from emoshield.training.trainer import _same_config


def test_device_names_resolve_or_fail_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EmoshieldError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EmoshieldError, match="no CUDA GPU"):
            resolve_device("cuda:0")
        proc = subprocess.run([sys.executable, "-m", "emoshield", "train", "--dataset", "ckplus48", "--device", "cuda",
                               "--out", "/nonexistent"], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr


def test_amp_trains_in_bfloat16_but_attacks_in_float32(tmp_path, monkeypatch):
    import emoshield.attacks.base as base
    import emoshield.training.devices as devices

    monkeypatch.setattr(devices, "native_bfloat16", lambda: True)  # emulated where the CPU lacks it: same dtypes
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="smallcnn", classes=list("abc"), input_size=32))
    g = torch.Generator().manual_seed(0)
    data = TensorData((torch.rand(24, 3, 32, 32, generator=g) * 255).to(torch.uint8), torch.randint(0, 3, (24,), generator=g))
    attack_dtypes, train_dtypes = [], []
    real_gradient = base.input_gradient

    def recording_gradient(m, x, y):
        grad, logits = real_gradient(m, x, y)
        attack_dtypes.append((logits.dtype, grad.dtype))
        return grad, logits

    monkeypatch.setattr(base, "input_gradient", recording_gradient)
    # the hook is copied into the attacks' BatchNorm-folded graph too, where the conv is in eval mode
    model.features[0].register_forward_hook(
        lambda module, inputs, output: train_dtypes.append(output.dtype) if torch.is_grad_enabled() and module.training
        else None)
    Trainer(model, TrainConfig(epochs=1, batch_size=8, amp=True, device="cpu"), tmp_path, progress=False,
            log=lambda m: None, defense=DefenseConfig()).fit(data, None)
    assert attack_dtypes and set(attack_dtypes) == {(torch.float32, torch.float32)}
    assert train_dtypes and set(train_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_amp_on_a_cpu_without_native_bfloat16_trains_in_float32_and_says_so(tmp_path, monkeypatch):
    import emoshield.training.devices as devices

    monkeypatch.setattr(devices, "native_bfloat16", lambda: False)  # an AVX2-only CPU (EPYC Zen 3)
    model = build_model(ModelConfig(backbone="smallcnn", classes=list("ab"), input_size=16))
    dtypes, lines = [], []
    model.features[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    g = torch.Generator().manual_seed(0)
    data = TensorData((torch.rand(8, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.tensor([0, 1] * 4))
    Trainer(model, TrainConfig(epochs=1, batch_size=4, amp=True, device="cpu"), tmp_path, progress=False,
            log=lines.append).fit(data, None)
    assert dtypes and set(dtypes) == {torch.float32}
    assert any("no native bfloat16" in line and "float32" in line for line in lines)
    assert not any(line.startswith("mixed precision") for line in lines)


def test_native_bfloat16_agrees_with_the_cpu_flags():
    from emoshield.training.devices import native_bfloat16

    flags = set(open("/proc/cpuinfo").read().split())
    assert native_bfloat16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_resume_ignores_the_device_and_fills_settings_added_later():
    saved = asdict(TrainConfig(device="cuda"))
    assert _same_config(saved, asdict(TrainConfig(device="cpu")))
    older = {k: v for k, v in saved.items() if k not in ("amp", "device")}  # a checkpoint from before --amp
    assert _same_config(older, asdict(TrainConfig()))
    assert not _same_config(older, asdict(TrainConfig(amp=True)))
    assert not _same_config(saved, asdict(TrainConfig(lr=0.1)))
