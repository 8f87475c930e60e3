"""BiFlowNet: latent denoiser with an intra-patch flow (DiT) and an inter-patch flow (3D U-Net).

Intra-patch flow: the (noisy) latent is cut into cubic sub-volumes; each sub-volume becomes a short
token sequence (3D patch embedding + fixed 3D sin-cos positions) processed by DiT blocks with
adaLN-Zero, optionally cross-attending to X-ray tokens. Input blocks, middle blocks and skip-fused
output blocks each emit a voxel feature map through a zero-initialised final layer.

Inter-patch flow: a 3D U-Net over the whole latent volume. Its leading full-resolution levels receive
the intra-patch features of the input blocks (encoder) and output blocks (decoder) by addition, which
is how local detail (DiT) and global context (U-Net) are fused.

X-ray conditioning (optional, see ``cross_attention`` and ``back_projection``): a pooled X-ray vector
joins the adaLN/U-Net conditioning; DiT blocks cross-attend to all X-ray tokens (``"full"``) or only to
the tokens over the sub-volume's projected footprint (``"footprint"``); and/or X-ray feature maps are
back-projected along the rays into the latent grid and concatenated with the noisy latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm.dit_block import DiTBlock, FinalLayer
from ddpm.embeddings import LabelEmbedder, ResolutionEmbedder, TimestepEmbedder, sincos_pos_embed_3d
from ddpm.projection import back_project, footprint_mask, parallel_projection_grids
from ddpm.xray_encoder import XrayEncoder

CROSS_ATTENTION_MODES = ("none", "full", "footprint")


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
        mults = [int(m) for m in channel_mults]
        if not mults or mults[0] != 1:
            raise ValueError(f"channel_mults must start with 1 (a full-resolution fusion level), got {mults}")
        if sub_volume % token_patch:
            raise ValueError(f"sub_volume={sub_volume} is not divisible by token_patch={token_patch}")
        if cross_attention not in CROSS_ATTENTION_MODES:
            raise ValueError(f"cross_attention={cross_attention!r}, expected one of {CROSS_ATTENTION_MODES}")
        if xray is None and (cross_attention != "none" or back_projection):
            raise ValueError("cross_attention/back_projection need an `xray` encoder configuration")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.sub_volume = sub_volume
        self.token_patch = token_patch
        self.num_classes = num_classes
        self.cross_attention = cross_attention
        self.back_projection = back_projection
        self.grad_checkpointing = grad_checkpointing
        self.n_fusion = next((i for i, m in enumerate(mults) if m != 1), len(mults))
        self.n_levels = len(mults)
        self.down_factor = 2 ** (self.n_levels - self.n_fusion)
        for s in self.latent_shape:
            if s % sub_volume or s % self.down_factor:
                raise ValueError(
                    f"latent_shape {self.latent_shape} must be divisible by sub_volume={sub_volume} "
                    f"and by the U-Net downsampling factor {self.down_factor}"
                )
        dim = model_channels
        cond_dim = 4 * dim
        self.model_channels = dim

        # conditioning
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim) if num_classes > 0 else None
        self.res_embedder = ResolutionEmbedder(cond_dim) if use_resolution else None
        self.xray_encoder = XrayEncoder(**xray) if xray is not None else None
        context_dim = None
        if self.xray_encoder is not None:
            xd = self.xray_encoder.dim
            self.pooled_proj = nn.Sequential(nn.Linear(xd, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
            grid_ap, grid_lat = parallel_projection_grids(self.latent_shape)
            self.register_buffer("grid_ap", grid_ap)  # (D, H, W, 2) detector coordinates, saved with the weights
            self.register_buffer("grid_lat", grid_lat)
            context_dim = xd if cross_attention != "none" else None
        self.bp_proj = nn.Conv3d(2 * self.xray_encoder.dim, backproj_channels, 1) if back_projection else None
        net_in = in_channels + (backproj_channels if back_projection else 0)

        # intra-patch flow
        self.tokens_per_side = sub_volume // token_patch
        self.x_embedder = nn.Conv3d(net_in, dim, kernel_size=token_patch, stride=token_patch)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(dim, (self.tokens_per_side,) * 3)[None], persistent=False)
        make = lambda skip: DiTBlock(dim, dit_heads, cond_dim, mlp_ratio, context_dim, skip)  # noqa: E731
        self.dit_in = nn.ModuleList([make(False) for _ in range(self.n_fusion)])
        self.final_in = nn.ModuleList([FinalLayer(dim, cond_dim, token_patch, dim) for _ in range(self.n_fusion)])
        self.dit_mid = nn.ModuleList([make(False) for _ in range(num_mid_dit)])
        self.dit_out = nn.ModuleList([make(True) for _ in range(self.n_fusion)])
        self.final_out = nn.ModuleList([FinalLayer(dim, cond_dim, token_patch, dim) for _ in range(self.n_fusion)])

        # inter-patch flow (3D U-Net)
        dims = [dim] + [dim * m for m in mults]
        res = lambda i, o: DiffusionUNetResnetBlock(3, i, cond_dim, o, norm_num_groups=norm_groups)  # noqa: E731
        attn = lambda ch, on: (  # noqa: E731
            SpatialAttentionBlock(3, ch, num_head_channels=max(ch // 4, 1), norm_num_groups=norm_groups)
            if on
            else nn.Identity()
        )
        self.init_conv = nn.Conv3d(net_in, dim, 3, padding=1)
        self.downs = nn.ModuleList()
        for i in range(self.n_levels):
            a = i in attn_levels
            down = self.n_fusion - 1 <= i < self.n_levels - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        res(dims[i], dims[i + 1]),
                        attn(dims[i + 1], a),
                        res(dims[i + 1], dims[i + 1]),
                        attn(dims[i + 1], a),
                        _Downsample(dims[i + 1]) if down else nn.Identity(),
                    ]
                )
            )
        self.mid = nn.ModuleList([res(dims[-1], dims[-1]), attn(dims[-1], True), res(dims[-1], dims[-1])])
        self.ups = nn.ModuleList()
        for i in reversed(range(self.n_levels)):
            a = i in attn_levels
            self.ups.append(
                nn.ModuleList(
                    [
                        res(2 * dims[i + 1], dims[i + 1]),
                        attn(dims[i + 1], a),
                        res(2 * dims[i + 1], dims[i]),
                        attn(dims[i], a),
                        _Upsample(dims[i]) if i >= self.n_fusion else nn.Identity(),
                    ]
                )
            )
        self.final = nn.ModuleList(
            [res(2 * dim, dim), nn.GroupNorm(norm_groups, dim), nn.SiLU(), nn.Conv3d(dim, self.out_channels, 3, padding=1)]
        )
        self.initialize_weights()
        # NDHWC conv weights (activations follow): conv3d backward is ~10x faster on CPU (oneDNN) and the
        # layout suits cuDNN; set here so training, loading and inference all compute in one layout
        for p in self.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Xavier linears and patch embedding, zero adaLN/final layers, zero output convolution."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.xray_encoder is not None:
            self.xray_encoder.reset_parameters()
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for emb in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(emb.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for block in [*self.dit_in, *self.dit_mid, *self.dit_out]:
            block.zero_init()
        for layer in [*self.final_in, *self.final_out]:
            layer.zero_init()
        nn.init.zeros_(self.final[-1].weight)
        nn.init.zeros_(self.final[-1].bias)

    # ------------------------------------------------------------- geometry
    def set_projection_grids(self, grid_ap: torch.Tensor, grid_lat: torch.Tensor) -> None:
        """Replace the (D, H, W, 2) projection grids, e.g. with the dataset's cone-beam geometry."""
        if self.xray_encoder is None:
            raise ValueError("this BiFlowNet has no X-ray conditioning; projection grids are not used")
        expected = (*self.latent_shape, 2)
        for name, g in (("AP", grid_ap), ("LAT", grid_lat)):
            if tuple(g.shape) != expected:
                raise ValueError(f"{name} projection grid has shape {tuple(g.shape)}, expected {expected}")
        self.grid_ap.copy_(grid_ap)
        self.grid_lat.copy_(grid_lat)

    def footprint(self) -> torch.Tensor:
        """(n_sub * T, M) bool mask of the X-ray tokens each DiT token may attend to."""
        return footprint_mask(
            self.grid_ap, self.grid_lat, self.sub_volume, self.xray_encoder.grid_hw, self.tokens_per_side**3
        )

    # --------------------------------------------------------------- forward
    def _run(self, fn: Callable, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"latent has shape {tuple(x.shape)}, expected (B, {self.in_channels}, D, H, W)")
        if self.xray_encoder is not None and tuple(x.shape[2:]) != self.latent_shape:
            raise ValueError(
                f"latent grid {tuple(x.shape[2:])} does not match the configured latent_shape {self.latent_shape}"
            )
        for s in x.shape[2:]:
            if s % self.sub_volume or s % self.down_factor:
                raise ValueError(
                    f"latent grid {tuple(x.shape[2:])} must be divisible by sub_volume={self.sub_volume} "
                    f"and the U-Net factor {self.down_factor}"
                )

    def _to_volume(self, tokens: torch.Tensor, nsub: tuple[int, int, int]) -> torch.Tensor:
        """(B*n, T, p^3*C) tokens -> (B, C, D, H, W) voxel features."""
        t, p = self.tokens_per_side, self.token_patch
        return rearrange(
            tokens,
            "(b nd nh nw) (td th tw) (pd ph pw c) -> b c (nd td pd) (nh th ph) (nw tw pw)",
            nd=nsub[0], nh=nsub[1], nw=nsub[2], td=t, th=t, tw=t, pd=p, ph=p, pw=p,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        ap: torch.Tensor | None = None,
        lat: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target for a noisy latent.

        Args:
            x: (B, C, D, H, W) noisy (normalised) latent.
            t: (B,) timesteps.
            y: (B,) long class labels (required iff ``num_classes > 0``).
            ap, lat: (B, 1, H, W) X-rays in [0, 1] (required iff X-ray conditioned).
            drop: (B,) bool, True drops every condition of that sample (null class, null X-ray tokens).

        Returns:
            (B, out_channels, D, H, W).
        """
        self._check_input(x)
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        c = self.t_embedder(t)  # (B, cond_dim)
        if self.res_embedder is not None:
            c = c + self.res_embedder(tuple(x.shape[2:]), b, x.device)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this BiFlowNet is class-conditional; pass class labels y")
            c = c + self.y_embedder(y, drop)
        context, mask = None, None
        if self.xray_encoder is not None:
            if ap is None or lat is None:
                raise ValueError("this BiFlowNet is X-ray conditioned; pass ap and lat")
            tokens, pooled = self.xray_encoder(ap, lat, drop)  # (B, M, Cx), (B, Cx)
            c = c + self.pooled_proj(pooled)
            if self.cross_attention != "none":
                context = tokens
            if self.cross_attention == "footprint":
                with torch.no_grad():
                    mask = self.footprint()
            if self.bp_proj is not None:
                ap_map, lat_map = self.xray_encoder.token_maps(tokens)
                feats = torch.cat([back_project(ap_map, self.grid_ap), back_project(lat_map, self.grid_lat)], dim=1)
                x = torch.cat([x, self.bp_proj(feats)], dim=1)  # (B, C + bp, D, H, W)

        # intra-patch flow over sub-volumes
        s = self.sub_volume
        nsub = (x.shape[2] // s, x.shape[3] // s, x.shape[4] // s)
        n = nsub[0] * nsub[1] * nsub[2]
        patches = rearrange(x, "b c (nd sd) (nh sh) (nw sw) -> (b nd nh nw) c sd sh sw", sd=s, sh=s, sw=s)
        tok = rearrange(self.x_embedder(patches), "n c d h w -> n (d h w) c") + self.pos_embed  # (B*n, T, dim)
        c_dit = repeat(c, "b k -> (b n) k", n=n)
        skips, feat_in, feat_out = [], [], []
        for block, final in zip(self.dit_in, self.final_in):
            tok = self._run(block, tok, c_dit, context, mask)
            skips.append(tok)
            feat_in.append(self._to_volume(final(tok, c_dit), nsub))
        for block in self.dit_mid:
            tok = self._run(block, tok, c_dit, context, mask)
        for block, final in zip(self.dit_out, self.final_out):
            tok = self._run(block, tok, c_dit, context, mask, skips.pop())
            feat_out.append(self._to_volume(final(tok, c_dit), nsub))

        # inter-patch flow (U-Net) with fusion at the full-resolution levels
        h = self.init_conv(x)
        r = h
        hs = []
        for i, (res1, attn1, res2, attn2, down) in enumerate(self.downs):
            if i < self.n_fusion:
                h = h + feat_in[i]
            h = attn1(self._run(res1, h, c))
            hs.append(h)
            h = attn2(self._run(res2, h, c))
            hs.append(h)
            h = down(h)
        h = self._run(self.mid[0], h, c)
        h = self.mid[1](h)
        h = self._run(self.mid[2], h, c)
        for j, (res1, attn1, res2, attn2, up) in enumerate(self.ups):
            i = self.n_levels - 1 - j
            if i < self.n_fusion:
                h = h + feat_out[self.n_fusion - 1 - i]
            h = attn1(self._run(res1, torch.cat([h, hs.pop()], dim=1), c))
            h = attn2(self._run(res2, torch.cat([h, hs.pop()], dim=1), c))
            h = up(h)
        h = self._run(self.final[0], torch.cat([h, r], dim=1), c)
        return self.final[3](self.final[2](self.final[1](h)))


__all__ = ["BiFlowNet", "CROSS_ATTENTION_MODES"]
