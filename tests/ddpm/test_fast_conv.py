"""FastConv3d: small CPU convolutions on oneDNN with exact gradients; BiFlowNet uses it; emulated bf16 -> fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ddpm import BiFlowNet
from ddpm import biflownet as biflownet_module
from ddpm import fast_conv
from ddpm.fast_conv import (MAX_FP32_CHANNELS_LAST_CHANNELS, MAX_IM2COL_VOXELS, MIN_CHANNELS_LAST_VOXELS,
                            MIN_ONEDNN_VOXELS, FastConv3d, FastGroupNorm, FastLinear,
                            output_grid, routes_to_channels_last, routes_to_im2col, routes_to_onednn,
                            routes_to_padded, routes_to_swapped_weight_grad, takes_slow_path, use_fast_conv3d,
                            use_fast_linear)
from tests.ddpm.conftest import randomize, tiny_network


def _assert_matches_float64(layer: nn.Module, ref: nn.Module, x: torch.Tensor, x64: torch.Tensor, y: torch.Tensor,
                            grad: torch.Tensor, weight_tol: float = 1e-5) -> None:
    """``layer``'s output ``y`` (already back-propagated with ``grad``) and its gradients equal the float64 ``ref``'s."""
    y64 = ref(x64)
    y64.backward(grad.double())
    assert y.shape == y64.shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), ref.weight.grad, rtol=weight_tol, atol=weight_tol)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad.double(), ref.bias.grad, rtol=1e-5, atol=1e-5)


def _conv_and_float64_twin(g: torch.Generator, cin: int, cout: int, kernel, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A :class:`FastConv3d` with weights drawn from ``g`` (x 0.2) and an ``nn.Conv3d`` in float64 holding the same."""
    conv = FastConv3d(cin, cout, kernel, **kwargs)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref = nn.Conv3d(cin, cout, kernel, **kwargs).double()
    ref.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    return conv, ref


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("cin,cout,kernel,padding,bias", [
    (8, 12, 3, 1, True), (16, 4, 1, 0, True), (5, 7, 3, 0, False), (6, 5, 2, 1, True), (4, 4, 3, 2, True),
])
def test_values_and_gradients_match_conv3d(cin: int, cout: int, kernel: int, padding: int, bias: bool,
                                           channels_last: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_conv, "MIN_ONEDNN_PRODUCT", 1)  # the weight gradient's product on oneDNN too
    g = torch.Generator().manual_seed(0)
    conv, ref = _conv_and_float64_twin(g, cin, cout, kernel, padding=padding, bias=bias)
    x = torch.randn(1, cin, 8, 9, 10, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    assert routes_to_onednn(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    x64 = x.detach().double().requires_grad_()
    x = x.requires_grad_()
    y = conv(x)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    _assert_matches_float64(conv, ref, x, x64, y, grad, weight_tol=1e-4)  # weight gradient: sums over 720 voxels


def test_small_cpu_convolutions_run_on_onednn_both_ways() -> None:
    conv = FastConv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        conv(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and not any("slow_conv3d" in op for op in ops)
    assert "aten::convolution_backward" not in ops  # the backward is ours, also on oneDNN


def test_which_convolutions_take_the_slow_path() -> None:
    w3, w1 = torch.zeros(72, 72, 3, 3, 3), torch.zeros(72, 72, 1, 1, 1)
    one = (1, 1, 1)
    assert takes_slow_path(torch.zeros(1, 72, 16, 16, 16), w3, one, 1)  # 72*16*16 = 18432 <= 20480
    assert takes_slow_path(torch.zeros(1, 72, 4, 4, 4), w1, one, 1)
    assert not takes_slow_path(torch.zeros(1, 72, 32, 32, 32), w3, one, 1)  # oneDNN already
    assert not takes_slow_path(torch.zeros(2, 72, 16, 16, 16), w3, one, 1)  # batch > 1: oneDNN already
    assert not takes_slow_path(torch.zeros(1, 72, 16, 16, 16), w3, (2, 2, 2), 1)  # dilated: PyTorch's path
    assert not takes_slow_path(torch.zeros(1, 72, 16, 16, 16), w3, one, 2)  # grouped
    assert not takes_slow_path(torch.zeros(1, 72, 16, 16, 16, dtype=torch.float64), w3.double(), one, 1)
    assert not takes_slow_path(torch.zeros(1, 72, 8, 8, 8), torch.zeros(72, 72, 5, 5, 5), one, 1)


def test_only_the_convolutions_where_onednn_pays_take_our_path() -> None:
    w3, one = torch.zeros(72, 72, 3, 3, 3), (1, 1, 1)
    assert routes_to_onednn(torch.zeros(1, 72, 16, 16, 16), w3, one, one, one, 1)
    assert routes_to_onednn(torch.zeros(1, 72, 8, 8, 8), w3, one, one, one, 1)  # 512 voxels: the measured line
    assert MIN_ONEDNN_VOXELS == 512
    assert not routes_to_onednn(torch.zeros(1, 72, 8, 8, 7), w3, one, one, one, 1)  # smaller grids: reference kernel
    assert not routes_to_onednn(torch.zeros(1, 576, 2, 2, 2), torch.zeros(576, 576, 3, 3, 3), one, one, one, 1)
    assert not routes_to_onednn(torch.zeros(1, 72, 16, 16, 16), w3, (2, 2, 2), one, one, 1)  # strided
    assert not routes_to_onednn(torch.zeros(1, 72, 16, 16, 16), w3, one, (3, 3, 3), one, 1)  # padding >= kernel
    assert not routes_to_onednn(torch.zeros(1, 72, 32, 32, 32), w3, one, one, one, 1)  # oneDNN's anyway


def test_which_convolutions_pad_their_input_to_reach_onednn() -> None:
    w3, one = torch.zeros(72, 72, 3, 3, 3), (1, 1, 1)
    assert routes_to_padded(torch.zeros(1, 72, 16, 16, 16), w3, one, one, 1)  # 72*18*18 = 23328 > 20480
    assert not routes_to_padded(torch.zeros(1, 8, 16, 16, 16), w3[:, :8], one, one, 1)  # 8*18*18: still slow
    assert not routes_to_padded(torch.zeros(1, 144, 8, 8, 8), torch.zeros(144, 144, 3, 3, 3), one, one, 1)  # 14400
    assert not routes_to_padded(torch.zeros(1, 72, 16, 16, 16), w3, (0, 0, 0), one, 1)  # nothing to pad
    assert not routes_to_padded(torch.zeros(2, 72, 16, 16, 16), w3, one, one, 1)  # batch > 1: oneDNN already
    assert not routes_to_padded(torch.zeros(1, 72, 32, 32, 32), w3, one, one, 1)  # oneDNN already


@pytest.mark.parametrize("stride", [1, 2])
def test_padded_input_runs_on_onednn_with_exact_values_and_gradients(stride: int) -> None:
    g = torch.Generator().manual_seed(0)
    conv, ref = _conv_and_float64_twin(g, 20, 6, 3, stride=stride, padding=1)
    x = torch.randn(1, 20, 32, 32, 4, generator=g)  # 20*32*32 = 20480: the slow path; 20*34*34 is not
    assert routes_to_padded(x, conv.weight, conv.padding, conv.dilation, conv.groups)
    x64, x = x.double().requires_grad_(), x.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = conv(x)
        grad = torch.randn(y.shape, generator=g)
        y.backward(grad)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and not any("slow_conv3d" in op for op in ops)
    _assert_matches_float64(conv, ref, x, x64, y, grad, weight_tol=1e-4)


@pytest.mark.parametrize("shape,stride", [((1, 6, 4, 4, 4), 1), ((1, 6, 8, 8, 8), 2)])
def test_convolutions_left_to_pytorch_run_its_reference_kernel(shape: tuple, stride: int) -> None:
    conv = FastConv3d(6, 6, 3, stride=stride, padding=1)
    x = torch.randn(*shape, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        conv(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" not in ops and any("slow_conv3d" in op for op in ops)


def test_biflownet_convolutions_are_fast_and_keep_their_names(inputs: dict) -> None:
    net = BiFlowNet(**tiny_network(cross_attention="footprint", back_projection=True))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is FastConv3d for m in convs)  # MONAI's residual blocks included
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is FastGroupNorm for m in norms)
    plain = use_fast_conv3d(nn.Sequential(nn.Conv3d(2, 2, 3)))
    assert type(plain[0]) is FastConv3d and list(plain.state_dict()) == ["0.weight", "0.bias"]


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_autocast_computes_in_fp32_only_where_bf16_is_emulated(native: bool, inputs: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(biflownet_module, "_native_cpu_bf16", lambda: native)
    net = randomize(BiFlowNet(**tiny_network(cross_attention="footprint", back_projection=True))).eval()
    with torch.no_grad():
        fp32 = net(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(**inputs)
    if native:  # bf16 arithmetic really happens
        assert (mixed.float() - fp32).abs().max() > 1e-4
    else:
        assert mixed.dtype == torch.float32 and torch.equal(mixed, fp32)


@pytest.mark.parametrize("cin,shape,route", [
    (4, (1, 4, 8, 8, 8), routes_to_onednn), (6, (2, 6, 2, 2, 2), routes_to_im2col),
    (20, (1, 20, 32, 32, 4), lambda x, w, stride, padding, dilation, groups:
        routes_to_padded(x, w, padding, dilation, groups)),
], ids=["onednn", "tiny-grid", "padded"])
def test_flop_counter_counts_our_paths_like_the_ordinary_one(cin: int, shape: tuple, route) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    fast, plain = FastConv3d(cin, 8, 3, padding=1), nn.Conv3d(cin, 8, 3, padding=1)
    x = torch.randn(*shape, requires_grad=True)
    assert route(x, fast.weight, fast.stride, fast.padding, fast.dilation, fast.groups)
    counts = []
    for conv in (fast, plain):
        with FlopCounterMode(display=False) as counter:
            conv(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("batch,grid,stride", [(1, (2, 2, 2), 1), (3, (2, 2, 2), 1), (2, (4, 3, 4), 2), (1, (1, 3, 2), 1)])
def test_tiny_grids_run_as_one_matrix_product_with_exact_gradients(batch: int, grid: tuple, stride: int) -> None:
    g = torch.Generator().manual_seed(1)
    conv = FastConv3d(5, 6, 3, stride=stride, padding=1).double()
    x = torch.randn(batch, 5, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    assert routes_to_im2col(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, stride, 1))
    assert torch.autograd.gradcheck(lambda x, w, b: conv._conv_forward(x, w, b), (x, conv.weight, conv.bias))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        conv(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert not any("conv" in op and "Im2col" not in op for op in ops)  # no convolution kernel at all


@pytest.mark.parametrize("batch,bias", [(1, True), (3, False)])
def test_tiny_grids_in_fp32_multiply_on_onednn_with_float64_accuracy(batch: int, bias: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 products of the 2^3 path run on oneDNN's inner product (where PyTorch has it), all three of them, and
    values and gradients match a float64 reference to fp32 rounding."""
    if not fast_conv._ONEDNN_PRODUCTS:
        pytest.skip("this PyTorch build has no oneDNN inner product on this CPU")
    monkeypatch.setattr(fast_conv, "MIN_ONEDNN_PRODUCT", 1)  # tiny test sizes
    g = torch.Generator().manual_seed(2)
    conv = FastConv3d(24, 12, 3, padding=1, bias=bias)
    ref = nn.Conv3d(24, 12, 3, padding=1, bias=bias).double()
    ref.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    x = torch.randn(batch, 24, 2, 2, 2, generator=g, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    grad = torch.randn(batch, 12, 2, 2, 2, generator=g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = conv(x)
        y.backward(grad)
    products = [e for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise"]
    assert products and products[0].count == 3  # forward, weight gradient, input gradient
    _assert_matches_float64(conv, ref, x, x64, y, grad)


def test_which_grids_are_tiny() -> None:
    w3, one = torch.zeros(576, 576, 3, 3, 3), (1, 1, 1)
    assert MAX_IM2COL_VOXELS == 8
    assert routes_to_im2col(torch.zeros(1, 576, 2, 2, 2), w3, one, one, one, 1)
    assert routes_to_im2col(torch.zeros(8, 576, 2, 2, 2), w3, one, one, one, 1)  # 64 positions, 15552 weights each
    w2 = torch.zeros(32, 8, 2, 2, 2)  # token embedding of 4^3 sub-volumes: 2^3 outputs, 64 weights per channel
    assert routes_to_im2col(torch.zeros(8, 8, 4, 4, 4), w2, (2, 2, 2), (0, 0, 0), one, 1)
    assert not routes_to_im2col(torch.zeros(256, 8, 4, 4, 4), w2, (2, 2, 2), (0, 0, 0), one, 1)  # 2048 positions
    assert routes_to_im2col(torch.zeros(1, 576, 4, 4, 4), w3, (2, 2, 2), one, one, 1)  # output 2^3
    assert not routes_to_im2col(torch.zeros(1, 576, 4, 4, 4), w3, one, one, one, 1)  # output 4^3
    assert not routes_to_im2col(torch.zeros(1, 576, 2, 2, 2), w3, one, one, (2, 2, 2), 1)  # dilated
    assert not routes_to_im2col(torch.zeros(1, 576, 2, 2, 2), torch.zeros(576, 288, 3, 3, 3), one, one, one, 2)
    assert not routes_to_im2col(torch.zeros(1, 576, 2, 2, 2), w3, one, (3, 3, 3), one, 1)  # padding >= kernel
    assert output_grid(torch.zeros(1, 1, 5, 6, 7), w3, (2, 1, 1), (1, 0, 1), one) == (3, 4, 7)


@pytest.mark.parametrize("native,faster", [(False, True), (True, False), (True, True)])
def test_tiny_grids_under_cpu_bf16_autocast_multiply_in_bf16_only_where_native_and_faster(
        native: bool, faster: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bf16 autocast the 2^3 path multiplies in bf16 where the CPU does so natively and bf16 was timed
    faster (values and gradients within bf16 rounding of fp32, the input-gradient fold summed in fp32), and exactly
    in fp32 elsewhere."""
    monkeypatch.setattr(fast_conv, "native_bf16_products", lambda: native)
    asked = []
    monkeypatch.setattr(fast_conv, "_bf16_products_faster", lambda *shape: asked.append(shape) or faster)
    native = native and faster  # below: whether bf16 products run
    torch.manual_seed(0)
    conv = FastConv3d(64, 16, 3, padding=1)
    x = torch.randn(1, 64, 2, 2, 2).bfloat16().requires_grad_()
    grad = torch.randn(1, 16, 2, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.backward(grad.to(y.dtype))
    x32 = x.detach().float().requires_grad_()
    ref = F.conv3d(x32, conv.weight, conv.bias, 1, 1)
    grads = [x.grad.float(), conv.weight.grad, conv.bias.grad]
    conv.zero_grad()
    ref.backward(grad)
    assert conv.weight.grad.dtype == torch.float32  # the parameters' gradients stay fp32 either way
    if native:
        assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.02)
        assert (y.float() - ref).abs().max() > 0  # bf16 arithmetic really happened
        for a, b in zip(grads, [x32.grad, conv.weight.grad, conv.bias.grad]):
            torch.testing.assert_close(a, b, rtol=0.02, atol=0.05)
    else:
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(grads[0].bfloat16(), x32.grad.bfloat16())  # fp32, rounded once into x's dtype
        for a, b in zip(grads[1:], [conv.weight.grad, conv.bias.grad]):
            torch.testing.assert_close(a, b)
    assert asked == ([(8, 64 * 27, 16)] if fast_conv.native_bf16_products() else [])  # rows, kernel width, outputs
    big = torch.randn(1, 64, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(big).dtype == torch.bfloat16  # larger grids keep autocast's bf16


@pytest.mark.parametrize("shape,bias", [((7, 24), True), ((2, 5, 24), False), ((24,), True)])
def test_fast_linear_runs_fp32_products_on_onednn_with_float64_accuracy(shape: tuple, bias: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """FastLinear's three fp32 products run on oneDNN's inner product; values and gradients match float64."""
    if not fast_conv._ONEDNN_PRODUCTS:
        pytest.skip("this PyTorch build has no oneDNN inner product on this CPU")
    monkeypatch.setattr(fast_conv, "MIN_ONEDNN_PRODUCT", 1)  # tiny test sizes
    g = torch.Generator().manual_seed(3)
    lin = use_fast_linear(nn.Sequential(nn.Linear(24, 10, bias=bias)))[0]
    assert type(lin) is FastLinear
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ref = nn.Linear(24, 10, bias=bias).double()
    ref.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    x = torch.randn(*shape, generator=g, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    grad = torch.randn(*shape[:-1], 10, generator=g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = lin(x)
        y.backward(grad)
    products = [e for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise"]
    assert products and products[0].count == 3 and not any(e.key in ("aten::mm", "aten::addmm")
                                                           for e in prof.key_averages())
    _assert_matches_float64(lin, ref, x, x64, y, grad)


def test_only_products_large_enough_to_pay_go_to_onednn() -> None:
    from ddpm.fast_conv import MIN_ONEDNN_PRODUCT, routes_linear_to_onednn

    assert MIN_ONEDNN_PRODUCT == 2**21  # measured: below it oneDNN's fixed cost per call loses to MKL
    w = torch.zeros(216, 72)
    assert routes_linear_to_onednn(torch.zeros(4096, 72), w) is fast_conv._ONEDNN_PRODUCTS  # BiFlowNet's token MLPs
    assert not routes_linear_to_onednn(torch.zeros(16, 72), w)  # 248832 multiply-adds: PyTorch's GEMM
    assert not routes_linear_to_onednn(torch.zeros(4096, 72, dtype=torch.float64), w.double())
    lin = use_fast_linear(nn.Sequential(nn.Linear(24, 10)))[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lin(torch.randn(7, 24, requires_grad=True)).sum().backward()
    assert not any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())


def test_fast_linear_sums_weight_gradients_over_many_tokens_on_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight gradient summed over more tokens than the layer has inputs or outputs stays on PyTorch's GEMM
    (measured slower on oneDNN); the forward and input-gradient products still run on oneDNN, and all agree."""
    if not fast_conv._ONEDNN_PRODUCTS:
        pytest.skip("this PyTorch build has no oneDNN inner product on this CPU")
    monkeypatch.setattr(fast_conv, "MIN_ONEDNN_PRODUCT", 1)
    lin = use_fast_linear(nn.Sequential(nn.Linear(24, 10)))[0]
    x = torch.randn(40, 24, requires_grad=True)  # 40 tokens > 24 inputs
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lin(x).square().sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("mkldnn::_linear_pointwise") == 2 and counts.get("aten::mm") == 1
    x64, w64, b64 = x.detach().double().requires_grad_(), lin.weight.detach().double().requires_grad_(), \
        lin.bias.detach().double().requires_grad_()
    F.linear(x64, w64, b64).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)


def test_fast_linear_leaves_autocast_and_other_dtypes_to_pytorch() -> None:
    lin = use_fast_linear(nn.Sequential(nn.Linear(8, 4)))[0]
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast's bf16 product, as for nn.Linear
    lin64 = lin.double()
    torch.testing.assert_close(lin64(x.double()), F.linear(x.double(), lin64.weight, lin64.bias))


def test_biflownet_linear_layers_are_fast_and_keep_their_names() -> None:
    net = BiFlowNet(**tiny_network(cross_attention="footprint", back_projection=True))
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)  # timm's attention and MLP layers included
    plain = use_fast_linear(nn.Sequential(nn.Linear(2, 2)))
    assert type(plain[0]) is FastLinear and list(plain.state_dict()) == ["0.weight", "0.bias"]


def test_bf16_products_are_timed_once_per_shape_and_win_only_when_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2^3 path's bf16-or-fp32 choice is a measurement: bf16 only where it was timed faster by the margin, once
    per shape, without touching the global random stream; never without native bf16 products."""
    import time

    from torch.utils.flop_counter import FlopCounterMode

    def slow(dtype: torch.dtype):
        def product(a: torch.Tensor, b: torch.Tensor, bias=None, onednn: bool = True) -> torch.Tensor:
            if a.dtype == dtype:
                time.sleep(0.004)
            return a @ b.t()
        return product

    fast_conv._bf16_products_faster.cache_clear()
    try:
        monkeypatch.setattr(fast_conv, "_product", slow(torch.float32))
        state = torch.get_rng_state()
        with FlopCounterMode(display=False) as counter:  # the timing is not the model's arithmetic
            assert fast_conv._bf16_products_faster(8, 64, 16) is True
        assert counter.get_total_flops() == 0
        assert torch.equal(torch.get_rng_state(), state)
        monkeypatch.setattr(fast_conv, "_product", slow(torch.bfloat16))
        assert fast_conv._bf16_products_faster(8, 64, 16) is True  # cached: not timed again
        assert fast_conv._bf16_products_faster(8, 64, 24) is False
        assert fast_conv._bf16_products_faster.cache_info().currsize == 2
        monkeypatch.setattr(fast_conv, "native_bf16_products", lambda: False)
        assert fast_conv.bf16_products_pay(8, 64, 16) is False
        monkeypatch.setattr(fast_conv, "native_bf16_products", lambda: True)
        assert fast_conv.bf16_products_pay(8, 64, 16) is True and fast_conv.bf16_products_pay(8, 64, 24) is False
    finally:
        fast_conv._bf16_products_faster.cache_clear()


def test_which_convolutions_run_channels_last() -> None:
    assert MIN_CHANNELS_LAST_VOXELS == 512
    x = torch.zeros(1, 8, 8, 8, 8)
    assert not routes_to_channels_last(x, 1)  # fp32: not under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert routes_to_channels_last(x, 1) and routes_to_channels_last(x.bfloat16(), 1)
        assert not routes_to_channels_last(torch.zeros(1, 8, 8, 8, 4), 1)  # 256 voxels
        assert not routes_to_channels_last(x, 2)  # grouped
        assert not routes_to_channels_last(torch.zeros(1, 8, 8, 64), 1)  # not 3-D
    with torch.autocast("cpu", dtype=torch.float16):
        assert not routes_to_channels_last(x, 1)


def test_which_fp32_convolutions_run_channels_last() -> None:
    """Outside autocast: fp32 batches of two or more, at most MAX_FP32_CHANNELS_LAST_CHANNELS channels in and out."""
    assert MAX_FP32_CHANNELS_LAST_CHANNELS == 32
    x, w = torch.zeros(2, 8, 8, 8, 8), torch.zeros(32, 8, 3, 3, 3)
    assert routes_to_channels_last(x, 1, w)
    assert not routes_to_channels_last(x, 1)  # no kernel given: no channel count to judge
    assert not routes_to_channels_last(x, 1, torch.zeros(33, 8, 3, 3, 3))  # too many output channels
    assert not routes_to_channels_last(torch.zeros(2, 33, 8, 8, 8), 1, torch.zeros(8, 33, 3, 3, 3))  # input channels
    assert not routes_to_channels_last(x[:1], 1, w)  # batch 1: PyTorch's reference kernel or our oneDNN path
    assert not routes_to_channels_last(x.double(), 1, w.double())
    assert not routes_to_channels_last(torch.zeros(2, 8, 8, 8, 4), 1, w)  # 256 voxels
    assert not routes_to_channels_last(x, 2, torch.zeros(32, 4, 3, 3, 3))  # grouped


@pytest.mark.parametrize("stride,padding,cout", [(1, 1, 8), (2, 1, 8), (1, 0, 32), (1, 1, 40)])
def test_narrow_fp32_convolutions_run_channels_last_with_exact_values(stride: int, padding: int, cout: int) -> None:
    """Narrow fp32 convolutions take and leave channels-last tensors (oneDNN's faster kernels for that layout); values
    and gradients are PyTorch's own to fp32 rounding. A wider one keeps PyTorch's layout."""
    torch.manual_seed(0)
    conv = FastConv3d(16, cout, 3, stride=stride, padding=padding)
    ref = nn.Conv3d(16, cout, 3, stride=stride, padding=padding)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 8, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = conv(x), ref(x_ref)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) == (cout <= 32)
    assert not y_ref.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(y.shape)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)


def test_biflownet_fp32_step_is_the_same_with_narrow_channels_last_convolutions(
        inputs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole fp32 training step of a narrow BiFlowNet runs with channels-last activations (norms, activations,
    patching and attention take them) and matches the step without to fp32 rounding."""
    net = randomize(BiFlowNet(**tiny_network(cross_attention="footprint", back_projection=True)))
    layouts: list[bool] = []
    for m in net.modules():
        if isinstance(m, FastConv3d):
            m.register_forward_hook(lambda mod, args, out: layouts.append(
                not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last_3d)))
    results = []
    for widest in (MAX_FP32_CHANNELS_LAST_CHANNELS, 0):
        monkeypatch.setattr(fast_conv, "MAX_FP32_CHANNELS_LAST_CHANNELS", widest)
        net.zero_grad()
        layouts.clear()
        out = net(**inputs)
        out.square().mean().backward()
        results.append((out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()],
                        sum(layouts)))
    (out, grads, channels_last), (out_ref, grads_ref, channels_last_ref) = results
    # the 8^3 convolutions left channels-last outputs (some do without the route: their inputs come permuted)
    assert channels_last >= channels_last_ref + 10
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_cpu_bf16_convolutions_run_channels_last_with_the_same_values(stride: int, padding: int) -> None:
    """Under CPU bf16 autocast, convolutions on grids of 512+ voxels take and leave channels-last tensors (oneDNN's
    faster kernels for that layout, no re-layout between convolutions); values and gradients are PyTorch's own to
    bf16 rounding, from fp32 and bf16 inputs alike."""
    torch.manual_seed(0)
    conv = FastConv3d(16, 8, 3, stride=stride, padding=padding)
    ref = nn.Conv3d(16, 8, 3, stride=stride, padding=padding)
    ref.load_state_dict(conv.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 16, 8, 8, 8).to(dtype).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = conv(x), ref(x_ref)
        assert y.dtype == torch.bfloat16
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # without AVX-512 oneDNN has no bf16 kernel to keep it
            assert y.is_contiguous(memory_format=torch.channels_last_3d)
        assert not y_ref.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.02, atol=0.02)
        grad = torch.randn(y.shape)
        y.float().backward(grad)
        y_ref.float().backward(grad)
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=0.02, atol=0.02)
        torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=0.02, atol=0.05)
        conv.zero_grad()
        ref.zero_grad()


def test_biflownet_under_cpu_bf16_autocast_gives_the_same_step_with_channels_last(
        inputs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole training step of BiFlowNet under CPU bf16 autocast (native) works with channels-last activations
    (norms, activations, patching and attention take them) and matches the step without, to bf16 rounding."""
    monkeypatch.setattr(biflownet_module, "_native_cpu_bf16", lambda: True)
    net = randomize(BiFlowNet(**tiny_network(cross_attention="footprint", back_projection=True)))
    results = []
    for min_voxels in (MIN_CHANNELS_LAST_VOXELS, 10**9):
        monkeypatch.setattr(fast_conv, "MIN_CHANNELS_LAST_VOXELS", min_voxels)
        net.zero_grad()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(**inputs)
            out.float().square().mean().backward()
        layouts = [e for e in prof.key_averages() if e.key == "aten::contiguous"]
        results.append((out.float(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()],
                        layouts))
    (out, grads, layouts), (out_ref, grads_ref, _) = results
    assert layouts  # the channels-last copies happened in the first run
    torch.testing.assert_close(out, out_ref, rtol=0.05, atol=0.05)
    num = sum((a - b).square().sum() for a, b in zip(grads, grads_ref))
    den = sum(b.square().sum() for b in grads_ref)
    assert (num / den).sqrt() < 0.05  # relative gradient difference, all parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_of_channels_last_inputs_keeps_the_layout_and_pytorchs_values(dtype: torch.dtype) -> None:
    """FastGroupNorm normalises a channels-last CPU input in the contiguous layout (PyTorch's channels-last CPU
    backward is slow) and returns it channels-last, with nn.GroupNorm's values and gradients; other inputs pass."""
    torch.manual_seed(0)
    fast, ref = FastGroupNorm(4, 12), nn.GroupNorm(4, 12)
    randomize(fast)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 12, 4, 5, 6).to(dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fast(x), ref(x_ref)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    grad = torch.randn(y.shape).to(dtype)
    y.backward(grad)
    y_ref.backward(grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), **tol)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, **tol)
    flat = torch.randn(2, 12, 4, 5, 6)
    assert fast(flat).is_contiguous() and torch.equal(fast(flat), ref(flat))
    assert torch.equal(fast(flat[..., :1, :1, :1].contiguous()), ref(flat[..., :1, :1, :1].contiguous()))


def _swap_everywhere(monkeypatch: pytest.MonkeyPatch, capability: str = "AVX2", faster: bool = True) -> None:
    """The swapped weight gradient's route as on an AVX2 CPU where it was timed ``faster``."""
    monkeypatch.setattr(fast_conv, "cpu_capability", lambda: capability)
    monkeypatch.setattr(fast_conv, "_swapped_weight_grad_faster", lambda *key: faster)


@pytest.mark.parametrize("batch,cin,cout,kernel,padding,bias,channels_last", [
    (2, 8, 12, 3, 1, True, False), (3, 5, 7, 3, 0, False, True), (2, 6, 5, 2, 1, True, False),
    (2, 4, 4, (3, 2, 3), (2, 1, 0), True, True), (2, 16, 16, 3, 1, True, True), (1, 3, 5, 3, 1, False, False),
    (2, 40, 6, 3, 1, True, False),  # wider than the fp32 channels-last route: PyTorch's layout
])
def test_swapped_weight_gradient_matches_conv3d_in_float64(batch: int, cin: int, cout: int, kernel,
                                                           padding, bias: bool, channels_last: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the route is taken, values and all three gradients equal a float64 ``nn.Conv3d``'s, in either layout,
    with or without bias, for any kernel of 2+ and padding below it; the weight gradient is the swapped convolution."""
    _swap_everywhere(monkeypatch)
    g = torch.Generator().manual_seed(0)
    conv, ref = _conv_and_float64_twin(g, cin, cout, kernel, padding=padding, bias=bias)
    x = torch.randn(batch, cin, 9, 8, 10, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x64 = x.detach().double().requires_grad_()
    x = x.requires_grad_()
    y = conv(x)
    # small batch-1 convolutions keep their own oneDNN path (routes_to_onednn)
    onednn = routes_to_onednn(x, conv.weight, conv.stride, conv.padding, conv.dilation, 1)
    assert type(y.grad_fn).__name__ == ("_OneDnnConv3dBackward" if onednn else "_SwappedWeightGradConv3dBackward")
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    _assert_matches_float64(conv, ref, x, x64, y, grad, weight_tol=1e-4)


def test_swapped_weight_gradient_leaves_frozen_inputs_and_weights_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the gradients autograd asks for are computed: an input that needs none gets none (the first layer)."""
    _swap_everywhere(monkeypatch)
    conv = FastConv3d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, 8)
    y = conv(x)
    assert type(y.grad_fn).__name__ == "_SwappedWeightGradConv3dBackward"
    y.sum().backward()
    assert x.grad is None and conv.weight.grad is not None and conv.bias.grad is not None
    torch.testing.assert_close(conv.bias.grad, torch.full((4,), 2 * 8.0 ** 3))


def test_which_convolutions_take_the_swapped_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 CPU training convolutions with stride 1, no groups or dilation and kernels of 2+, on an AVX2 CPU (not one
    with AVX-512) where the swap was timed faster; never without gradients, under autocast or for 1x1x1 kernels."""
    x, w = torch.randn(2, 4, 8, 8, 8), torch.randn(4, 4, 3, 3, 3, requires_grad=True)
    one = (1, 1, 1)

    def route(x=x, w=w, stride=one, padding=one, dilation=one, groups=1) -> bool:
        return routes_to_swapped_weight_grad(x, w, stride, padding, dilation, groups)

    _swap_everywhere(monkeypatch)
    assert route()
    assert route(x=x.contiguous(memory_format=torch.channels_last_3d))
    assert not route(stride=(2, 2, 2))
    assert not route(dilation=(2, 2, 2))
    assert not route(w=torch.randn(4, 2, 3, 3, 3, requires_grad=True), groups=2)
    assert not route(w=torch.randn(4, 4, 1, 1, 1, requires_grad=True), padding=(0, 0, 0))
    assert not route(padding=(3, 1, 1))
    assert not route(x=x[:, :, :7])  # fewer than MIN_ONEDNN_VOXELS voxels
    assert not route(w=w.detach())  # a frozen weight has no gradient to compute
    assert not route(x=x.double(), w=w.detach().double().requires_grad_())
    with torch.no_grad():
        assert not route()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not route()
    _swap_everywhere(monkeypatch, capability="AVX512")
    assert not route()
    _swap_everywhere(monkeypatch, faster=False)
    assert not route()


def test_swapped_weight_gradient_is_timed_once_per_shape_and_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap is a measurement: taken only where it beat oneDNN's weight gradient by the margin, timed once per shape
    and layout, outside any FLOP counter, without touching the global random stream."""
    import time

    from torch.utils.flop_counter import FlopCounterMode

    real = fast_conv._swapped_weight_grad

    def slowed(seconds: float):
        def swapped(x, grad, padding):
            time.sleep(seconds)
            return real(x, grad, padding)
        return swapped

    fast_conv._swapped_weight_grad_faster.cache_clear()
    try:
        key = ((2, 3, 6, 6, 6), (4, 3, 3, 3, 3), (1, 1, 1))
        monkeypatch.setattr(fast_conv, "_swapped_weight_grad", slowed(0.02))  # far slower than oneDNN's
        state = torch.get_rng_state()
        with FlopCounterMode(display=False) as counter:
            assert fast_conv._swapped_weight_grad_faster(*key, False) is False
        assert counter.get_total_flops() == 0
        assert torch.equal(torch.get_rng_state(), state)
        monkeypatch.setattr(fast_conv, "_swapped_weight_grad", real)
        monkeypatch.setattr(fast_conv, "SWAPPED_WEIGHT_GRAD_MARGIN", 1e6)  # any time wins now, but it is cached
        assert fast_conv._swapped_weight_grad_faster(*key, False) is False
        assert fast_conv._swapped_weight_grad_faster(*key, True) is True  # the other layout is timed on its own
        assert fast_conv._swapped_weight_grad_faster.cache_info().currsize == 2
    finally:
        fast_conv._swapped_weight_grad_faster.cache_clear()
