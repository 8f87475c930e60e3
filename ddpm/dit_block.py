"""DiT transformer block with adaLN-Zero conditioning and optional cross-attention to X-ray tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn


# Under CPU bf16 autocast, attention with heads narrower than this runs in fp32. PyTorch's CPU bf16 attention
# kernel is slow there (2 threads, Xeon with AMX, forward + backward of timm's Attention): 64 tokens x 8 sub-volumes,
# width 72 in 8 heads of 9: 8.7 ms in bf16, 2.0 ms in fp32; width 144 (heads of 18): 8.1 / 3.4 ms; 512 tokens of
# width 256 in heads of 32: 8.6 ms in bf16, 9.8 ms in fp32.
CPU_BF16_MIN_HEAD_DIM = 32
# PyTorch's CPU attention kernel vectorises over the head channels: heads narrower than this run padded with zeros
# to it (same result; measured for the base preset's cross-attention, 8 heads of 9 over 512 x 512 tokens, fp32,
# forward + backward, 2 threads, 2-core AMD EPYC: 10.8 ms unpadded, 4.8 ms padded to 16, 7.4 ms padded to 32)
CPU_MIN_HEAD_DIM = 16


def attention_in_fp32(x: torch.Tensor, head_dim: int) -> bool:
    """Whether attention over ``x`` with heads of ``head_dim`` channels runs in fp32 (CPU bf16 autocast only)."""
    return (x.device.type == "cpu" and head_dim < CPU_BF16_MIN_HEAD_DIM and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _attend(layer: nn.Module, head_dim: int, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
    """``layer(*tensors, **kwargs)`` (an attention sub-layer), in fp32 where :func:`attention_in_fp32` says so."""
    if attention_in_fp32(tensors[0], head_dim):
        with torch.autocast("cpu", enabled=False):
            return layer(*(t.float() for t in tensors), **kwargs)
    return layer(*tensors, **kwargs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over ``(B, heads, L, head_dim)``; on the CPU, heads narrower than
    ``CPU_MIN_HEAD_DIM`` are zero-padded to it (extra query/key channels add nothing to the scores and extra value
    channels are cut off again), which the CPU kernel runs faster."""
    head_dim = q.shape[-1]
    if q.device.type != "cpu" or head_dim >= CPU_MIN_HEAD_DIM:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    pad = (0, CPU_MIN_HEAD_DIM - head_dim)
    out = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), attn_mask=attn_mask,
                                         scale=head_dim ** -0.5)
    return out[..., :head_dim]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, C), shift/scale (N, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class CrossAttention(nn.Module):
    """Multi-head cross-attention (SDPA) from latent tokens to context tokens.

    The output projection starts at zero so a freshly built block ignores the context until trained.

    Args:
        dim: query width.
        context_dim: key/value (context token) width.
        num_heads: attention heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from every query to the context of its own batch element.

        Args:
            x: (B, L, dim) queries (all tokens of all sub-volumes of one volume in a row).
            context: (B, M, context_dim) X-ray tokens.
            mask: optional bool, True where a query may attend to a context token: (L, M) shared by the
                batch or (B, L, M) per batch element.

        Returns:
            (B, L, dim) residual update.
        """
        q = rearrange(self.q(self.norm(x)), "b l (h c) -> b h l c", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h c) -> two b h m c", two=2, h=self.num_heads)
        attn_mask = None
        if mask is not None:  # broadcast over heads (and over the batch when shared)
            attn_mask = mask[:, None] if mask.ndim == 3 else mask[None, None]
        out = attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h l c -> b l (h c)"))


class DiTBlock(nn.Module):
    """Transformer block over the tokens of each latent sub-volume (DiT adaLN-Zero).

    Self-attention and MLP are modulated (shift, scale, gate) by the conditioning vector; the gates
    come from a zero-initialised linear layer, so a new block is the identity map. With
    ``context_dim`` set, a cross-attention sub-layer reads X-ray tokens. With ``skip`` set, a long
    skip from the matching input block is fused first (U-ViT style).

    Args:
        dim: token width.
        num_heads: attention heads.
        cond_dim: conditioning vector width.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        context_dim: X-ray token width, or None for no cross-attention.
        skip: whether ``forward`` takes a long-skip tensor.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cond_dim: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        skip: bool = False,
    ) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)  # timm: SDPA when available
        self.cross = CrossAttention(dim, context_dim, num_heads) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def zero_init(self) -> None:
        """adaLN-Zero: all gates, shifts and scales start at zero; cross-attention output too."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        if self.cross is not None:
            nn.init.zeros_(self.cross.proj.weight)
            nn.init.zeros_(self.cross.proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Update tokens.

        Args:
            x: (B*n, T, dim) tokens, sub-volume-major within each batch element.
            c: (B*n, cond_dim) conditioning per sub-volume.
            context: (B, M, context_dim) X-ray tokens (required when built with ``context_dim``).
            mask: (n*T, M) or (B, n*T, M) bool footprint mask, or None.
            skip: (B*n, T, dim) long skip (required when built with ``skip=True``).

        Returns:
            (B*n, T, dim).
        """
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this DiTBlock was built with skip=True and needs a skip tensor")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = _attend(self.attn, self.attn.head_dim, modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_msa[:, None] * h
        if self.cross is not None:
            if context is None:
                raise ValueError("this DiTBlock cross-attends and needs context tokens")
            b = context.shape[0]
            xs = rearrange(x, "(b n) t c -> b (n t) c", b=b)  # one query row per token of the volume
            h = _attend(self.cross, xs.shape[-1] // self.cross.num_heads, xs, context, mask=mask)
            x = x + rearrange(h, "b (n t) c -> (b n) t c", t=x.shape[1])
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated projection of tokens to voxel features (zero-initialised).

    Args:
        dim: token width.
        cond_dim: conditioning width.
        patch: voxels per token along each axis.
        out_channels: channels per voxel.
    """

    def __init__(self, dim: int, cond_dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch**3 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def zero_init(self) -> None:
        """Start with zero output so the U-Net initially ignores the intra-patch flow."""
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(N, T, dim), (N, cond_dim) -> (N, T, patch**3 * out_channels)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


__all__ = ["CPU_BF16_MIN_HEAD_DIM", "CPU_MIN_HEAD_DIM", "CrossAttention", "DiTBlock", "FinalLayer", "attention",
           "attention_in_fp32", "modulate"]
