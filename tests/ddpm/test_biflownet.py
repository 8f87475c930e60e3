"""BiFlowNet, DiT blocks, X-ray encoder and projection geometry."""

from __future__ import annotations

import pytest
import torch

from ddpm import BiFlowNet, CrossAttention, DiTBlock, XrayEncoder, guided
from ddpm.projection import back_project, footprint_mask, parallel_projection_grids
from tests.ddpm.conftest import XRAY, randomize, tiny_network

MODES = [
    {"cross_attention": "none", "xray": None, "num_classes": 2},
    {"cross_attention": "full"},
    {"cross_attention": "footprint"},
    {"cross_attention": "none", "back_projection": True},
    {"cross_attention": "footprint", "back_projection": True, "grad_checkpointing": True},
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m['cross_attention']}-bp{m.get('back_projection', False)}")
def test_output_shape_equals_input_shape(mode: dict, inputs: dict) -> None:
    net = BiFlowNet(**tiny_network(**mode)).train()
    out = net(**inputs)
    assert out.shape == inputs["x"].shape
    out.square().mean().backward()  # grad checkpointing path runs backward too
    assert net.t_embedder.mlp[0].weight.grad is not None


def test_output_starts_at_zero_and_dit_block_is_identity(inputs: dict) -> None:
    net = BiFlowNet(**tiny_network())
    assert torch.count_nonzero(net(**inputs)) == 0  # zero output convolution
    block = DiTBlock(dim=8, num_heads=2, cond_dim=32, context_dim=16)
    block.zero_init()
    x = torch.randn(4, 8, 8)
    out = block(x, torch.randn(4, 32), context=torch.randn(2, 5, 16))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    # and the blocks inside a freshly built BiFlowNet are zero-initialised the same way
    tok = torch.randn(2, 8, 8)
    torch.testing.assert_close(net.dit.in_blocks[0](tok, torch.randn(2, 32), torch.randn(1, 32, 16)), tok, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES[1:], ids=lambda m: f"{m['cross_attention']}-bp{m.get('back_projection', False)}")
def test_xrays_change_output_unless_condition_dropped(mode: dict, inputs: dict) -> None:
    net = randomize(BiFlowNet(**tiny_network(**mode))).eval()
    other = dict(inputs, ap=torch.rand(2, 1, 16, 16), lat=torch.rand(2, 1, 16, 16))
    keep = torch.tensor([False, False])
    assert not torch.allclose(net(**inputs, drop=keep), net(**other, drop=keep), atol=1e-5)
    drop = torch.tensor([True, True])
    torch.testing.assert_close(net(**inputs, drop=drop), net(**other, drop=drop))


def test_cross_attention_alone_depends_on_context() -> None:
    block = randomize(DiTBlock(dim=8, num_heads=2, cond_dim=16, context_dim=12))
    x, c = torch.randn(2, 4, 8), torch.randn(2, 16)
    a = block(x, c, context=torch.randn(1, 6, 12))
    b = block(x, c, context=torch.randn(1, 6, 12))
    assert (a - b).abs().max() > 1e-3


def test_cfg_scale_one_is_the_conditional_prediction(inputs: dict) -> None:
    net = randomize(BiFlowNet(**tiny_network(cross_attention="footprint"))).eval()
    x, t = inputs["x"], inputs["t"]
    cond = {k: inputs[k] for k in ("y", "ap", "lat")}
    c = net(x, t, drop=torch.zeros(2, dtype=torch.bool), **cond)
    torch.testing.assert_close(guided(net, 1.0, **cond)(x, t), c, rtol=0, atol=0)
    u = net(x, t, drop=torch.ones(2, dtype=torch.bool), **cond)
    torch.testing.assert_close(guided(net, 3.0, **cond)(x, t), u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_parallel_footprint_mask_is_the_projected_square() -> None:
    grid_ap, grid_lat = parallel_projection_grids((8, 8, 8))
    mask = footprint_mask(grid_ap, grid_lat, sub_volume=4, token_grid_hw=(4, 4), tokens_per_sub_volume=1)
    assert mask.shape == (8, 32)
    # sub-volume (0, 0, 0): rows 0-1 and columns 0-1 of both 4x4 token grids
    expected = {0, 1, 4, 5, 16, 17, 20, 21}
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == expected
    # sub-volume (1, 0, 1) (index 5): AP rows 2-3 / cols 2-3 (w), LAT rows 2-3 / cols 0-1 (h)
    assert set(torch.nonzero(mask[5]).flatten().tolist()) == {10, 11, 14, 15, 24, 25, 28, 29}


def test_footprint_cross_attention_ignores_tokens_outside_the_footprint() -> None:
    grid_ap, grid_lat = parallel_projection_grids((8, 8, 8))
    mask = footprint_mask(grid_ap, grid_lat, 4, (4, 4), tokens_per_sub_volume=2)  # (8 sub-volumes * 2, 32)
    attn = randomize(CrossAttention(dim=8, context_dim=6, num_heads=2))
    q, ctx = torch.randn(1, 16, 8), torch.randn(1, 32, 6)
    changed = ctx.clone()
    changed[:, ~mask[0]] = torch.randn_like(changed[:, ~mask[0]])  # everything sub-volume 0 cannot see
    a, b = attn(q, ctx, mask), attn(q, changed, mask)
    torch.testing.assert_close(a[:, :2], b[:, :2])  # sub-volume 0's queries unchanged
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-4  # the others see some of those tokens


def test_back_projection_reads_the_pixel_of_each_ray() -> None:
    grid_ap, grid_lat = parallel_projection_grids((4, 3, 5))
    fmap = torch.arange(4 * 5, dtype=torch.float32).reshape(1, 1, 4, 5)  # AP detector: rows = D, cols = W
    vol = back_project(fmap, grid_ap)
    assert vol.shape == (1, 1, 4, 3, 5)
    for h in range(3):
        torch.testing.assert_close(vol[0, 0, :, h, :], fmap[0, 0])
    lmap = torch.arange(4 * 3, dtype=torch.float32).reshape(1, 1, 4, 3)  # LAT detector: cols = H
    torch.testing.assert_close(back_project(lmap, grid_lat)[0, 0, :, :, 2], lmap[0, 0])


def test_xray_encoder_tokens_and_null_tokens() -> None:
    enc = XrayEncoder(**XRAY)
    ap, lat = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    tokens, pooled = enc(ap, lat, drop=torch.tensor([False, True, False]))
    assert tokens.shape == (3, 32, 16) and pooled.shape == (3, 16)
    torch.testing.assert_close(tokens[1], enc.null_tokens[0])
    torch.testing.assert_close(pooled[1], enc.null_pooled[0])
    ap_map, lat_map = enc.token_maps(tokens)
    assert ap_map.shape == lat_map.shape == (3, 16, 4, 4)


def test_bad_inputs_raise_clear_errors(inputs: dict) -> None:
    net = BiFlowNet(**tiny_network())
    with pytest.raises(ValueError, match="X-ray has shape"):
        net(**dict(inputs, ap=torch.rand(2, 1, 32, 32)))
    with pytest.raises(ValueError, match="latent_shape"):
        net(**dict(inputs, x=torch.randn(2, 4, 16, 8, 8)))
    with pytest.raises(ValueError, match="expected \\(B, 4"):
        net(**dict(inputs, x=torch.randn(2, 3, 8, 8, 8)))
    with pytest.raises(ValueError, match="class labels"):
        net(**dict(inputs, y=torch.tensor([0, 5])))
    with pytest.raises(ValueError, match="pass ap and lat"):
        net(inputs["x"], inputs["t"], inputs["y"])
    with pytest.raises(ValueError, match="cross_attention"):
        BiFlowNet(**tiny_network(cross_attention="sideways"))
    with pytest.raises(ValueError, match="divisible"):
        BiFlowNet(**tiny_network(latent_shape=[6, 8, 8]))


def _fill(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Deterministic pseudo-random weights that depend only on each parameter's shape (not on names or order)."""
    with torch.no_grad():
        for p in module.parameters():
            k = torch.arange(p.numel(), dtype=torch.float64)
            h = torch.frac(torch.sin(12.9898 * k + 78.233 * p.numel() + 1.7 * p.ndim) * 43758.5453) - 0.5
            p.copy_((2 * scale * h).reshape(p.shape))
    return module


# (sum of out * fixed noise, sum |out|, out[0, 1, 2, 3, :4] + out[1, 3, 7, 5, 4:]) of the network as first written,
# so that restructuring the code cannot change what it computes
PINNED = {
    "classes-only": (10.1898, 1080.581, [0.271103, 0.512604, 0.621735, 0.642976, 0.389212, 0.371908, 0.269682, 0.108234]),
    "pooled": (7.64464, 1101.048, [0.298263, 0.552963, 0.634971, 0.646064, 0.355358, 0.330256, 0.234873, 0.089638]),
    "full": (7.76538, 1101.526, [0.297271, 0.551202, 0.633024, 0.643921, 0.356828, 0.331874, 0.23669, 0.090758]),
    "footprint": (7.77946, 1101.599, [0.297238, 0.551147, 0.632975, 0.643859, 0.358119, 0.333369, 0.23819, 0.091614]),
    "bp": (0.736583, 1117.158, [0.359898, 0.594695, 0.454356, 0.360933, -0.082398, -0.069498, 0.083046, 0.056399]),
    "footprint-bp": (0.787883, 1117.234, [0.359859, 0.594652, 0.454301, 0.360747, -0.082415, -0.069704, 0.082744, 0.056212]),
}
PINNED_MODES = {
    "classes-only": {"cross_attention": "none", "xray": None},
    "pooled": {"cross_attention": "none"},
    "full": {"cross_attention": "full"},
    "footprint": {"cross_attention": "footprint"},
    "bp": {"cross_attention": "none", "back_projection": True},
    "footprint-bp": {"cross_attention": "footprint", "back_projection": True},
}


@pytest.mark.parametrize("name", list(PINNED))
def test_outputs_are_pinned(name: str) -> None:
    from dataset.drr import DRRGeometry

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 8, generator=g)
    ap, lat = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    net = _fill(BiFlowNet(**tiny_network(**PINNED_MODES[name]))).eval()
    if net.xray_encoder is not None:  # an asymmetric cone-beam geometry (tilted, offset lateral view)
        geom = DRRGeometry.uniform(1500, 1000, 16, 20.0).replace_view("LAT", angle=3.0, offset=(10.0, -25.0))
        net.set_projection_grids(*(geom.sample_grid(v, (8, 8, 8), (20.0, 18.0, 22.0)) for v in ("AP", "LAT")))
    with torch.no_grad():
        out = net(x, torch.tensor([3, 700]), torch.tensor([0, 1]), ap, lat, drop=torch.tensor([False, True]))
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    weighted, total, values = PINNED[name]
    assert (out * noise).sum().item() == pytest.approx(weighted, abs=2e-4)
    assert out.abs().sum().item() == pytest.approx(total, rel=2e-6)
    got = torch.cat([out[0, 1, 2, 3, :4], out[1, 3, 7, 5, 4:]])
    torch.testing.assert_close(got, torch.tensor(values), rtol=0, atol=2e-6)


@pytest.mark.parametrize("heads", [None, 1, 2])
def test_unet_heads_set_the_spatial_attention_heads(heads: int | None, inputs: dict) -> None:
    """``unet_heads`` splits the U-Net's spatial self-attention (default 4, as before the option existed, so older
    checkpoints rebuild unchanged); the parameters keep their shapes, the attention its meaning per head."""
    from monai.networks.blocks.selfattention import SABlock

    kwargs = {} if heads is None else {"unet_heads": heads}
    net = _fill(BiFlowNet(**tiny_network(**kwargs))).eval()
    blocks = [m for m in net.unet.modules() if isinstance(m, SABlock)]
    assert blocks and {b.num_heads for b in blocks} == {heads or 4}
    ref = _fill(BiFlowNet(**tiny_network())).eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.no_grad():
        same = torch.equal(net(**inputs), ref(**inputs))
    assert same == (heads in (None, 4))


@pytest.mark.parametrize("heads", [0, -1, 3, 1.0, True, "2"])
def test_bad_unet_heads_are_refused_in_one_line(heads) -> None:
    with pytest.raises(ValueError, match=r"unet_heads=.*model_channels=8"):
        BiFlowNet(**tiny_network(unet_heads=heads))


def test_unet_attention_is_fused_and_equals_the_explicit_softmax(inputs: dict) -> None:
    """The inter-patch U-Net's spatial self-attention runs PyTorch's fused SDPA (the explicit softmax path cost
    30 % of a demo training step) and computes what the explicit path computes, forward and backward."""
    from monai.networks.blocks.selfattention import SABlock

    net = _fill(BiFlowNet(**tiny_network(latent_shape=[8, 8, 8], channel_mults=[1, 2], attn_levels=[0, 1]))).train()
    blocks = [m for m in net.unet.modules() if isinstance(m, SABlock)]
    assert len(blocks) >= 4 and all(b.use_flash_attention for b in blocks)
    fused = net(**inputs)
    fused.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    for b in blocks:
        b.use_flash_attention = False
    explicit = net(**inputs)
    explicit.square().mean().backward()
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, [p.grad for p in net.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dim,heads,limit,fp32", [(16, 2, 0, True), (72, 8, 0, True), (64, 2, 0, False),
                                                   (16, 2, None, False)])
def test_narrow_attention_heads_compute_in_fp32_under_cpu_bf16_autocast(dim: int, heads: int, limit: int | None,
                                                                        fp32: bool, monkeypatch) -> None:
    """Heads narrower than CPU_BF16_MIN_HEAD_DIM (32) leave CPU bf16 autocast for the self- and cross-attention
    sub-layers (measured faster there) when their score matrix is too large for the explicit bf16 path (``limit``:
    CPU_BF16_MAX_EXPLICIT_SCORES, 0 = none is small enough); wider ones, small ones, and fp32 runs are untouched."""
    from ddpm import dit_block
    from ddpm.dit_block import CPU_BF16_MIN_HEAD_DIM, attention_in_fp32

    assert CPU_BF16_MIN_HEAD_DIM == 32
    if limit is not None:
        monkeypatch.setattr(dit_block, "CPU_BF16_MAX_EXPLICIT_SCORES", limit)
    block = randomize(DiTBlock(dim=dim, num_heads=heads, cond_dim=16, context_dim=12)).eval()
    seen = {}
    block.attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("self", o.dtype))
    block.cross.q.register_forward_hook(lambda m, i, o: seen.__setitem__("cross", o.dtype))
    block.mlp.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o.dtype))
    x, c, ctx = torch.randn(4, 8, dim), torch.randn(4, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        reference = block(x, c, ctx)
        assert seen == {"self": torch.float32, "cross": torch.float32, "mlp": torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert attention_in_fp32(x, dim // heads) is fp32
            mixed = block(x, c, ctx)
    expected = torch.float32 if fp32 else torch.bfloat16
    assert seen == {"self": expected, "cross": expected, "mlp": torch.bfloat16}
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=0.05)
    assert not attention_in_fp32(x, dim // heads)  # outside autocast: nothing to change


@pytest.mark.parametrize("mask_shape", [None, (10, 7), (1, 1, 10, 7), (2, 1, 10, 7), (2, 3, 10, 7), "additive"])
def test_explicit_attention_equals_pytorchs_with_masks_and_empty_rows(mask_shape) -> None:
    """The explicit attention core (CPU bf16 path) is PyTorch's attention exactly, in float64: values and gradients,
    shared or per-batch boolean masks with queries that see no key (zeros, finite gradients), additive masks."""
    import torch.nn.functional as F

    from ddpm.dit_block import _explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (10, 7, 7))
    mask = None
    if mask_shape == "additive":
        mask = torch.randn(1, 3, 10, 7, generator=g, dtype=torch.float64)
    elif mask_shape is not None:
        mask = torch.rand(mask_shape, generator=g) > 0.4
        mask[..., 0, :] = True
        mask[..., 3, :] = False  # query 3 sees nothing
    grad = torch.randn(2, 3, 10, 5, generator=g, dtype=torch.float64)
    out = _explicit_attention(q, k, v, mask, 0.3)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, reference)
    if mask_shape not in (None, "additive"):
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("limit,explicit", [(None, True), (0, False)])
def test_cpu_bf16_attention_runs_explicit_products_up_to_the_limit(limit: int | None, explicit: bool,
                                                                   monkeypatch) -> None:
    """CPU bf16 attention with at most CPU_BF16_MAX_EXPLICIT_SCORES scores skips PyTorch's flash kernel (slow for
    bf16 on the CPU) and agrees with fp32 attention to bf16 rounding; larger ones keep the kernel."""
    from torch.profiler import ProfilerActivity, profile

    from ddpm import dit_block

    if limit is not None:
        monkeypatch.setattr(dit_block, "CPU_BF16_MAX_EXPLICIT_SCORES", limit)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 9, generator=g) for n in (64, 48, 48))
    mask = torch.rand(1, 1, 64, 48, generator=g) > 0.3
    mask[..., 0] = True
    reference = dit_block.attention(q, k, v, attn_mask=mask)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = dit_block.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)
    flash = any("flash_attention" in e.key for e in prof.key_averages())
    assert flash is not explicit and out.dtype == torch.bfloat16 and out.shape == reference.shape
    torch.testing.assert_close(out.float(), reference, rtol=0.03, atol=0.03)
    assert 2 * 4 * 64 * 48 <= dit_block.CPU_BF16_MAX_EXPLICIT_SCORES or not explicit


def test_timm_attention_runs_through_ours_with_the_same_state_and_values() -> None:
    """Every timm Attention in BiFlowNet (DiT blocks, X-ray encoder) becomes a FastAttention: same state-dict keys,
    timm's values in fp32 and float64, PyTorch's own forward where ours does not apply."""
    from timm.models.vision_transformer import Attention

    from ddpm.dit_block import FastAttention, use_fast_attention

    net = BiFlowNet(**tiny_network())
    attns = [m for m in net.modules() if isinstance(m, Attention)]
    assert attns and all(type(m) is FastAttention for m in attns)
    assert any("xray" in name for name, m in net.named_modules() if isinstance(m, FastAttention))
    torch.manual_seed(0)
    plain = randomize(Attention(24, num_heads=4, qkv_bias=True)).eval()
    fast = use_fast_attention(randomize(Attention(24, num_heads=4, qkv_bias=True))).eval()
    fast.load_state_dict(plain.state_dict())
    assert type(fast) is FastAttention and list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 11, 24)
    torch.testing.assert_close(fast(x), plain(x))
    torch.testing.assert_close(fast.double()(x.double()), plain.double()(x.double()))
    mask = torch.rand(11, 11) > 0.5
    mask[:, 0] = True
    torch.testing.assert_close(fast(x.double(), attn_mask=mask), plain(x.double(), attn_mask=mask))
    dropping = use_fast_attention(Attention(24, num_heads=4, attn_drop=0.5)).train()
    torch.manual_seed(1)
    a = dropping(x)
    torch.manual_seed(1)
    b = Attention.forward(dropping, x)  # timm's own forward, with its attention dropout
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_dim,masked", [(9, False), (9, True), (4, True), (16, False), (18, False)])
def test_narrow_heads_padded_on_the_cpu_give_the_same_attention(head_dim: int, masked: bool) -> None:
    """Heads narrower than CPU_MIN_HEAD_DIM (16) run zero-padded to it on the CPU: the same values and gradients as
    plain attention (in float64), with or without a footprint mask; wider heads run as they are."""
    from torch.profiler import ProfilerActivity, profile

    from ddpm.dit_block import CPU_MIN_HEAD_DIM, attention

    assert CPU_MIN_HEAD_DIM == 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (10, 7, 7))
    mask = torch.rand(10, 7, generator=g) > 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every query sees at least one key
    grad = torch.randn(2, 3, 10, head_dim, generator=g, dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = attention(q, k, v, attn_mask=None if mask is None else mask[None, None])
    padded = any(e.key == "aten::constant_pad_nd" for e in prof.key_averages())
    assert padded is (head_dim < CPU_MIN_HEAD_DIM)
    assert out.shape == (2, 3, 10, head_dim)
    scores = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    reference = scores.softmax(-1) @ v
    grads = torch.autograd.grad(out, (q, k, v), grad)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)
    torch.testing.assert_close(out, reference)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b)
