"""Per-epoch checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the model, the optimizer's state, the RNG states and the history, so
a resumed run continues exactly where the interrupted one stopped. Files are replaced
atomically, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import EmoshieldError

CHECKPOINT = "checkpoint.safetensors"


def _optimizer_split(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: dict, scaler=None) -> None:
    """Write the checkpoint of a finished epoch as ONE file (`state` must be JSON-able): also
    every CUDA device's RNG state when CUDA is in use, and the AMP GradScaler's state (its loss
    scale and growth tracker), so a resumed GPU run is the run it continues."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = _optimizer_split(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    extra = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
    tmp = folder / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(dict(state, optimizer=optim_meta, **extra))})
    os.replace(tmp, folder / CHECKPOINT)


def has_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT).is_file()


def refuse_unless_resuming(folder: Path, resume: bool) -> None:
    """A folder that holds a checkpoint is continued (--resume) or left alone, never started over."""
    if has_checkpoint(folder) and not resume:
        raise EmoshieldError(f"{folder} already holds a training checkpoint; "
                             "pass --resume to continue it or choose another --out")


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, scaler=None) -> dict:
    """Restore model, optimizer, RNGs (CUDA's too) and the GradScaler in place; return the
    saved JSON state."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / CHECKPOINT), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for bad files
        raise EmoshieldError(f"cannot read checkpoint {folder / CHECKPOINT}: {exc}") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_optimizer_join(tensors, meta.pop("optimizer")))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    scaler_state = meta.pop("grad_scaler", None)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    return meta
