"""Exact re-formulations of the convolutions oneDNN runs slowly in attack passes.

An attack pass needs the input gradient of a frozen, eval-mode network (folding.py builds
that copy). Profiling resnet18 at 48 px on CPU (ONEDNN_VERBOSE, batch 128) showed two places
where the convolution kernels, not the arithmetic, set the time:
- convolutions on tiny maps (layer4 runs 3x3 kernels on 2x2 maps): the kernel computes all
  nine taps per output although only four touch the image; as one dense matrix over the
  whole map (input pixels x channels -> output pixels x channels) the same linear map is a
  single GEMM with 16/36 of the multiply-adds, forward and backward (1.8x faster measured);
- the input gradient of a strided stem on few channels (7x7 stride-2 on RGB): oneDNN's
  backward-data kernel vectorizes over the 3 input channels; the same gradient as a stride-1
  transposed convolution on the space-to-depth view (pixel_unshuffle: 3 -> 12 channels) is
  about 2x faster.
Both compute the same function up to float rounding. `AttackConv2d` picks per call and
falls back to the plain convolution whenever its weights need gradients (training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# dense matrices above this many elements (64 MB of float32) are not built
DENSE_MAX_ELEMENTS = 1 << 24
# the space-to-depth input gradient is used for strided convolutions on at most this many input channels
SPACE_TO_DEPTH_MAX_CHANNELS = 4


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _SpaceToDepthInputGradient(torch.autograd.Function):
    """conv2d forward as is; its input gradient through the space-to-depth formulation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "AttackConv2d") -> torch.Tensor:
        # the kernel as of this forward pass, so the gradient matches the output it belongs to
        ctx.weight, ctx.stride, ctx.padding = module._space_to_depth_weight(), module.stride[0], module.padding
        ctx.in_size = x.shape[-2:]
        return module._plain(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pad_h, pad_w), (height, width) = ctx.padding, ctx.in_size
        shuffled = F.pixel_shuffle(F.conv_transpose2d(grad, ctx.weight), ctx.stride)
        # rows/columns of the padded input no output reads get no gradient
        shuffled = F.pad(shuffled, (0, max(0, pad_w + width - shuffled.shape[-1]),
                                    0, max(0, pad_h + height - shuffled.shape[-2])))
        return shuffled[..., pad_h:pad_h + height, pad_w:pad_w + width], None


class AttackConv2d(nn.Conv2d):
    """A Conv2d for frozen attack copies: dense-matrix forward/backward on maps smaller than
    the kernel, space-to-depth input gradient for strided stems on few channels."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "AttackConv2d":
        """A stand-in sharing `conv`'s parameters (in-place weight updates reach both)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    @staticmethod
    def eligible(conv: nn.Module) -> bool:
        """Plain, dense (groups 1), zero-padded convolutions with a kernel wider than one pixel
        (a 1x1 convolution is already one GEMM)."""
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and conv.kernel_size[0] * conv.kernel_size[1] > 1)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache_key: tuple | None = None
        self._dense: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._s2d_weight: torch.Tensor | None = None

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def _check_cache(self) -> None:
        """Drop derived kernels when the weights changed in place (version counter) or moved."""
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        try:
            key = tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors have no version counter: never reuse
            key = None
        if key is None or key != self._cache_key:
            self._cache_key, self._dense, self._s2d_weight = key, {}, None

    def _uses_dense(self, height: int, width: int) -> bool:
        if height * width >= self.kernel_size[0] * self.kernel_size[1]:
            return False
        out_h, out_w = self._out_hw(height, width)
        return out_h > 0 and out_w > 0 and (
            height * width * self.in_channels * out_h * out_w * self.out_channels <= DENSE_MAX_ELEMENTS)

    @torch.no_grad()
    def _dense_matrix(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M, bias) with flat_out = flat_in @ M.T + bias (F.linear: MKL runs this layout ~1.5x
        faster than flat_in @ M at batch 128), flat = (row, column, channel) order, i.e. a
        channels_last map read as one vector."""
        entry = self._dense.get((height, width))  # locals throughout: safe beside a concurrent reset
        if entry is None:
            (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.stride
            (pad_h, pad_w), (dil_h, dil_w) = self.padding, self.dilation
            out_h, out_w = self._out_hw(height, width)
            matrix = self.weight.new_zeros(out_h, out_w, self.out_channels, height, width, self.in_channels)
            for oy in range(out_h):
                for ox in range(out_w):
                    for ky in range(kernel_h):
                        iy = oy * stride_h - pad_h + ky * dil_h
                        if not 0 <= iy < height:
                            continue
                        for kx in range(kernel_w):
                            ix = ox * stride_w - pad_w + kx * dil_w
                            if 0 <= ix < width:
                                matrix[oy, ox, :, iy, ix, :] += self.weight[:, :, ky, kx]
            bias = None if self.bias is None else self.bias.repeat(out_h * out_w)
            entry = (matrix.reshape(-1, height * width * self.in_channels), bias)
            self._dense[(height, width)] = entry
        return entry

    def _uses_space_to_depth(self) -> bool:
        stride_h, stride_w = self.stride
        return (stride_h == stride_w >= 2 and self.dilation == (1, 1)
                and self.in_channels <= SPACE_TO_DEPTH_MAX_CHANNELS)

    @torch.no_grad()
    def _space_to_depth_weight(self) -> torch.Tensor:
        """The kernel as a stride-1 kernel over pixel_unshuffle(padded input, stride)."""
        weight = self._s2d_weight
        if weight is None:
            stride = self.stride[0]
            (kernel_h, kernel_w) = self.kernel_size
            taps_h, taps_w = -(-kernel_h // stride), -(-kernel_w // stride)
            weight = F.pad(self.weight.contiguous(), (0, taps_w * stride - kernel_w, 0, taps_h * stride - kernel_h))
            weight = weight.reshape(self.out_channels, self.in_channels, taps_h, stride, taps_w, stride)
            weight = weight.permute(0, 1, 3, 5, 2, 4).reshape(
                self.out_channels, self.in_channels * stride * stride, taps_h, taps_w).contiguous()
            self._s2d_weight = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if not frozen or x.dim() != 4:
            return self._plain(x)
        self._check_cache()
        batch, _, height, width = x.shape
        if self._uses_dense(height, width):
            matrix, bias = self._dense_matrix(height, width)
            flat = x.permute(0, 2, 3, 1).reshape(batch, -1)
            out = F.linear(flat, matrix, bias)
            return out.view(batch, *self._out_hw(height, width), self.out_channels).permute(0, 3, 1, 2)
        if self._uses_space_to_depth() and x.requires_grad:
            return _SpaceToDepthInputGradient.apply(x, self)
        return self._plain(x)

    def _out_hw(self, height: int, width: int) -> tuple[int, int]:
        return (_out_size(height, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
                _out_size(width, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]))


def accelerate_convolutions(module: nn.Module) -> list[str]:
    """Swap every plain Conv2d under `module` for an AttackConv2d sharing its parameters;
    returns the swapped names."""
    swapped = []
    for name, child in list(module.named_modules()):
        if name and AttackConv2d.eligible(child):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, AttackConv2d.from_conv(child))
            swapped.append(name)
    return swapped
