"""3D convolution that keeps small CPU convolutions on oneDNN (forward and backward).

PyTorch sends a float32 CPU ``conv3d`` with batch 1, a kernel of at most 3 and fewer than 20480
``N*C*D*H`` input elements to its reference ``slow_conv3d`` (im2col, contiguous output) instead of
oneDNN, and does the same in the backward pass; at 16^3 latents that is every convolution of
BiFlowNet and most of a training step. :class:`FastConv3d` runs those convolutions with
``torch.mkldnn_convolution`` instead: the forward pass, the input gradient (a convolution of the
zero-dilated output gradient with the flipped, transposed kernel) and the weight gradient (one matrix
product with the im2col of the input). Other cases (CUDA, groups, dilation, batches and inputs that
PyTorch already sends to oneDNN or cuDNN) run the ordinary ``nn.Conv3d`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

if torch.ops.aten.mkldnn_convolution.default not in flop_registry:  # torch counts aten.convolution only

    @register_flop_formula(torch.ops.aten.mkldnn_convolution)
    def _onednn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """FLOPs of the oneDNN convolutions below, so that ``torch.utils.flop_counter`` sees them too."""
        return conv_flop_count(x_shape, w_shape, out_shape)


# PyTorch's own threshold (ATen ConvParams::use_mkldnn): at or below it, a batch-1 float conv3d is not oneDNN's
_SLOW_PATH_ELEMENTS = 20480


def takes_slow_path(x: torch.Tensor, weight: torch.Tensor, dilation, groups: int) -> bool:
    """Whether PyTorch would run this float32 CPU conv3d (and its backward) on the reference kernel."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 5
            and x.shape[0] == 1 and groups == 1 and all(d == 1 for d in dilation) and max(weight.shape[2:]) <= 3
            and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= _SLOW_PATH_ELEMENTS)


class _OneDnnConv3d(torch.autograd.Function):
    """Zero-padded, ungrouped, undilated conv3d whose forward and backward both run on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int, int], padding: tuple[int, int, int]):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        ctx.has_bias = bias is not None
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        s, p, k = ctx.stride, ctx.padding, weight.shape[2:]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution, as a stride-1 convolution of the zero-dilated output gradient with the
            # flipped, transposed kernel; `extra` restores input voxels that no output window reached
            g = grad
            if any(si > 1 for si in s):
                size = [(n - 1) * si + 1 for n, si in zip(grad.shape[2:], s)]
                g = grad.new_zeros(*grad.shape[:2], *size).contiguous(memory_format=torch.channels_last_3d)
                g[:, :, ::s[0], ::s[1], ::s[2]] = grad
            extra = [n - ((o - 1) * si - 2 * pi + ki) for n, o, si, pi, ki in zip(x.shape[2:], grad.shape[2:], s, p, k)]
            pads = []
            for ki, pi, ei in reversed(list(zip(k, p, extra))):
                pads += [ki - 1 - pi, ki - 1 - pi + ei]
            w_t = weight.transpose(0, 1).flip(2, 3, 4).contiguous(memory_format=torch.channels_last_3d)
            grad_x = torch.mkldnn_convolution(F.pad(g, pads), w_t, None, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)
        if ctx.needs_input_grad[1]:
            # one matrix product: (C_out, N*D*H*W) @ im2col (N*D*H*W, kd*kh*kw*C_in)
            xp = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0])).permute(0, 2, 3, 4, 1)  # (N, D', H', W', C_in)
            cols = xp.unfold(1, k[0], s[0]).unfold(2, k[1], s[1]).unfold(3, k[2], s[2])  # (N, D, H, W, C_in, kd, kh, kw)
            cols = cols[:, :grad.shape[2], :grad.shape[3], :grad.shape[4]]
            cols = cols.permute(0, 1, 2, 3, 5, 6, 7, 4)  # channels innermost: the im2col copy moves whole rows
            g = grad.permute(0, 2, 3, 4, 1).reshape(-1, grad.shape[1])  # (N*D*H*W, C_out)
            grad_w = (g.t() @ cols.reshape(g.shape[0], -1)).reshape(weight.shape[0], *k, weight.shape[1])
            grad_w = grad_w.permute(0, 4, 1, 2, 3)  # (C_out, C_in, kd, kh, kw) with channels_last_3d strides
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None, None


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose small CPU float32 convolutions run on oneDNN in both directions (same parameters)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.padding_mode == "zeros" and not isinstance(self.padding, str) and not torch.is_autocast_enabled("cpu")
                and takes_slow_path(x, weight, self.dilation, self.groups)):
            return _OneDnnConv3d.apply(x, weight, bias, tuple(self.stride), tuple(self.padding))
        return super()._conv_forward(x, weight, bias)


def use_fast_conv3d(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` inside ``module`` (MONAI blocks included) into a :class:`FastConv3d`.

    Parameters, names and state-dict keys stay as they are; returns ``module``.
    """
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = FastConv3d
    return module


__all__ = ["FastConv3d", "takes_slow_path", "use_fast_conv3d"]
