"""Eval-mode stand-ins for attack passes: each Conv2d+BatchNorm2d pair folded into one
convolution, channels_last memory, the faster convolution forms of kernels.py, cached per model.

Why: in eval mode a BatchNorm after a convolution is an affine map, so folding it into the
convolution's weights gives the same function with fewer passes over memory (1.1-2x faster
input gradients on CPU; bench/attacks.py). Building the folded copy (trace, deep copy, fold)
costs about as much as one batch-128 gradient of resnet18, so the copy is built once per model
and afterwards only its weights are refreshed in place (copy and re-fold: a few milliseconds)
when the model's parameters or buffers have changed, e.g. after each training step.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref

import torch
from torch import fx, nn

from .kernels import accelerate_convolutions

# below this many (images x gradient evaluations) building a folded copy costs more than it
# saves (resnet18 and mobilenet_v2 at 48 px, one thread: batch 16 x 1 gradient loses 1.7-2.2x,
# 32 x 2 breaks even)
FOLD_MIN_GRADIENT_IMAGES = 64


class _ChannelsLast(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(itertools.chain(model.named_parameters(), model.named_buffers()))


def _structure_key(model: nn.Module) -> tuple:
    """Changes when a submodule, parameter or buffer is replaced, reshaped or moved."""
    return (tuple((id(m), type(m)) for m in model.modules())
            + tuple((id(t), t.shape, t.dtype, t.device) for _, t in _tensors(model)))


def _version_key(model: nn.Module) -> tuple | None:
    """Changes whenever a parameter or buffer changes in place (optimizer steps, load_state_dict
    and BatchNorm running statistics all bump the tensor's version counter) or gets new storage.
    None when a tensor has no version counter (made under inference_mode): never reused then."""
    try:
        return tuple((t.data_ptr(), t._version) for _, t in _tensors(model))
    except RuntimeError:
        return None


def _fold_graph(model: nn.Module, kernels: bool = True) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    """A traced copy of `model` whose foldable convolutions (see FoldedModel) got a bias and
    whose BatchNorm after each is gone; their weights are set by FoldedModel.refresh. With
    `kernels`, convolutions take kernels.py's faster forms where they apply."""
    graph_module = fx.symbolic_trace(copy.deepcopy(model))  # raises when not traceable
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}  # a convolution called at several places (shared weights) stays as is
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: list[tuple[str, str]] = []
    for node in list(graph_module.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        if not (isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats
                and isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1
                and calls[source.target] == 1):
            continue
        conv = modules[source.target]  # already a copy: it becomes the folded convolution
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_empty(conv.out_channels))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        pairs.append((source.target, node.target))
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    if kernels:
        accelerate_convolutions(graph_module)
    for p in graph_module.parameters():
        p.requires_grad_(False)
    return graph_module.to(memory_format=torch.channels_last).eval(), pairs


class FoldedModel(_ChannelsLast):
    """A traced copy of `model` with Conv2d -> BatchNorm2d pairs folded (where the convolution is
    called once, its output feeds only the BatchNorm, and the BatchNorm uses running
    statistics); `refresh` re-copies every weight from the model and re-folds, in place."""

    def __init__(self, model: nn.Module, kernels: bool = True):
        graph_module, pairs = _fold_graph(model, kernels)
        super().__init__(graph_module)
        self.pairs = pairs
        self._folded_names = {name for name, _ in pairs}
        self.refresh(model)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Make this copy compute what `model` computes in eval mode now."""
        source = dict(_tensors(model))
        for name, tensor in _tensors(self.inner):
            if name.rpartition(".")[0] not in self._folded_names:
                tensor.copy_(source[name])
        for conv_name, norm_name in self.pairs:
            conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
            target = self.inner.get_submodule(conv_name)
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            target.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            target.bias.copy_(shift if conv.bias is None else conv.bias * scale + shift)


# model -> (structure key, version key, FoldedModel or None when torch.fx cannot trace it); weak
# keys, and the copies never refer back to their model, so an entry goes when its model does
_CACHE: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def eval_graph(model: nn.Module, gradient_images: int | None = None) -> nn.Module:
    """A faster stand-in for `model` in eval mode, for attack passes (see the module docstring).
    Same function up to float rounding, as the model is at this call: the copy is cached per
    model and refreshed in place by the next call after the model changed, so use it before
    changing the model (training steps always attack the current model). Call with the model in
    eval mode and its parameters frozen (attack_context does both). Returns `model` itself when
    torch.fx cannot trace it, or when no copy exists yet and `gradient_images` (batch size x
    gradient evaluations of the coming attack) is below FOLD_MIN_GRADIENT_IMAGES."""
    too_small = gradient_images is not None and gradient_images < FOLD_MIN_GRADIENT_IMAGES
    with _LOCK:
        entry = _CACHE.get(model)
        if entry is None and too_small:  # before computing the keys: small attacks stay cheap
            return model
        structure, version = _structure_key(model), _version_key(model)
        if entry is not None and entry[0] == structure:
            if entry[2] is None:
                return model
            if version is None or entry[1] != version:
                entry[2].refresh(model)
                entry[1] = version
            return entry[2].eval()
        if too_small:
            return model
        try:
            folded = FoldedModel(model)
        except Exception:  # not traceable by torch.fx (data-dependent control flow): run it as is
            folded = None
        _CACHE[model] = [structure, version, folded]
        return model if folded is None else folded
