"""DiT transformer block with adaLN-Zero conditioning and optional cross-attention to X-ray tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from ddpm.fast_conv import _swap_class


# Under CPU bf16 autocast, attention with heads narrower than this runs in fp32. PyTorch's CPU bf16 attention
# kernel is slow there (2 threads, Xeon with AMX, forward + backward of timm's Attention): 64 tokens x 8 sub-volumes,
# width 72 in 8 heads of 9: 8.7 ms in bf16, 2.0 ms in fp32; width 144 (heads of 18): 8.1 / 3.4 ms; 512 tokens of
# width 256 in heads of 32: 8.6 ms in bf16, 9.8 ms in fp32.
CPU_BF16_MIN_HEAD_DIM = 32
# PyTorch's CPU attention kernel vectorises over the head channels: heads narrower than this run padded with zeros
# to it (same result; measured for the base preset's cross-attention, 8 heads of 9 over 512 x 512 tokens, fp32,
# forward + backward, 2 threads, 2-core AMD EPYC: 10.8 ms unpadded, 4.8 ms padded to 16, 7.4 ms padded to 32)
CPU_MIN_HEAD_DIM = 16


# Under CPU bf16, attention whose score matrix (batch x heads x queries x keys) has at most this many elements runs
# as explicit products: bf16 scores, a softmax that sums in fp32, bf16 weights times values (what autocast does
# with the textbook formula). PyTorch's CPU bf16 flash kernel is several times slower at BiFlowNet's sizes (forward +
# backward, 2 threads, AMD EPYC with AVX512-BF16): 8 heads of 9 over 512 x 512 tokens 2.3 ms explicit, 5.4 ms flash
# (4.9 ms flash in fp32); 8 heads of 32 over 512 x 512 3.1 / 7.5 ms; 64 x 8 heads of 9 over 64 x 64 0.52 / 4.5 ms
# (1.25 ms flash in fp32); base training step under bf16 autocast 0.92x at 16^3 and 0.89x at 32^3, where 2^24 covers
# the cross-attention (4096 x 512 tokens, 8 heads) and the sub-volume self-attention (512 x 8 heads of 64 x 64).
# Each call keeps its bf16 scores and weights for the backward pass (64 MB at 2^24); larger score matrices keep the
# flash kernel, whose memory does not grow with them.
CPU_BF16_MAX_EXPLICIT_SCORES = 2**24


def attention_in_fp32(x: torch.Tensor, head_dim: int, keys: int | None = None) -> bool:
    """Whether attention over ``x`` (B, L, C) with heads of ``head_dim`` channels and ``keys`` key tokens (default:
    self-attention, L) runs in fp32: CPU bf16 autocast only, for narrow heads whose score matrix is too large for
    the explicit bf16 path (``CPU_BF16_MAX_EXPLICIT_SCORES``)."""
    keys = x.shape[1] if keys is None else keys
    return (x.device.type == "cpu" and head_dim < CPU_BF16_MIN_HEAD_DIM and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and x.shape[0] * (x.shape[-1] // head_dim) * x.shape[1] * keys > CPU_BF16_MAX_EXPLICIT_SCORES)


def _attend(layer: nn.Module, head_dim: int, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
    """``layer(*tensors, **kwargs)`` (an attention sub-layer over ``tensors[0]``, keys from ``tensors[-1]``), in fp32
    where :func:`attention_in_fp32` says so."""
    if attention_in_fp32(tensors[0], head_dim, tensors[-1].shape[1]):
        with torch.autocast("cpu", enabled=False):
            return layer(*(t.float() for t in tensors), **kwargs)
    return layer(*tensors, **kwargs)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """Softmax attention over ``(B, heads, L, head_dim)`` as explicit products in the inputs' dtype (the softmax
    sums in fp32); the scale and the mask enter the score product itself (``baddbmm``). A boolean mask keeps the True
    positions, and a query with none left gets zeros, as ``F.scaled_dot_product_attention`` gives it."""
    b, h, n, d = q.shape
    q3, k3, v3 = q.reshape(b * h, n, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, v.shape[-1])
    keep = None
    if attn_mask is None:
        bias, beta = q3.new_empty(()), 0.0
    else:
        if attn_mask.dtype == torch.bool:  # a finite fill: a fully masked row softmaxes to finite values
            keep, attn_mask = attn_mask, torch.zeros((), dtype=q.dtype).masked_fill(~attn_mask, torch.finfo(q.dtype).min)
        bias, beta = attn_mask.to(q.dtype), 1.0
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # broadcastable to (B, heads, L, keys)
        shared = bias.shape[0] == bias.shape[1] == 1  # one mask for every batch element and head: not copied
        bias = bias.expand(1 if shared else b, 1 if shared else h, n, k3.shape[1]).reshape(-1, n, k3.shape[1])
    scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=beta, alpha=scale)
    out = (torch.softmax(scores, dim=-1) @ v3).view(b, h, n, -1)  # PyTorch's CPU softmax sums bf16 in fp32
    if keep is not None and not bool(keep.any(-1).all()):
        out = out * keep.any(-1, keepdim=True).to(out.dtype)  # rows with nothing to attend to: zeros
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over ``(B, heads, L, head_dim)``. On the CPU, bf16 attention with at most
    ``CPU_BF16_MAX_EXPLICIT_SCORES`` scores runs as explicit products (softmax in fp32), and heads narrower than
    ``CPU_MIN_HEAD_DIM`` are zero-padded to it (extra query/key channels add nothing to the scores and extra value
    channels are cut off again): both faster than PyTorch's CPU kernel there."""
    head_dim = q.shape[-1]
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[:-1].numel() * k.shape[-2] <= CPU_BF16_MAX_EXPLICIT_SCORES):
        return _explicit_attention(q, k, v, attn_mask, head_dim ** -0.5)
    if q.device.type != "cpu" or head_dim >= CPU_MIN_HEAD_DIM:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    pad = (0, CPU_MIN_HEAD_DIM - head_dim)
    out = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), attn_mask=attn_mask,
                                         scale=head_dim ** -0.5)
    return out[..., :head_dim]


class FastAttention(Attention):
    """timm's ``Attention`` (the DiT blocks' and the X-ray encoder's) whose core runs through :func:`attention`,
    same parameters and state-dict keys; timm's own forward where that core does not apply (causal, gated or
    dropout-in-training attention, or timm's fused attention switched off)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if (is_causal or getattr(self, "gate", None) is not None or not self.fused_attn
                or (self.training and self.attn_drop.p > 0)):
            return super().forward(x, attn_mask, is_causal) if is_causal else super().forward(x, attn_mask)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, getattr(self, "attn_dim", self.num_heads * self.head_dim))
        return self.proj_drop(self.proj(getattr(self, "norm", nn.Identity())(out)))


def use_fast_attention(module: nn.Module) -> nn.Module:
    """Turn every plain timm ``Attention`` inside ``module`` into a :class:`FastAttention` (same state)."""
    return _swap_class(module, Attention, FastAttention)


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
