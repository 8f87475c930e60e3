"""BiFlowNet: latent denoiser with an intra-patch flow (DiT) and an inter-patch flow (3D U-Net).

Intra-patch flow (:class:`IntraPatchDiT`): the (noisy) latent is cut into cubic sub-volumes; each
sub-volume becomes a short token sequence (3D patch embedding + fixed 3D sin-cos positions) processed
by DiT blocks with adaLN-Zero, optionally cross-attending to X-ray tokens. Input blocks, middle blocks
and skip-fused output blocks each emit a voxel feature map through a zero-initialised final layer.

Inter-patch flow (:class:`InterPatchUNet`): a 3D U-Net over the whole latent volume. Its leading
full-resolution levels receive the intra-patch features of the input blocks (encoder) and output
blocks (decoder) by addition, which is how local detail (DiT) and global context (U-Net) are fused.

X-ray conditioning (optional, :class:`ddpm.xray_conditioner.XrayConditioner`): a pooled X-ray vector
joins the adaLN/U-Net conditioning; DiT blocks cross-attend to all X-ray tokens (``"full"``) or only to
the tokens over the sub-volume's projected footprint (``"footprint"``); and/or X-ray feature maps are
back-projected along the rays into the latent grid and concatenated with the noisy latent.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from dataset.drr import DRRGeometry
from ddpm.dit_block import DiTBlock, FinalLayer, use_fast_attention
from ddpm.embeddings import LabelEmbedder, ResolutionEmbedder, TimestepEmbedder, sincos_pos_embed_3d
from ddpm.fast_conv import use_fast_conv3d, use_fast_linear
from ddpm.xray_conditioner import CROSS_ATTENTION_MODES, XrayConditioner


@functools.cache
def _native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX); elsewhere oneDNN emulates it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: keep what the caller asked for
        return True


def _compute_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """fp32 instead of CPU bf16 autocast on CPUs that only emulate bf16 (several times slower there), else as is."""
    if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not _native_cpu_bf16()):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


def _run(module: nn.Module, checkpointed: bool, *args) -> torch.Tensor:
    """Call ``module(*args)``, recomputing it in backward when asked (training with gradients only)."""
    if checkpointed and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# ---------------------------------------------------------------------------------------- intra-patch flow
class IntraPatchDiT(nn.Module):
    """DiT over the tokens of each latent sub-volume, emitting voxel features for the U-Net to fuse.

    Args:
        in_channels: channels of the (possibly back-projection-augmented) latent.
        dim: token width.
        cond_dim: conditioning vector width.
        sub_volume: sub-volume edge in latent voxels.
        token_patch: token edge in latent voxels (divides ``sub_volume``).
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        num_levels: input (and output) blocks, one per U-Net fusion level.
        num_mid: middle blocks.
        context_dim: X-ray token width for cross-attention, or None.
        grad_checkpointing: recompute the blocks in backward.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        cond_dim: int,
        sub_volume: int,
        token_patch: int,
        num_heads: int,
        mlp_ratio: float,
        num_levels: int,
        num_mid: int,
        context_dim: int | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if sub_volume % token_patch:
            raise ValueError(f"sub_volume={sub_volume} is not divisible by token_patch={token_patch}")
        self.sub_volume = sub_volume
        self.token_patch = token_patch
        self.tokens_per_side = sub_volume // token_patch
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Conv3d(in_channels, dim, kernel_size=token_patch, stride=token_patch)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(dim, (self.tokens_per_side,) * 3)[None], persistent=False)
        block = lambda skip: DiTBlock(dim, num_heads, cond_dim, mlp_ratio, context_dim, skip)  # noqa: E731
        final = lambda: FinalLayer(dim, cond_dim, token_patch, dim)  # noqa: E731
        self.in_blocks = nn.ModuleList([block(False) for _ in range(num_levels)])
        self.in_final = nn.ModuleList([final() for _ in range(num_levels)])
        self.mid_blocks = nn.ModuleList([block(False) for _ in range(num_mid)])
        self.out_blocks = nn.ModuleList([block(True) for _ in range(num_levels)])
        self.out_final = nn.ModuleList([final() for _ in range(num_levels)])

    def zero_init(self) -> None:
        """Xavier patch embedding; adaLN-Zero blocks and zero final layers (the flow starts silent)."""
        w = self.embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.embed.bias)
        for b in [*self.in_blocks, *self.mid_blocks, *self.out_blocks]:
            b.zero_init()
        for layer in [*self.in_final, *self.out_final]:
            layer.zero_init()

    def _to_volume(self, tokens: torch.Tensor, nsub: tuple[int, int, int]) -> torch.Tensor:
        """(B*n, T, p^3*C) tokens -> (B, C, D, H, W) voxel features."""
        t, p = self.tokens_per_side, self.token_patch
        return rearrange(
            tokens,
            "(b nd nh nw) (td th tw) (pd ph pw c) -> b c (nd td pd) (nh th ph) (nw tw pw)",
            nd=nsub[0], nh=nsub[1], nw=nsub[2], td=t, th=t, tw=t, pd=p, ph=p, pw=p,
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the DiT over every sub-volume.

        Args:
            x: (B, C, D, H, W) latent (with back-projected features when used).
            c: (B, cond_dim) conditioning.
            context: (B, M, Cx) X-ray tokens, or None.
            mask: footprint mask for cross-attention (see :class:`ddpm.dit_block.CrossAttention`), or None.

        Returns:
            (features of the input blocks, features of the output blocks), each a list of
            (B, dim, D, H, W), one per fusion level, outermost level first.
        """
        s = self.sub_volume
        nsub = (x.shape[2] // s, x.shape[3] // s, x.shape[4] // s)
        patches = rearrange(x, "b c (nd sd) (nh sh) (nw sw) -> (b nd nh nw) c sd sh sw", sd=s, sh=s, sw=s)
        tok = rearrange(self.embed(patches), "n c d h w -> n (d h w) c") + self.pos_embed  # (B*n, T, dim)
        c = repeat(c, "b k -> (b n) k", n=nsub[0] * nsub[1] * nsub[2])
        gc = self.grad_checkpointing
        skips, feat_in, feat_out = [], [], []
        for block, final in zip(self.in_blocks, self.in_final):
            tok = _run(block, gc, tok, c, context, mask)
            skips.append(tok)
            feat_in.append(self._to_volume(final(tok, c), nsub))
        for block in self.mid_blocks:
            tok = _run(block, gc, tok, c, context, mask)
        for block, final in zip(self.out_blocks, self.out_final):
            tok = _run(block, gc, tok, c, context, mask, skips.pop())
            feat_out.append(self._to_volume(final(tok, c), nsub))
        return feat_in, feat_out[::-1]


# ---------------------------------------------------------------------------------------- inter-patch flow
def _res(ch_in: int, ch_out: int, cond_dim: int, groups: int) -> DiffusionUNetResnetBlock:
    return DiffusionUNetResnetBlock(3, ch_in, cond_dim, ch_out, norm_num_groups=groups)


def _attn(ch: int, on: bool, groups: int, heads: int = 4) -> nn.Module:
    if not on:
        return nn.Identity()
    return SpatialAttentionBlock(3, ch, num_head_channels=max(ch // heads, 1), norm_num_groups=groups,
                                 use_flash_attention=True)


class _Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownStage(nn.Module):
    """U-Net encoder level: residual block + attention, twice, then (optional) downsampling.

    Args:
        ch_in, ch_out: channels in and out.
        cond_dim: conditioning width.
        groups: GroupNorm groups.
        attention: spatial self-attention after each residual block.
        downsample: halve the resolution at the end.
        heads: heads of that attention.
    """

    def __init__(self, ch_in: int, ch_out: int, cond_dim: int, groups: int, attention: bool, downsample: bool,
                 heads: int = 4) -> None:
        super().__init__()
        self.res1 = _res(ch_in, ch_out, cond_dim, groups)
        self.attn1 = _attn(ch_out, attention, groups, heads)
        self.res2 = _res(ch_out, ch_out, cond_dim, groups)
        self.attn2 = _attn(ch_out, attention, groups, heads)
        self.resample = _Downsample(ch_out) if downsample else nn.Identity()

    def forward(self, h: torch.Tensor, c: torch.Tensor, gc: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, ch_in, D, H, W) -> (resampled output, [skip after block 1, skip after block 2])."""
        h1 = self.attn1(_run(self.res1, gc, h, c))
        h2 = self.attn2(_run(self.res2, gc, h1, c))
        return self.resample(h2), [h1, h2]


class UpStage(nn.Module):
    """U-Net decoder level: (skip concat, residual block, attention) twice, then (optional) upsampling.

    Args:
        ch_skip: channels of this level's skips (and of the incoming features).
        ch_out: channels out.
        cond_dim: conditioning width.
        groups: GroupNorm groups.
        attention: spatial self-attention after each residual block.
        upsample: double the resolution at the end.
        heads: heads of that attention.
    """

    def __init__(self, ch_skip: int, ch_out: int, cond_dim: int, groups: int, attention: bool, upsample: bool,
                 heads: int = 4) -> None:
        super().__init__()
        self.res1 = _res(2 * ch_skip, ch_skip, cond_dim, groups)
        self.attn1 = _attn(ch_skip, attention, groups, heads)
        self.res2 = _res(2 * ch_skip, ch_out, cond_dim, groups)
        self.attn2 = _attn(ch_out, attention, groups, heads)
        self.resample = _Upsample(ch_out) if upsample else nn.Identity()

    def forward(self, h: torch.Tensor, c: torch.Tensor, skips: list[torch.Tensor], gc: bool) -> torch.Tensor:
        """Consume this level's two skips (last first) and return the (resampled) output."""
        h = self.attn1(_run(self.res1, gc, torch.cat([h, skips.pop()], dim=1), c))
        h = self.attn2(_run(self.res2, gc, torch.cat([h, skips.pop()], dim=1), c))
        return self.resample(h)


class MidStage(nn.Module):
    """U-Net bottleneck: residual block, spatial self-attention, residual block."""

    def __init__(self, ch: int, cond_dim: int, groups: int, heads: int = 4) -> None:
        super().__init__()
        self.res1 = _res(ch, ch, cond_dim, groups)
        self.attn = _attn(ch, True, groups, heads)
        self.res2 = _res(ch, ch, cond_dim, groups)

    def forward(self, h: torch.Tensor, c: torch.Tensor, gc: bool) -> torch.Tensor:
        return _run(self.res2, gc, self.attn(_run(self.res1, gc, h, c)), c)


class InterPatchUNet(nn.Module):
    """3D U-Net across sub-volumes; its full-resolution levels add the intra-patch features.

    Args:
        in_channels: latent channels (with back-projected features when used).
        out_channels: predicted channels.
        dim: base width.
        mults: width per level; the leading 1s are the full-resolution fusion levels.
        attn_levels: levels with spatial self-attention.
        cond_dim: conditioning width.
        groups: GroupNorm groups.
        grad_checkpointing: recompute the residual blocks in backward.
        heads: heads of the spatial self-attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dim: int,
        mults: Sequence[int],
        attn_levels: Sequence[int],
        cond_dim: int,
        groups: int,
        grad_checkpointing: bool = False,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.n_levels = len(mults)
        self.n_fusion = next((i for i, m in enumerate(mults) if m != 1), len(mults))
        self.grad_checkpointing = grad_checkpointing
        dims = [dim] + [dim * m for m in mults]
        self.init_conv = nn.Conv3d(in_channels, dim, 3, padding=1)
        self.down = nn.ModuleList([
            DownStage(dims[i], dims[i + 1], cond_dim, groups, i in attn_levels,
                      self.n_fusion - 1 <= i < self.n_levels - 1, heads)
            for i in range(self.n_levels)
        ])  # fmt: skip
        self.mid = MidStage(dims[-1], cond_dim, groups, heads)
        self.up = nn.ModuleList([
            UpStage(dims[i + 1], dims[i], cond_dim, groups, i in attn_levels, i >= self.n_fusion, heads)
            for i in reversed(range(self.n_levels))
        ])  # fmt: skip
        self.out_res = _res(2 * dim, dim, cond_dim, groups)
        self.out_norm = nn.GroupNorm(groups, dim)
        self.out_conv = nn.Conv3d(dim, out_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, feat_in: list[torch.Tensor], feat_out: list[torch.Tensor]
    ) -> torch.Tensor:
        """(B, C, D, H, W) latent, (B, cond_dim), DiT features per fusion level -> (B, out, D, H, W)."""
        gc = self.grad_checkpointing
        h = r = self.init_conv(x)
        skips = []
        for i, stage in enumerate(self.down):
            if i < self.n_fusion:
                h = h + feat_in[i]
            h, s = stage(h, c, gc)
            skips += s
        h = self.mid(h, c, gc)
        for j, stage in enumerate(self.up):
            i = self.n_levels - 1 - j
            if i < self.n_fusion:
                h = h + feat_out[i]
            h = stage(h, c, skips, gc)
        h = _run(self.out_res, gc, torch.cat([h, r], dim=1), c)
        return self.out_conv(F.silu(self.out_norm(h)))


# ---------------------------------------------------------------------------------------------- BiFlowNet
class BiFlowNet(nn.Module):
    """Latent diffusion denoiser; output has the layout and shape of the input latent.

    Args:
        in_channels: latent channels C.
        out_channels: predicted channels (default C).
        latent_shape: (D, H, W) of the latent grid the projection grids are built for.
        model_channels: base width of U-Net and DiT tokens.
        channel_mults: U-Net width per level; the leading 1s mark full-resolution levels that fuse
            intra-patch features (at least one).
        attn_levels: U-Net levels with spatial self-attention (the middle block always has it).
        norm_groups: GroupNorm groups in the U-Net.
        unet_heads: heads of the U-Net's spatial self-attention (each ``channels / unet_heads`` wide). Narrow heads
            make it cost more than its products: at the ``tiny`` preset's 32 channels on 8^3, four heads of 8 took
            about 5x as long as one head of 32 (softmax over four times the scores).
        sub_volume: edge of a latent sub-volume (intra-patch unit) in latent voxels.
        token_patch: edge of one DiT token in latent voxels; must divide ``sub_volume``.
        dit_heads: attention heads in DiT blocks.
        mlp_ratio: DiT MLP width ratio.
        num_mid_dit: DiT blocks between input and output blocks.
        num_classes: class labels (0: no class conditioning).
        use_resolution: add a latent-size embedding to the conditioning.
        xray: XrayEncoder keyword arguments, or None for no X-ray conditioning.
        cross_attention: ``"none"``, ``"full"`` or ``"footprint"``.
        back_projection: concatenate back-projected X-ray features with the noisy latent.
        backproj_channels: channels of the back-projected features.
        grad_checkpointing: recompute DiT blocks and U-Net blocks in backward to save memory.
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int | None = None,
        latent_shape: Sequence[int] = (32, 32, 32),
        model_channels: int = 64,
        channel_mults: Sequence[int] = (1, 1, 2, 4),
        attn_levels: Sequence[int] = (),
        norm_groups: int = 8,
        unet_heads: int = 4,
        sub_volume: int = 8,
        token_patch: int = 2,
        dit_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_mid_dit: int = 1,
        num_classes: int = 0,
        use_resolution: bool = True,
        xray: dict | None = None,
        cross_attention: str = "none",
        back_projection: bool = False,
        backproj_channels: int = 8,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if grad_checkpointing not in (True, False):
            raise ValueError(f"grad_checkpointing={grad_checkpointing!r}; expected true or false (train_BiFlowNet "
                             "decides `auto` per run before building the network, see ddpm.memory)")
        mults = [int(m) for m in channel_mults]
        if not mults or mults[0] != 1:
            raise ValueError(f"channel_mults must start with 1 (a full-resolution fusion level), got {mults}")
        if sub_volume % token_patch:
            raise ValueError(f"sub_volume={sub_volume} is not divisible by token_patch={token_patch}")
        if (isinstance(unet_heads, bool) or not isinstance(unet_heads, int) or unet_heads < 1
                or model_channels % unet_heads):
            raise ValueError(f"unet_heads={unet_heads!r}; expected a positive integer that divides "
                             f"model_channels={model_channels}")
        if cross_attention not in CROSS_ATTENTION_MODES:
            raise ValueError(f"cross_attention={cross_attention!r}, expected one of {CROSS_ATTENTION_MODES}")
        if xray is None and (cross_attention != "none" or back_projection):
            raise ValueError("cross_attention/back_projection need an `xray` encoder configuration")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.sub_volume = sub_volume
        self.num_classes = num_classes
        self.cross_attention = cross_attention
        self.back_projection = back_projection
        n_fusion = next((i for i, m in enumerate(mults) if m != 1), len(mults))
        self.down_factor = 2 ** (len(mults) - n_fusion)
        for s in self.latent_shape:
            if s % sub_volume or s % self.down_factor:
                raise ValueError(
                    f"latent_shape {self.latent_shape} must be divisible by sub_volume={sub_volume} "
                    f"and by the U-Net downsampling factor {self.down_factor}"
                )
        dim = model_channels
        cond_dim = 4 * dim
        self.model_channels = dim

        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim) if num_classes > 0 else None
        self.res_embedder = ResolutionEmbedder(cond_dim) if use_resolution else None
        self.xray = None
        if xray is not None:
            self.xray = XrayConditioner(xray, cond_dim, self.latent_shape, sub_volume, (sub_volume // token_patch) ** 3,
                                        cross_attention, back_projection, backproj_channels)
        net_in = in_channels + (backproj_channels if back_projection else 0)
        context_dim = self.xray.context_dim if self.xray is not None else None
        self.dit = IntraPatchDiT(net_in, dim, cond_dim, sub_volume, token_patch, dit_heads, mlp_ratio, n_fusion,
                                 num_mid_dit, context_dim, grad_checkpointing)
        self.unet = InterPatchUNet(net_in, self.out_channels, dim, mults, attn_levels, cond_dim, norm_groups,
                                   grad_checkpointing, unet_heads)
        self.initialize_weights()
        # conv weights stay in PyTorch's default NCDHW layout: with NDHWC weights every batch-1 convolution
        # on a small grid (PyTorch's reference kernel) re-laid its kernel out in each direction and a 16^3
        # training step of the base preset took 2.4x as long (3.61 vs 1.52 s; 8.76 vs 7.97 s at 32^3)
        use_fast_conv3d(self)  # small CPU convolutions on oneDNN too (see ddpm.fast_conv)
        use_fast_linear(self)  # and fp32 CPU linear layers on oneDNN's inner product
        use_fast_attention(self)  # and timm's attention through ddpm.dit_block.attention

    @property
    def xray_encoder(self):
        """The X-ray encoder (:class:`ddpm.xray_encoder.XrayEncoder`), or None without X-ray conditioning."""
        return self.xray.encoder if self.xray is not None else None

    @property
    def grad_checkpointing(self) -> bool:
        """Whether DiT and U-Net blocks are recomputed in backward."""
        return self.dit.grad_checkpointing

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Xavier linears and patch embedding, zero adaLN/final layers, zero output convolution."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.xray is not None:
            self.xray.encoder.reset_parameters()
        self.dit.zero_init()
        for emb in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(emb.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.zeros_(self.unet.out_conv.weight)
        nn.init.zeros_(self.unet.out_conv.bias)

    # ------------------------------------------------------------- geometry
    def _conditioner(self) -> XrayConditioner:
        if self.xray is None:
            raise ValueError("this BiFlowNet has no X-ray conditioning; projection geometry is not used")
        return self.xray

    @property
    def geometry(self) -> DRRGeometry | None:
        """The default (training) ``dataset.drr.DRRGeometry``, or None (no X-rays, or parallel-beam grids)."""
        return self.xray.geometry if self.xray is not None else None

    def set_geometry(self, geometry: DRRGeometry | None, latent_spacing: Sequence[float] | None) -> None:
        """Make a ``DRRGeometry`` (or None: parallel beam) the default, with the latent voxel spacing in mm."""
        self._conditioner().set_geometry(geometry, latent_spacing)

    def set_projection_grids(self, grid_ap: torch.Tensor, grid_lat: torch.Tensor) -> None:
        """Replace the (D, H, W, 2) projection grids by hand (then no default geometry is known)."""
        self._conditioner().set_projection_grids(grid_ap, grid_lat)

    # --------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"latent has shape {tuple(x.shape)}, expected (B, {self.in_channels}, D, H, W)")
        if self.xray is not None and tuple(x.shape[2:]) != self.latent_shape:
            raise ValueError(
                f"latent grid {tuple(x.shape[2:])} does not match the configured latent_shape {self.latent_shape}"
            )
        for s in x.shape[2:]:
            if s % self.sub_volume or s % self.down_factor:
                raise ValueError(
                    f"latent grid {tuple(x.shape[2:])} must be divisible by sub_volume={self.sub_volume} "
                    f"and the U-Net factor {self.down_factor}"
                )

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, drop: torch.Tensor | None) -> torch.Tensor:
        """Timestep (+ latent size, + class) conditioning, (B, cond_dim)."""
        b = x.shape[0]
        c = self.t_embedder(t.expand(b) if t.ndim == 0 else t)
        if self.res_embedder is not None:
            c = c + self.res_embedder(tuple(x.shape[2:]), b, x.device)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this BiFlowNet is class-conditional; pass class labels y")
            c = c + self.y_embedder(y, drop)
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        ap: torch.Tensor | None = None,
        lat: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target for a noisy latent.

        Args:
            x: (B, C, D, H, W) noisy (normalised) latent.
            t: (B,) timesteps.
            y: (B,) long class labels (required iff ``num_classes > 0``).
            ap, lat: (B, 1, H, W) X-rays in [0, 1] (required iff X-ray conditioned).
            drop: (B,) bool, True drops every condition of that sample (null class, null X-ray tokens).
            geometry: (B, 2, 10) packed geometry of each X-ray pair (``DRRGeometry.to_tensor()``; its
                detector size is the X-ray size), or None for the stored default geometry (ignored
                without X-ray conditioning).

        Returns:
            (B, out_channels, D, H, W).
        """
        self._check_input(x)
        with _compute_precision(x):
            c = self._embed(x, t, y, drop)  # (B, cond_dim)
            context = mask = None
            if self.xray is not None:
                cond = self.xray(ap, lat, drop, geometry)
                c, context, mask = c + cond.pooled, cond.tokens, cond.mask
                if cond.features is not None:
                    x = torch.cat([x, cond.features], dim=1)  # (B, C + backproj_channels, D, H, W)
            feat_in, feat_out = self.dit(x, c, context, mask)
            return self.unet(x, c, feat_in, feat_out)


__all__ = ["BiFlowNet", "CROSS_ATTENTION_MODES", "DownStage", "InterPatchUNet", "IntraPatchDiT", "MidStage", "UpStage"]
