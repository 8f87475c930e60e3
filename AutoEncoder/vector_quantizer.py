"""EMA vector quantiser with dead-code restart, synchronised across DDP ranks."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: ``(B, C, d, h, w)`` codebook vectors with a straight-through gradient to the input.
        commitment_loss: scalar, ``beta * ||z - sg(e)||^2``.
        indices: ``(B, d, h, w)`` int64 code indices.
        perplexity: scalar, ``exp(entropy)`` of the code histogram of this batch (all ranks when training).
        usage: scalar in [0, 1], fraction of codes used at least once in this batch (all ranks when training).
    """

    quantized: torch.Tensor
    commitment_loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_from_zero(t: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        dist.broadcast(t, src=0)
    return t


class VectorQuantizer(nn.Module):
    """Codebook learned by exponential moving averages (no codebook gradients).

    Every piece of state (codebook, EMA counts and sums, the ``initialised`` flag) is a registered buffer, so it
    survives checkpoints and resumes. On the first training batch the codebook is initialised from encoder
    outputs (rank 0's sample, broadcast). EMA statistics are all-reduced over DDP ranks and dead codes are
    replaced by rank 0's samples (broadcast), so codebooks stay identical on every rank. Distances and updates
    run in fp32 even under autocast. In ``eval()`` mode, or when ``frozen``, no buffer changes.

    Args:
        num_codes: codebook size (``n_codes``).
        dim: code dimension (``embedding_dim``), equal to the latent channels.
        beta: commitment loss weight.
        decay: EMA decay.
        eps: Laplace smoothing of the cluster sizes.
        dead_threshold: codes whose EMA cluster size falls below this are restarted; 0 disables restarts.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 1.0,
    ):
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise ValueError(f"need num_codes >= 2 and dim >= 1, got num_codes={num_codes}, dim={dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.decay = decay
        self.eps = eps
        self.dead_threshold = dead_threshold
        self.frozen = False
        self.register_buffer("embedding", torch.randn(num_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def _sample_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` rows drawn from ``flat`` (N, C), identical on all ranks (rank 0's draw is broadcast)."""
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx].clone()
        return _broadcast_from_zero(rows.contiguous())

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        rows = self._sample_rows(flat, self.num_codes)
        self.embedding.copy_(rows)
        self.embed_sum.copy_(rows)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, onehot: torch.Tensor) -> None:
        counts = _all_reduce_sum(onehot.sum(0))  # (K,)
        sums = _all_reduce_sum(onehot.t() @ flat)  # (K, C)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_threshold > 0:
            dead = self.cluster_size < self.dead_threshold  # identical on all ranks (all-reduced counts)
            if bool(dead.any()):
                rows = self._sample_rows(flat, self.num_codes)
                self.embedding[dead] = rows[dead]
                self.embed_sum[dead] = rows[dead] * self.dead_threshold
                self.cluster_size[dead] = self.dead_threshold

    def codes_to_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, d, h, w)`` -> vectors ``(B, C, d, h, w)``."""
        return rearrange(self.embedding[indices], "b d h w c -> b c d h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise a latent ``(B, C, d, h, w)``; see :class:`QuantizerOutput`."""
        if z.shape[1] != self.dim:
            raise ValueError(f"latent has {z.shape[1]} channels, the codebook expects {self.dim}")
        b, _, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            flat = rearrange(z32, "b c d h w -> (b d h w) c")
            update = self.training and not self.frozen
            if update and not bool(self.initialised):
                self._initialise(flat.detach())
            emb = self.embedding
            dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.t() + emb.pow(2).sum(1)[None, :]
            idx = dist2.argmin(1)
            onehot = F.one_hot(idx, self.num_codes).to(flat.dtype)
            q = emb[idx].clone()  # codes as they were when chosen (before this batch's EMA update)
            if update:
                self._ema_update(flat.detach(), onehot)
            commitment = self.beta * F.mse_loss(flat, q.detach())
            q = flat + (q - flat).detach()  # straight-through estimator
            counts = onehot.sum(0).detach()
            if self.training:  # ranks step in lockstep only while training; inference may be uneven
                counts = _all_reduce_sum(counts)
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        quantized = rearrange(q, "(b d h w) c -> b c d h w", b=b, d=d, h=h, w=w).to(z.dtype)
        indices = rearrange(idx, "(b d h w) -> b d h w", b=b, d=d, h=h, w=w)
        return QuantizerOutput(quantized, commitment, indices, perplexity, usage)
