"""Perceptual losses: 3D MedicalNet features, or a tri-plane (2.5D) loss with a 2D network from local weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.losses import PerceptualLoss as MonaiPerceptualLoss
from torch import nn

from AutoEncoder.medicalnet import load_medicalnet

TRIPLANE_HOW_TO = (
    "the tri-plane perceptual loss needs torchvision ResNet-50 ImageNet weights as a local file: download "
    "resnet50-11ad3fa6.pth (torchvision ResNet50_Weights.DEFAULT) on a machine with internet access and pass "
    "loss.perceptual.triplane_weights_path=/path/to/it or copy it to $TORCH_HOME/hub/checkpoints/; or use "
    "loss.perceptual.mode=3d"
)


def _unit(f: torch.Tensor) -> torch.Tensor:
    """Normalise features to unit length along channels (per voxel)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


class PerceptualLoss(nn.Module):
    """Distance between deep features of reconstruction and target, averaged over the batch.

    ``mode="3d"``: MedicalNet ResNet-10 features of four stages, unit-normalised per voxel, squared
    difference summed over channels, averaged over space, summed over the chosen stages.
    ``mode="triplane"``: MONAI's 2.5D loss (slices along the three axes through a torchvision ResNet-50 loaded
    from a local file) - for when a 3D network is too costly.

    Args:
        weights_path: MedicalNet weights (``None``: look in ``$TORCH_HOME``); mode ``3d`` only.
        mode: ``"3d"`` or ``"triplane"``.
        layers: indices of the MedicalNet stages used (0-3).
        triplane_weights_path: ResNet-50 weights for ``mode="triplane"`` (``None``: ``$TORCH_HOME``).
        triplane_ratio: fraction of slices per axis used in ``mode="triplane"``.
        network: an already-built feature network (tests, evaluation); overrides ``weights_path``.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        mode: str = "3d",
        layers: Sequence[int] = (0, 1, 2, 3),
        triplane_weights_path: str | os.PathLike | None = None,
        triplane_ratio: float = 0.5,
        network: nn.Module | None = None,
    ):
        super().__init__()
        if mode not in ("3d", "triplane"):
            raise ValueError(f"perceptual mode must be '3d' or 'triplane', got {mode!r}")
        self.mode = mode
        self.layers = tuple(layers)
        if mode == "3d":
            self.network = network if network is not None else load_medicalnet(weights_path)
        else:
            path = self._find_triplane_weights(triplane_weights_path)
            self.network = MonaiPerceptualLoss(
                spatial_dims=3, network_type="resnet50", is_fake_3d=True, fake_3d_ratio=triplane_ratio,
                pretrained=True, pretrained_path=str(path),
            )
            self.network.requires_grad_(False)
            self.network.eval()

    @staticmethod
    def _find_triplane_weights(path: str | os.PathLike | None) -> Path:
        if path is not None:
            p = Path(path).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"ResNet-50 weights not found at {p}: {TRIPLANE_HOW_TO}")
            return p
        ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
        found = sorted(ckpt_dir.glob("resnet50-*.pth")) if ckpt_dir.is_dir() else []
        if not found:
            raise FileNotFoundError(f"no resnet50-*.pth in {ckpt_dir}: {TRIPLANE_HOW_TO}")
        return found[0]

    def train(self, mode: bool = True) -> PerceptualLoss:
        """The feature network stays in eval mode."""
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar loss between ``x`` and ``y``, both ``(B, 1, D, H, W)`` in [-1, 1]."""
        if x.shape != y.shape:
            raise ValueError(f"perceptual loss needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.mode == "triplane":
            return self.network(x.float(), y.float())
        fx, fy = self.network(x), self.network(y)
        loss = x.new_zeros(())
        for i in self.layers:
            loss = loss + (_unit(fx[i]) - _unit(fy[i])).pow(2).sum(dim=1).mean()
        return loss
