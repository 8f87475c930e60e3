"""3D convolution that keeps small CPU convolutions on oneDNN (forward and backward) where that pays.

PyTorch sends a float32 CPU ``conv3d`` with batch 1, a kernel of at most 3 and fewer than 20480
``N*C*D*H`` input elements to its reference ``slow_conv3d`` (im2col, contiguous output) instead of
oneDNN, and does the same in the backward pass; at 16^3 latents that is every convolution of
BiFlowNet. :class:`FastConv3d` runs the stride-1 ones on grids of at least ``MIN_ONEDNN_VOXELS``
voxels with ``torch.mkldnn_convolution`` instead: the forward pass, the input gradient (a convolution
of the output gradient with the flipped, transposed kernel) and the weight gradient (one matrix
product with the im2col of the input).

Where padding the input by hand lifts it over that threshold (72 channels at 16^3: 72 * 18 * 18 > 20480),
:class:`FastConv3d` does just that and convolves the padded input without padding: PyTorch itself then
takes oneDNN in both directions, its weight-gradient kernel included (measured for the base preset's 72 ->
72 convolutions at 16^3, fp32, forward + backward, 2 threads, 2-core AMD EPYC with AVX-512: 14.6 ms,
against 19.2 ms on the oneDNN path below, whose weight gradient is an im2col product, and 42 ms on the
reference kernel; the convolutions alone took the whole base training step at 16^3 to 0.92-0.95x).

Where the line lies was measured (forward + backward, fp32, 2 threads, 2-core AMD EPYC): oneDNN takes
31 ms instead of 55 ms for a 72-channel 16^3 convolution and 14 instead of 20 ms at 144 x 8^3, but on
4^3 and 2^3 grids with hundreds of channels re-laying out the large kernel costs more than the
convolution (576 x 2^3: 51 instead of 27 ms), and strided ones lose too (72 x 16^3, stride 2: 12 instead
of 8.5 ms). Those, and the cases PyTorch already sends to oneDNN or cuDNN (CUDA, groups, dilation,
batches, larger inputs), run the ordinary ``nn.Conv3d`` path.

Convolutions whose output grid has at most ``MAX_IM2COL_VOXELS`` voxels per sample (the 2^3 bottom of
the U-Net, where ``base`` has 576- and 1152-channel 3^3 kernels of 9 and 18 M weights), and fewer output
positions in the batch than weights per output channel, run as one matrix product with their im2col
instead. There the
cost is moving the kernel, not computing: oneDNN re-lays it out for every call, PyTorch's reference
kernel accumulates the weight gradient once per sample, and bf16 autocast adds a cast of the kernel, a
reorder into the AMX layout and a weight-gradient kernel that is slower than the fp32 one. Under CPU
bf16 autocast the products run in bf16 only where the CPU has native bf16 dot products (AVX512-BF16 or
AMX; the input-gradient fold still adds up in fp32) and bf16 was timed faster for that shape
(:func:`bf16_products_pay`), else in fp32. With few rows these products mostly move the kernel, and bf16
adds a cast of it and of its gradient, so machines disagree: on one 2-core AMD EPYC with AVX512-BF16 the
bf16 products won against MKL's fp32 ones (576 x 15552 kernel, 2 threads: cast 0.9 ms, forward product 0.6
instead of 2.6 ms, input-gradient product 0.7 instead of 3.0 ms; base step at 16^3 0.90x), while on another
(AMD EPYC, family 26) fp32 on oneDNN won up to 32 rows (576 -> 576 channels on 2^3 under autocast,
forward + backward: 7.7 instead of 9.5 ms at batch 1, 10.1 instead of 11.5 at batch 4) and lost at 64
(16.5 instead of 14.8 ms at batch 8). Measured
when introduced (forward + backward, 2 threads, 2-core Xeon with AMX, glibc's default allocator;
``benchmarks/RESULTS.md``), 576 -> 576 channels on 2^3: 16.6 ms instead of 20.3 (batch 1, reference
kernel), 20.4 instead of 72.9 (batch 2, oneDNN), 31.9 instead of 102 (batch 8), and 43.9 ms under bf16
autocast; with the CLIs' allocator setting and the one-scatter fold, 5.0 ms at batch 1.

Under CPU bf16 autocast, convolutions on grids of at least ``MIN_CHANNELS_LAST_VOXELS`` voxels take
channels-last (NDHWC) inputs and leave channels-last outputs, so that oneDNN runs its brgemm kernels instead
of the older blocked-layout ones and no re-layout happens between consecutive convolutions; :class:`FastGroupNorm`
normalises such tensors in the contiguous layout, where PyTorch's CPU backward is several times faster
(2 threads, AMD EPYC with AVX512-BF16, 72 -> 72 channels at 16^3: forward + backward 10.0 instead of 13.1 ms;
base training step at 16^3 under bf16 autocast 0.95x).
Narrow fp32 convolutions (at most ``MAX_FP32_CHANNELS_LAST_CHANNELS`` channels in and out, batches of two or more)
take the same channels-last route outside autocast: there oneDNN's blocked-layout kernels spend more on re-laying out
the activations than on the products. Without AVX-512 the blocked backward also has no direct 3D weight-gradient
kernel and falls back to im2col + GEMM (2 threads, 2-core AMD EPYC, 16 -> 16 channels at 16^3, batch 4, forward +
backward: 6.6 -> 5.0 ms with the ISA capped at AVX2, 4.1 -> 1.7 ms with AVX-512; the ``tiny`` preset's demo training
step 0.87-0.96x with AVX2, unchanged with AVX-512). Wider convolutions stay in the contiguous layout, where fp32
channels-last measured slower (base preset at 16^3: 1.08x).

Without AVX-512 (ATen capability AVX2), oneDNN computes every fp32 conv3d weight gradient with im2col + GEMM, at
about half the speed of its forward kernels. There a training convolution with stride 1 and a kernel of 2+ takes its
weight gradient as one forward convolution instead: the zero-padded input, batch and channel axes swapped, convolved
with the output gradient as the kernel (:class:`_SwappedWeightGradConv3d`; the input gradient stays oneDNN's). Which
wins depends on the shape and on the layout copies the swap needs, so it is timed once per shape and layout
(:func:`routes_to_swapped_weight_grad`). Measured with the ISA capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``, 2 threads, 2-core AMD EPYC), weight gradient alone: 16 -> 16 channels at 32^3, batch 2,
12.4 -> 6.0 ms contiguous (8.8 -> about 7.8 ms channels-last, a tie the timing leaves to oneDNN); 32 -> 16 at 16^3,
batch 4, 6.0 -> 2.8 ms; the ``tiny`` preset's demo training step 0.93x. With AVX-512 oneDNN has a direct kernel,
3x faster than the swap, and the route is never taken.

PyTorch sends fp32 CPU matrix products to MKL's GEMM, and bf16 ones to oneDNN. On x86 the fp32 products
of the 2^3 path and of :class:`FastLinear` (every ``nn.Linear`` of BiFlowNet) run on oneDNN's inner product
where they are large enough to pay (``MIN_ONEDNN_PRODUCT``): measured 2-4x faster for the few-row products
of the 2^3 path and about 2x for the token MLPs and projections (2 threads, 2-core AMD EPYC with AVX-512).
"""

from __future__ import annotations

import functools
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes  # PyTorch's own, since 2.0
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

if torch.ops.aten.mkldnn_convolution.default not in flop_registry:  # torch counts aten.convolution only

    @register_flop_formula(torch.ops.aten.mkldnn_convolution)
    def _onednn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """FLOPs of the oneDNN convolutions below, so that ``torch.utils.flop_counter`` sees them too."""
        return conv_flop_count(x_shape, w_shape, out_shape)

if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._linear_pointwise.default not in flop_registry:

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _onednn_product_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        """FLOPs of the oneDNN products below (``a @ b.T``: 2 M N K), as ``torch.utils.flop_counter`` counts ``mm``."""
        return 2 * a_shape[0] * a_shape[1] * b_shape[0]


# PyTorch's own threshold (ATen ConvParams::use_mkldnn): at or below it, a batch-1 float conv3d is not oneDNN's
_SLOW_PATH_ELEMENTS = 20480
# smallest grid (D*H*W) on which our oneDNN path beats the reference kernel (measured: see the module docstring)
MIN_ONEDNN_VOXELS = 512
# largest output grid (D*H*W per sample) that runs as one matrix product with the im2col (module docstring)
MAX_IM2COL_VOXELS = 8
# smallest input grid (D*H*W) whose convolution runs channels-last (module docstring)
MIN_CHANNELS_LAST_VOXELS = 512
# widest fp32 convolution (input or output channels) that runs channels-last on batches of two or more (docstring)
MAX_FP32_CHANNELS_LAST_CHANNELS = 32


def takes_slow_path(x: torch.Tensor, weight: torch.Tensor, dilation, groups: int) -> bool:
    """Whether PyTorch would run this float32 CPU conv3d (and its backward) on the reference kernel."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 5
            and x.shape[0] == 1 and groups == 1 and all(d == 1 for d in dilation) and max(weight.shape[2:]) <= 3
            and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= _SLOW_PATH_ELEMENTS)


def routes_to_padded(x: torch.Tensor, weight: torch.Tensor, padding, dilation, groups: int) -> bool:
    """Whether :class:`FastConv3d` pads this slow-path convolution's input itself, so that PyTorch sends the
    padded one (and the backward pass) to oneDNN."""
    return (takes_slow_path(x, weight, dilation, groups) and any(p > 0 for p in padding)
            and x.shape[1] * (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1]) > _SLOW_PATH_ELEMENTS)


def routes_to_onednn(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether :class:`FastConv3d` runs this convolution on its oneDNN path (a slow-path one where that pays)."""
    return (takes_slow_path(x, weight, dilation, groups) and all(s == 1 for s in stride)
            and all(0 <= p < k for p, k in zip(padding, weight.shape[2:]))
            and x.shape[2] * x.shape[3] * x.shape[4] >= MIN_ONEDNN_VOXELS)


def routes_to_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None) -> bool:
    """Whether :class:`FastConv3d` runs this convolution on a channels-last input (and leaves its output so): grids of
    at least ``MIN_CHANNELS_LAST_VOXELS`` voxels, under CPU bf16 autocast, or in fp32 outside autocast for batches of
    two or more when ``weight`` has at most ``MAX_FP32_CHANNELS_LAST_CHANNELS`` input and output channels."""
    if not (x.device.type == "cpu" and x.dim() == 5 and x.is_floating_point() and groups == 1
            and x.shape[2] * x.shape[3] * x.shape[4] >= MIN_CHANNELS_LAST_VOXELS):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return (weight is not None and x.dtype == torch.float32 and x.shape[0] > 1
            and max(weight.shape[0], weight.shape[1]) <= MAX_FP32_CHANNELS_LAST_CHANNELS)


class _OneDnnConv3d(torch.autograd.Function):
    """Zero-padded, ungrouped, undilated, stride-1 conv3d whose forward and backward both run on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        p, k = ctx.padding, weight.shape[2:]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution: a convolution of the output gradient with the flipped, transposed kernel
            pads = [ki - 1 - pi for ki, pi in zip(k, p)]
            w_t = weight.transpose(0, 1).flip(2, 3, 4).contiguous(memory_format=torch.channels_last_3d)
            grad_x = torch.mkldnn_convolution(grad, w_t, None, pads, (1, 1, 1), (1, 1, 1), 1)
        if ctx.needs_input_grad[1]:
            # one matrix product: (C_out, N*D*H*W) @ im2col (N*D*H*W, kd*kh*kw*C_in)
            xp = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0])).permute(0, 2, 3, 4, 1)  # (N, D', H', W', C_in)
            cols = xp.unfold(1, k[0], 1).unfold(2, k[1], 1).unfold(3, k[2], 1)  # (N, D, H, W, C_in, kd, kh, kw)
            cols = cols[:, :grad.shape[2], :grad.shape[3], :grad.shape[4]]
            cols = cols.permute(0, 1, 2, 3, 5, 6, 7, 4)  # channels innermost: the im2col copy moves whole rows
            g = grad.permute(0, 2, 3, 4, 1).reshape(-1, grad.shape[1])  # (N*D*H*W, C_out)
            grad_w = _product(g.t(), cols.reshape(g.shape[0], -1).t()).reshape(weight.shape[0], *k, weight.shape[1])
            grad_w = grad_w.permute(0, 4, 1, 2, 3)  # (C_out, C_in, kd, kh, kw) with channels_last_3d strides
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


@functools.cache
def cpu_capability() -> str:
    """ATen's vector instruction set on this CPU ("AVX2", "AVX512", ...; ``ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


# the swapped weight gradient must beat oneDNN's by this factor before it is taken (near a tie, PyTorch's own is kept)
SWAPPED_WEIGHT_GRAD_MARGIN = 0.85


def routes_to_swapped_weight_grad(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                                  groups: int) -> bool:
    """Whether :class:`FastConv3d` computes this fp32 CPU convolution's weight gradient as a forward convolution of
    the input with the output gradient, batch and channel axes swapped (:class:`_SwappedWeightGradConv3d`): on CPUs
    whose ATen capability is AVX2 (no AVX-512, where oneDNN falls back to im2col + GEMM for it), for ungrouped,
    undilated, stride-1 convolutions with kernels of 2+ in every axis on grids of ``MIN_ONEDNN_VOXELS`` or more that
    train the weight, where that was timed faster for the shape and layout (:func:`_swapped_weight_grad_faster`)."""
    kernel = tuple(weight.shape[2:])
    if not (x.device.type == "cpu" and x.dim() == 5 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.is_grad_enabled() and weight.requires_grad and not torch.is_autocast_enabled("cpu")
            and groups == 1 and all(s == 1 for s in stride) and all(d == 1 for d in dilation)
            and min(kernel) > 1 and all(0 <= p < k for p, k in zip(padding, kernel))
            and x.shape[2] * x.shape[3] * x.shape[4] >= MIN_ONEDNN_VOXELS):
        return False
    if cpu_capability() != "AVX2":
        return False
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    return _swapped_weight_grad_faster(tuple(x.shape), tuple(weight.shape), tuple(padding), channels_last)


def _swapped_weight_grad(x: torch.Tensor, grad: torch.Tensor, padding) -> torch.Tensor:
    """Weight gradient ``(C_out, C_in, kd, kh, kw)`` of a stride-1 conv3d: the zero-padded input ``(C_in, N, ...)``
    convolved with the output gradient ``(C_out, N, ...)`` as the kernel, i.e. batch and channels swapped."""
    p = padding
    xp = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0])).transpose(0, 1).contiguous()
    return F.conv3d(xp, grad.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def _weight_grad_runs(x_shape: tuple, w_shape: tuple, padding: tuple, channels_last: bool):
    """``(onednn, swapped)``: callables computing a stride-1 conv3d's weight gradient on seeded data of these shapes
    and layout, with oneDNN's own backward and with :func:`_swapped_weight_grad` (the data come from a generator of
    their own, so the global random stream is left alone)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*x_shape, generator=g), torch.randn(*w_shape, generator=g)
    grid = output_grid(x, w, (1, 1, 1), padding, (1, 1, 1))
    grad = torch.randn(x_shape[0], w_shape[0], *grid, generator=g)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, grad))

    def onednn() -> None:
        torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1, 1], list(padding), [1, 1, 1], False, [0, 0, 0],
                                            1, [False, True, False])

    def swapped() -> None:
        _swapped_weight_grad(x, grad, padding)

    return onednn, swapped


@functools.cache
def _swapped_weight_grad_faster(x_shape: tuple, w_shape: tuple, padding: tuple, channels_last: bool) -> bool:
    """Both weight gradients of :func:`routes_to_swapped_weight_grad` timed (best of 5, interleaved, after a warm-up,
    :func:`_weight_grad_runs`); the swapped one must win by ``SWAPPED_WEIGHT_GRAD_MARGIN``."""
    best_onednn, best_swapped = _best_times(_weight_grad_runs(x_shape, w_shape, padding, channels_last), repeats=5)
    return best_swapped < SWAPPED_WEIGHT_GRAD_MARGIN * best_onednn


class _SwappedWeightGradConv3d(torch.autograd.Function):
    """Zero-padded, ungrouped, undilated, stride-1 conv3d whose weight gradient is :func:`_swapped_weight_grad`; the
    forward pass and the input and bias gradients are PyTorch's own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv3d(x, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the input gradient alone (asking oneDNN for the bias too runs its weight pass)
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1, 1], list(ctx.padding), [1, 1, 1],
                                                         False, [0, 0, 0], 1, [True, False, False])[0]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        if ctx.needs_input_grad[1]:
            grad_w = _swapped_weight_grad(x, grad, ctx.padding)
        return grad_x, grad_w, grad_b, None


def output_grid(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int, int]:
    """Spatial size of the convolution's output."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))


def routes_to_im2col(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether :class:`FastConv3d` runs this CPU convolution as one matrix product (a tiny output grid)."""
    if not (x.device.type == "cpu" and x.dim() == 5 and x.is_floating_point() and groups == 1
            and all(d == 1 for d in dilation) and all(0 <= p < k for p, k in zip(padding, weight.shape[2:]))):
        return False
    grid = output_grid(x, weight, stride, padding, dilation)
    voxels = grid[0] * grid[1] * grid[2]
    # and the kernel outweighs the data: fewer output positions than weights per output channel (a batch
    # of many small inputs with few channels, e.g. BiFlowNet's token embedding, is faster on PyTorch's path)
    return 0 < voxels <= MAX_IM2COL_VOXELS and x.shape[0] * voxels <= weight[0].numel()


@functools.cache
def native_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so that bf16 matrix products beat fp32 ones."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


# bf16 must beat fp32 by this factor before the 2^3 path multiplies in bf16 (near a tie, the more exact fp32 is kept)
BF16_PRODUCTS_MARGIN = 0.95


def bf16_products_pay(rows: int, k: int, n: int) -> bool:
    """Whether, under CPU bf16 autocast, the 2^3 path's three products with an fp32 ``(n, k)`` kernel and ``rows``
    im2col rows run faster in bf16 (the kernel cast to bf16 and its gradient back to fp32 included) than in fp32.

    Few-row products mostly move the kernel, so which wins depends on the CPU's memory bandwidth against its fp32
    and bf16 throughput, and machines disagree (module docstring): :func:`_bf16_products_faster` times both, once
    per shape and process. CPUs without native bf16 products never take bf16.
    """
    return native_bf16_products() and _bf16_products_faster(rows, k, n)


@functools.cache
def _bf16_products_faster(rows: int, k: int, n: int) -> bool:
    """Both ways of :func:`bf16_products_pay` timed (best of 3, interleaved, after a warm-up) on seeded data that
    leaves the global random stream alone; bf16 must win by ``BF16_PRODUCTS_MARGIN``."""
    g = torch.Generator().manual_seed(0)
    a, w, grad = (torch.randn(*shape, generator=g) for shape in ((rows, k), (n, k), (rows, n)))

    def fp32() -> None:
        _product(a, w), _product(grad, w.t()), _product(grad.t().contiguous(), a.t().contiguous())

    def bf16() -> None:
        wb, ab, gb = w.to(torch.bfloat16), a.to(torch.bfloat16), grad.to(torch.bfloat16)
        _product(ab, wb), _product(gb, wb.t()), _product(gb.t().contiguous(), ab.t().contiguous()).float()

    best_fp32, best_bf16 = _best_times((fp32, bf16), repeats=3)
    return best_bf16 < BF16_PRODUCTS_MARGIN * best_fp32


def _best_times(runs, repeats: int) -> list[float]:
    """Fastest wall time of each of ``runs`` (callables) over ``repeats`` interleaved rounds after one warm-up call
    each; outside any active dispatch mode (a FLOP counter, a profiler's, which would count these runs as the
    model's arithmetic), without gradients or CPU autocast."""
    best = [float("inf")] * len(runs)
    with _disable_current_modes(), torch.no_grad(), torch.autocast("cpu", enabled=False):
        for run in runs:  # warm-up
            run()
        for _ in range(repeats):
            for i, run in enumerate(runs):
                t0 = time.perf_counter()
                run()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


# oneDNN's inner product (what PyTorch runs for bf16 products) on x86; PyTorch sends fp32 products to MKL's GEMM,
# which is 2-4x slower on the 2^3 path's few-row products (module docstring)
_ONEDNN_PRODUCTS = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# smallest product (multiply-adds M*N*K) that oneDNN's inner product runs faster than MKL's GEMM: below it oneDNN's
# fixed cost per call dominates (2 threads, 2-core AMD EPYC: 2048 x 16 by 16 11 us on MKL, 18 us on oneDNN; 2048 x 64
# by 16 28 / 26 us; 8 x 576 by 576 58 / 44 us; 4096 x 72 by 216 642 / 308 us). A linear layer's weight gradient
# summed over more tokens than the layer has inputs or outputs stays on MKL too: 216 x 72 summed over 4096 tokens
# took 694 us on MKL and 918 us on oneDNN (1024 x 256 over 512 tokens: 1450 / 780 us).
MIN_ONEDNN_PRODUCT = 2**21


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = True) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for 2-D ``a`` (M, K) and ``b`` (N, K); fp32 CPU products on oneDNN where available and
    large enough to pay (``MIN_ONEDNN_PRODUCT``), unless ``onednn`` is False."""
    if (onednn and _ONEDNN_PRODUCTS and a.dtype == torch.float32 and a.device.type == "cpu"
            and a.shape[0] * a.shape[1] * b.shape[0] >= MIN_ONEDNN_PRODUCT):
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return a @ b.t() if bias is None else torch.addmm(bias, a, b.t())


def _im2col(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> ``(N*D'*H'*W', C*kd*kh*kw)``: each output voxel's receptive field, in the kernel's order."""
    p = padding
    xp = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]))
    cols = xp.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).unfold(4, kernel[2], stride[2])
    return cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, x.shape[1] * kernel[0] * kernel[1] * kernel[2])


def _fold_index(grid, kernel, stride, padded, device: torch.device) -> torch.Tensor:
    """Flat index on the padded input grid of every (output voxel, kernel tap), output-major, taps in kernel order."""
    axes = [(torch.arange(g) * s)[:, None] + torch.arange(k)[None] for g, k, s in zip(grid, kernel, stride)]  # (g, k)
    d, h, w = axes
    index = (d[:, None, None, :, None, None] * padded[1] + h[None, :, None, None, :, None]) * padded[2] \
        + w[None, None, :, None, None, :]
    return index.reshape(-1).to(device)


class _Im2colConv3d(torch.autograd.Function):
    """Zero-padded, ungrouped, undilated conv3d as ``im2col @ kernel^T``; every weight is read or written once
    per pass, and the input gradient is the product folded back onto the input grid (one scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding):
        k = tuple(weight.shape[2:])
        grid = output_grid(x, weight, stride, padding, (1, 1, 1))
        cols = _im2col(x, k, stride, padding)
        w = weight.reshape(weight.shape[0], -1)
        out = _product(cols, w, bias)
        ctx.save_for_backward(cols, weight)
        ctx.geometry = (tuple(x.shape), tuple(stride), tuple(padding), grid, bias is not None)
        return out.view(x.shape[0], *grid, weight.shape[0]).permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cols, weight = ctx.saved_tensors
        shape, s, p, grid, has_bias = ctx.geometry
        k = weight.shape[2:]
        g = grad.permute(0, 2, 3, 4, 1).reshape(-1, weight.shape[0])  # (N*D'*H'*W', C_out)
        grad_x = grad_w = grad_b = None
        acc = torch.promote_types(g.dtype, torch.float32)  # sums of many terms in at least fp32
        if ctx.needs_input_grad[1]:
            grad_w = _product(g.t().contiguous(), cols.t().contiguous()).view(weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0, dtype=acc).to(g.dtype)
        if ctx.needs_input_grad[0]:
            cols_grad = _product(g, weight.reshape(weight.shape[0], -1).t())  # (N*D'*H'*W', C_in*kd*kh*kw)
            dims = tuple(n + 2 * pi for n, pi in zip(shape[2:], p))
            padded = g.new_zeros(shape[0], shape[1], dims[0] * dims[1] * dims[2], dtype=acc)
            src = cols_grad.view(shape[0], -1, shape[1], k[0] * k[1] * k[2]).permute(0, 2, 1, 3)
            # fold: every (output voxel, tap) adds onto its padded input voxel, in one scatter-add
            index = _fold_index(grid, tuple(k), tuple(s), dims, g.device)
            padded.index_add_(2, index, src.reshape(shape[0], shape[1], -1).to(acc))
            padded = padded.view(shape[0], shape[1], *dims)
            grad_x = padded[:, :, p[0]:p[0] + shape[2], p[1]:p[1] + shape[3], p[2]:p[2] + shape[4]].to(g.dtype)
        return grad_x, grad_w, grad_b, None, None


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose small CPU float32 convolutions run on oneDNN in both directions (same parameters)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and routes_to_im2col(x, weight, self.stride, self.padding, self.dilation, self.groups)):
            if torch.is_autocast_enabled("cpu"):  # bf16 products where native (module docstring), else fp32
                rows = x.shape[0] * math.prod(output_grid(x, weight, self.stride, self.padding, self.dilation))
                bf16 = (torch.get_autocast_dtype("cpu") == torch.bfloat16
                        and bf16_products_pay(rows, weight[0].numel(), weight.shape[0]))
                dtype = torch.bfloat16 if bf16 else torch.float32
                with torch.autocast("cpu", enabled=False):
                    return _Im2colConv3d.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                               tuple(self.stride), tuple(self.padding))
            return _Im2colConv3d.apply(x, weight, bias, tuple(self.stride), tuple(self.padding))
        if routes_to_channels_last(x, self.groups, weight):
            if torch.is_autocast_enabled("cpu"):  # cast first, so that the layout copy moves bf16
                x = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            if self._swaps_weight_grad(x, weight):
                return _SwappedWeightGradConv3d.apply(x, weight, bias, tuple(self.padding))
            return super()._conv_forward(x, weight, bias)
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and not torch.is_autocast_enabled("cpu"):
            if routes_to_padded(x, weight, self.padding, self.dilation, self.groups):
                p = self.padding
                return F.conv3d(F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0])), weight, bias, self.stride, 0,
                                self.dilation, self.groups)
            if routes_to_onednn(x, weight, self.stride, self.padding, self.dilation, self.groups):
                return _OneDnnConv3d.apply(x, weight, bias, tuple(self.padding))
        if self._swaps_weight_grad(x, weight):
            return _SwappedWeightGradConv3d.apply(x, weight, bias, tuple(self.padding))
        return super()._conv_forward(x, weight, bias)

    def _swaps_weight_grad(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and routes_to_swapped_weight_grad(x, weight, self.stride, self.padding, self.dilation, self.groups))


def routes_linear_to_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :class:`FastLinear` runs this product on oneDNN (fp32 on an x86 CPU, outside autocast)."""
    return (_ONEDNN_PRODUCTS and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and x.numel() * weight.shape[0] >= MIN_ONEDNN_PRODUCT)


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` whose three products (forward, input gradient, weight gradient) run on oneDNN's inner product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        return _product(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(g, weight.t()).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _product(g.t(), x2.t(), onednn=x2.shape[0] <= max(weight.shape))  # see MIN_ONEDNN_PRODUCT
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class FastLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU products run on oneDNN's inner product in both directions (same parameters):
    PyTorch sends them to MKL's GEMM, measured 2x slower for BiFlowNet's token widths on a 2-core AMD EPYC with
    AVX-512 (512 x 256 by 1024: 1.33 ms, oneDNN 0.61 ms; 4096 x 72 by 216: 0.64 / 0.31 ms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if routes_linear_to_onednn(x, self.weight):
            return _OneDnnLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalises channels-last CPU inputs (what :class:`FastConv3d` leaves under CPU bf16
    autocast) in the contiguous layout and hands the result back channels-last (same parameters): PyTorch's
    channels-last CPU backward is far slower (72 channels at 16^3 in 24 groups, bf16, 2 threads: forward + backward
    1.65 ms channels-last, 0.20 ms contiguous, 0.085 ms per layout copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 5 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last_3d)):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)
        return super().forward(x)


def _swap_class(module: nn.Module, plain: type, fast: type) -> nn.Module:
    """Give every module of exactly type ``plain`` inside ``module`` the subclass ``fast`` (parameters, names and
    state-dict keys stay as they are); returns ``module``."""
    for m in module.modules():
        if type(m) is plain:
            m.__class__ = fast
    return module


def use_fast_linear(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` (timm's included) into a :class:`FastLinear` (same state)."""
    return _swap_class(module, nn.Linear, FastLinear)


def use_fast_conv3d(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` inside ``module`` (MONAI blocks included) into a :class:`FastConv3d`, and every
    plain ``nn.GroupNorm`` into a :class:`FastGroupNorm` (same state)."""
    return _swap_class(_swap_class(module, nn.Conv3d, FastConv3d), nn.GroupNorm, FastGroupNorm)


__all__ = ["BF16_PRODUCTS_MARGIN", "MAX_FP32_CHANNELS_LAST_CHANNELS", "MAX_IM2COL_VOXELS",
           "MIN_CHANNELS_LAST_VOXELS", "MIN_ONEDNN_PRODUCT", "MIN_ONEDNN_VOXELS", "SWAPPED_WEIGHT_GRAD_MARGIN",
           "FastConv3d", "FastGroupNorm", "FastLinear", "bf16_products_pay", "cpu_capability", "native_bf16_products",
           "output_grid", "routes_linear_to_onednn", "routes_to_channels_last", "routes_to_im2col", "routes_to_onednn",
           "routes_to_padded", "routes_to_swapped_weight_grad", "takes_slow_path", "use_fast_conv3d", "use_fast_linear"]
