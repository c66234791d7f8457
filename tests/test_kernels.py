"""The attack-pass convolution kernels (emoshield/attacks/kernels.py) compute what nn.Conv2d computes."""

import pytest
import torch
import torch.nn.functional as F

from emoshield.attacks.kernels import AttackConv2d, accelerate_convolutions


def _frozen_pair(*args, seed: int = 0, **kwargs) -> tuple[torch.nn.Conv2d, AttackConv2d]:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(*args, **kwargs).requires_grad_(False)
    return conv, AttackConv2d.from_conv(conv)


def _value_and_input_gradient(module, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out, grad


def _assert_same(conv, fast, x, path):
    upstream = torch.randn_like(conv(x))
    out, grad = _value_and_input_gradient(conv, x, upstream)
    fast_out, fast_grad = _value_and_input_gradient(fast, x, upstream)
    assert fast_out.shape == out.shape and fast_grad.shape == grad.shape
    assert torch.allclose(fast_out, out, atol=1e-5), (path, (fast_out - out).abs().max())
    assert torch.allclose(fast_grad, grad, atol=1e-5), (path, (fast_grad - grad).abs().max())


@pytest.mark.parametrize("config, size", [
    (dict(in_channels=16, out_channels=8, kernel_size=3, padding=1), (2, 2)),  # resnet18's layer4 at 48 px
    (dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1, bias=False), (3, 3)),
    (dict(in_channels=8, out_channels=4, kernel_size=3, padding=(1, 2), dilation=(1, 2)), (2, 3)),
    (dict(in_channels=4, out_channels=4, kernel_size=(1, 5), padding=(0, 2)), (4, 1)),
    (dict(in_channels=4, out_channels=4, kernel_size=3), (2, 3)),  # no padding, map smaller than the kernel
])
def test_dense_small_map_path_equals_the_convolution(config, size):
    conv, fast = _frozen_pair(**config)
    x = torch.randn(5, config["in_channels"], *size)
    try:
        conv(x)
    except RuntimeError:  # an input smaller than the kernel without padding: both refuse
        with pytest.raises(RuntimeError):
            fast(x)
        return
    _assert_same(conv, fast, x, "dense")
    assert (size in fast._dense) == (size[0] * size[1] < fast.kernel_size[0] * fast.kernel_size[1])
    # channels_last input (what the folded attack copy feeds it) gives the same numbers
    _assert_same(conv, fast, x.contiguous(memory_format=torch.channels_last), "dense, channels_last")


@pytest.mark.parametrize("kernel, stride, padding, size", [
    (7, 2, 3, 48), (7, 2, 3, 47), (3, 2, 1, 33), (11, 4, 2, 45), (2, 2, 0, 49), (5, 3, 2, 20)])
def test_space_to_depth_input_gradient_equals_the_convolutions(kernel, stride, padding, size):
    conv, fast = _frozen_pair(3, 6, kernel, stride, padding)
    assert fast._uses_space_to_depth()
    _assert_same(conv, fast, torch.rand(4, 3, size, size), "space-to-depth")


def test_trainable_weights_and_larger_maps_take_the_plain_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    fast = AttackConv2d.from_conv(conv)  # shares the trainable parameters
    x = torch.randn(2, 4, 2, 2)
    F.mse_loss(fast(x), torch.zeros(2, 4, 2, 2)).backward()
    assert fast._dense == {} and conv.weight.grad is not None  # weight gradients: the real convolution
    conv.requires_grad_(False)
    fast(torch.randn(2, 4, 3, 3))
    assert fast._dense == {}  # 3x3 map, 3x3 kernel: a dense matrix would save nothing


def test_dense_matrices_follow_in_place_weight_updates():
    conv, fast = _frozen_pair(4, 4, 3, padding=1)
    x = torch.randn(3, 4, 2, 2)
    assert torch.allclose(fast(x), conv(x), atol=1e-5)
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # what FoldedModel.refresh does after a training step
        conv.bias.add_(1.0)
    assert torch.allclose(fast(x), conv(x), atol=1e-5)


def test_accelerate_swaps_only_what_can_gain_and_keeps_the_function():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=2, padding=3),      # strided RGB stem
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1),                           # 1x1: already a GEMM
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),      # depthwise
        torch.nn.Conv2d(8, 8, 3, stride=4, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding=1),                # runs on a 2x2 map
        torch.nn.Flatten(), torch.nn.Linear(32, 3)).requires_grad_(False).eval()
    x = torch.rand(4, 3, 16, 16)
    out, grad = _value_and_input_gradient(model, x, torch.ones(4, 3))
    assert accelerate_convolutions(model) == ["0", "4", "5"]
    fast_out, fast_grad = _value_and_input_gradient(model, x, torch.ones(4, 3))
    assert torch.allclose(fast_out, out, atol=1e-5) and torch.allclose(fast_grad, grad, atol=1e-5)
    assert (2, 2) in model[5]._dense


def test_resnet18_attack_copy_at_48px_uses_both_paths_and_keeps_the_input_gradient():
    from emoshield.attacks.base import attack_context, input_gradient
    from emoshield.attacks.folding import eval_graph
    from emoshield.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig("resnet18", ["a", "b", "c"], 48))
    with torch.no_grad():
        model.train()
        model(torch.rand(8, 3, 48, 48))
    model.eval()
    x, y = torch.rand(6, 3, 48, 48), torch.tensor([0, 1, 2, 0, 1, 2])
    with attack_context(model):
        fast = eval_graph(model)
        grad, logits = input_gradient(fast, x, y)
        ref_grad, ref_logits = input_gradient(model, x, y)
    swapped = {name: m for name, m in fast.named_modules() if isinstance(m, AttackConv2d)}
    dense = sorted(name for name, m in swapped.items() if m._dense)
    assert dense == ["inner.features.7.0.conv2", "inner.features.7.1.conv1", "inner.features.7.1.conv2"]
    assert swapped["inner.features.0"]._s2d_weight is not None  # the 7x7 stride-2 RGB stem
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert torch.allclose(grad, ref_grad, atol=1e-5 * ref_grad.abs().max().item())
    from emoshield.attacks.folding import FoldedModel

    plain = FoldedModel(model, kernels=False)  # the fold alone (bench/attacks.py's "fold only")
    assert not any(isinstance(m, AttackConv2d) for m in plain.modules())
    assert torch.allclose(plain(x), ref_logits, atol=1e-4)
