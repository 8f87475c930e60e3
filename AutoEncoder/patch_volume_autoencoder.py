"""The patch-volume autoencoder: patch-wise encoding, a VQ / KL / no bottleneck, volume-wise (or sliding) decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from AutoEncoder.decoder import Decoder
from AutoEncoder.encoder import Encoder
from AutoEncoder.gaussian_bottleneck import GaussianBottleneck
from AutoEncoder.patching import merge_patches, sliding_decode, split_patches
from AutoEncoder.vector_quantizer import VectorQuantizer

BOTTLENECKS = ("vq", "kl", "none")
DECODE_MODES = ("slab", "window")


class AutoencoderOutput(NamedTuple):
    """What :meth:`PatchVolumeAutoencoder.forward` returns (the same fields in every mode).

    Attributes:
        reconstruction: ``(B, C, D, H, W)``, about [-1, 1].
        latent: ``(B, latent_channels, D/f, H/f, W/f)`` latent that was decoded (quantised in VQ mode, a posterior
            sample in KL mode while training, the posterior mean in KL eval mode).
        commitment_loss: scalar (0 unless VQ).
        perplexity: scalar code perplexity of the batch (0 unless VQ).
        usage: scalar fraction of codes used in the batch (0 unless VQ).
        kl_loss: scalar KL divergence of the Gaussian posterior from N(0, I) (0 unless KL).
    """

    reconstruction: torch.Tensor
    latent: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    kl_loss: torch.Tensor


class PatchVolumeAutoencoder(nn.Module):
    """3D autoencoder that encodes fixed-size patches independently and decodes the whole latent volume.

    Encoding cuts the volume into ``patch_size`` patches, runs the encoder on ``encode_chunk_size`` patches at
    a time (bounded memory) and re-tiles their latents. Decoding sees the whole latent volume; latents larger
    than ``decode_window`` along any axis are decoded in pieces: by default (``decode_mode="slab"``) layer by
    layer in slabs of ``decode_slab`` latent planes with whole-volume GroupNorm statistics, which equals the full decode
    up to rounding; ``decode_mode="window"`` decodes windows independently (each with its own normalisation
    statistics, so faint seams remain) and blends them, which bounds memory by one window.

    Args:
        in_channels: image channels (1 for CT).
        channels: encoder feature channels per level; the downsampling factor is ``2 ** (len(channels) - 1)``.
        embedding_dim: latent channels (= code dimension).
        n_codes: codebook size for ``bottleneck="vq"``; must be 0 otherwise.
        num_res_blocks: residual blocks per encoder level.
        decoder_res_blocks: residual blocks per decoder level; None: ``num_res_blocks + 1`` (one more, as is usual).
        upsample: decoder up-sampling, ``"nearest"`` (nearest + 3x3x3 convolution) or ``"transposed"`` (4x4x4
            stride-2 transposed convolution, about a third of the arithmetic).
        upsample_channels: ``"same"`` (each decoder up-sampling keeps its level's channels) or ``"next"`` (it
            outputs the finer level's channels: no full-resolution convolution at the coarser width).
        attention_heads: bottleneck attention heads (0 disables attention).
        num_groups: GroupNorm group bound.
        downsample: optional check: the expected factor (int or three equal ints, e.g. ``[8, 8, 8]``).
        patch_size: patch edge for patch-wise encoding (voxels).
        encode_chunk_size: patches per encoder call.
        decode_window: latent edge above which decoding is split (``slab`` or ``window``); 0 never splits. In
            ``window`` mode also the window edge.
        decode_overlap: ``window`` mode: overlap fraction of neighbouring windows (cross-faded).
        decode_halo: ``window`` mode: latent voxels of context decoded and discarded around each window.
        decode_mode: ``"slab"`` (exact, memory about two full-resolution feature volumes of one decoder block) or
            ``"window"`` (approximate, memory of one window).
        decode_slab: ``slab`` mode: slab thickness in latent planes (scaled with the resolution of each decoder
            level); temporaries are about ``decode_slab / d`` of a feature volume for a latent of depth ``d``.
        codebook: extra :class:`VectorQuantizer` arguments (``beta``, ``decay``, ``eps``, ``dead_threshold``).
        bottleneck: ``"vq"`` (codebook), ``"kl"`` (diagonal Gaussian: the encoder emits mean and log-variance,
            see :class:`GaussianBottleneck`) or ``"none"`` (plain continuous latent); None picks ``"vq"`` when
            ``n_codes > 0`` else ``"none"`` (older checkpoints carry no ``bottleneck`` entry).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        embedding_dim: int = 8,
        n_codes: int = 8192,
        num_res_blocks: int = 1,
        attention_heads: int = 1,
        num_groups: int = 32,
        downsample: int | Sequence[int] | None = None,
        patch_size: int = 64,
        encode_chunk_size: int = 8,
        decode_window: int = 0,
        decode_overlap: float = 0.5,
        decode_halo: int = 4,
        decode_mode: str = "slab",
        decode_slab: int = 4,
        codebook: dict[str, Any] | None = None,
        bottleneck: str | None = None,
        decoder_res_blocks: int | None = None,
        upsample: str = "nearest",
        upsample_channels: str = "same",
    ):
        super().__init__()
        bottleneck = bottleneck if bottleneck is not None else ("vq" if n_codes > 0 else "none")
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck={bottleneck!r}; expected one of {BOTTLENECKS}")
        if bottleneck == "vq" and n_codes < 1:
            raise ValueError(f"bottleneck='vq' needs a codebook: n_codes must be >= 1, got {n_codes}")
        if bottleneck != "vq" and n_codes != 0:
            raise ValueError(f"bottleneck={bottleneck!r} uses no codebook: set n_codes to 0 (got {n_codes})")
        factor = 2 ** (len(channels) - 1)
        if downsample is not None:
            wanted = {int(downsample)} if isinstance(downsample, int) else {int(v) for v in downsample}
            if wanted != {factor}:
                raise ValueError(
                    f"downsample={downsample} does not match channels={list(channels)} (factor {factor}); "
                    f"use {len(channels)} levels for {factor}x or change channels"
                )
        if patch_size % factor:
            raise ValueError(f"patch_size={patch_size} must be a multiple of the downsampling factor {factor}")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode={decode_mode!r}; expected one of {DECODE_MODES}")
        if decode_slab < 1:
            raise ValueError(f"decode_slab must be >= 1, got {decode_slab}")
        if encode_chunk_size < 1:
            raise ValueError(f"encode_chunk_size must be >= 1, got {encode_chunk_size}")
        decoder_res_blocks = num_res_blocks + 1 if decoder_res_blocks is None else decoder_res_blocks
        if decoder_res_blocks < 1:
            raise ValueError(f"decoder_res_blocks must be >= 1, got {decoder_res_blocks}")
        self.config: dict[str, Any] = {
            "in_channels": in_channels, "channels": list(channels), "embedding_dim": embedding_dim,
            "n_codes": n_codes, "num_res_blocks": num_res_blocks, "attention_heads": attention_heads,
            "num_groups": num_groups, "downsample": factor, "patch_size": patch_size,
            "encode_chunk_size": encode_chunk_size, "decode_window": decode_window,
            "decode_overlap": decode_overlap, "decode_halo": decode_halo, "decode_mode": decode_mode,
            "decode_slab": decode_slab,
            "codebook": dict(codebook or {}), "bottleneck": bottleneck,
            "decoder_res_blocks": decoder_res_blocks, "upsample": upsample, "upsample_channels": upsample_channels,
        }
        self._factor = factor
        self.patch_size = patch_size
        self.encode_chunk_size = encode_chunk_size
        self.decode_window = decode_window
        self.decode_overlap = decode_overlap
        self.decode_halo = decode_halo
        self.decode_mode = decode_mode
        self.decode_slab = decode_slab
        moments = 2 * embedding_dim if bottleneck == "kl" else embedding_dim  # KL: mean and log-variance
        self.encoder = Encoder(in_channels, channels, moments, num_res_blocks, attention_heads, num_groups)
        self.decoder = Decoder(in_channels, channels, embedding_dim, decoder_res_blocks, attention_heads, num_groups,
                               upsample, upsample_channels)
        self.quantizer = VectorQuantizer(n_codes, embedding_dim, **(codebook or {})) if bottleneck == "vq" else None
        self.gaussian = GaussianBottleneck(embedding_dim) if bottleneck == "kl" else None
        self.encoder_frozen = False
        # NDHWC conv weights (activations follow): conv3d backward is ~10x faster on CPU (oneDNN) and the
        # layout suits cuDNN; set here so training, loading and inference all compute in one layout
        self.to(memory_format=torch.channels_last_3d)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def downsample_factor(self) -> int:
        """Spatial compression per axis (4 or 8 for the presets)."""
        return self._factor

    @property
    def latent_channels(self) -> int:
        """Channels of the latent volume."""
        return self.config["embedding_dim"]

    @property
    def bottleneck(self) -> str:
        """``"vq"``, ``"kl"`` or ``"none"``."""
        return self.config["bottleneck"]

    @property
    def is_quantized(self) -> bool:
        """True in VQ mode, False in continuous mode."""
        return self.quantizer is not None

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-wise encoding of a volume into the continuous latent (pre-quantisation in VQ mode, the posterior
        mean in KL mode, so encoding is deterministic).

        Args:
            x: ``(B, C, D, H, W)`` in [-1, 1]; each axis a multiple of ``min(patch_size, size)`` and of the
                downsampling factor.

        Returns:
            ``(B, latent_channels, D/f, H/f, W/f)``.
        """
        z = self._encode_patches(x)
        return z if self.gaussian is None else self.gaussian.split(z)[0].to(z.dtype)

    def _encode_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output of ``x``, patch by patch: ``(B, latent_channels, ...)`` or ``2 *`` that for KL."""
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
        for s in x.shape[2:]:
            if s % self._factor:
                raise ValueError(f"volume size {tuple(x.shape[2:])} must be a multiple of {self._factor}")
        patches, grid = split_patches(x, self.patch_size)
        latents = [self.encoder(chunk) for chunk in patches.split(self.encode_chunk_size)]
        return merge_patches(torch.cat(latents), grid)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Snap a latent ``(B, C, d, h, w)`` to its nearest codes (identity in continuous mode)."""
        return z if self.quantizer is None else self.quantizer(z).quantized

    # ------------------------------------------------------------------------------------------- decoding
    def _needs_sliding(self, z: torch.Tensor) -> bool:
        return self.decode_window > 0 and any(s > self.decode_window for s in z.shape[2:])

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Volume-wise decoding; in slabs or windows (``decode_mode``) when the latent exceeds ``decode_window``.

        Args:
            z: ``(B, latent_channels, d, h, w)`` raw (un-normalised) latent, as :meth:`encode` returns it.
            quantize: snap ``z`` to the codebook first (ignored in continuous mode).

        Returns:
            ``(B, C, d*f, h*f, w*f)``, about [-1, 1].
        """
        if quantize:
            z = self.quantize(z)
        if not self._needs_sliding(z):
            return self.decoder(z)
        if self.decode_mode == "slab":
            return self.decoder.forward_slabs(z, self.decode_slab)
        return sliding_decode(self.decoder, z, self.decode_window, self.decode_overlap, self.decode_halo)

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        """Encode, pass the bottleneck and decode ``(B, C, D, H, W)``; see :class:`AutoencoderOutput`."""
        z = self._encode_patches(x)
        zero = z.new_zeros((), dtype=torch.float32)
        kl = zero
        if self.gaussian is not None:
            posterior = self.gaussian(z)  # a sample while training, the mean in eval
            zq, kl = posterior.latent.to(z.dtype), posterior.kl_loss
            commit, perplexity, usage = zero, zero, zero
        elif self.quantizer is None:
            zq, commit, perplexity, usage = z, zero, zero, zero
        else:
            zq, commit, _, perplexity, usage = self.quantizer(z)
        return AutoencoderOutput(self.decode(zq, quantize=False), zq, commit, perplexity, usage, kl)

    # ---------------------------------------------------------------------------------------- stage two
    def freeze_encoder(self) -> None:
        """Freeze encoder and codebook (stage 2): no gradients, eval mode kept through ``train()``, no EMA."""
        self.encoder_frozen = True
        for module in (self.encoder, self.quantizer):
            if module is None:
                continue
            module.requires_grad_(False)
            module.eval()
        if self.quantizer is not None:
            self.quantizer.frozen = True

    def train(self, mode: bool = True) -> PatchVolumeAutoencoder:
        """Like ``nn.Module.train`` but frozen parts stay in eval mode."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
            if self.quantizer is not None:
                self.quantizer.eval()
        return self
