"""MedicalNet ResNet-10 (Chen et al., Med3D) as a frozen multi-scale 3D feature extractor, from local weights.

The network is MONAI's ``resnet10`` set up like MedicalNet (7^3 stride-2 stem, type-B shortcuts) with layers 3
and 4 switched to stride 1 with dilation 2 and 4, as in MedicalNet, so the published weights apply unchanged.
Weights never come from the network: pass a file, or pre-fill ``$TORCH_HOME`` (see :data:`WEIGHT_FILE_NAMES`).
Used by the perceptual loss and by evaluation's feature metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.networks.nets import resnet10
from torch import nn

#: File names searched for in ``$TORCH_HOME/hub/checkpoints`` and ``$TORCH_HOME/medicalnet`` when no path is given.
WEIGHT_FILE_NAMES = ("resnet_10_23dataset.pth", "resnet_10_23dataset.pt", "medicalnet_resnet10_23datasets.pt")

HOW_TO_PROVIDE = (
    "download MedicalNet's resnet_10_23dataset.pth (github.com/Tencent/MedicalNet, or the MONAI "
    "'medicalnet_resnet10_23datasets' hub model) on a machine with internet access and pass its path "
    "(train_PatchVolume: loss.perceptual.weights_path=/path/resnet_10_23dataset.pth; evaluate: "
    "--medicalnet-weights PATH) or copy it to $TORCH_HOME/hub/checkpoints/resnet_10_23dataset.pth; "
    "or train without the perceptual loss: loss.perceptual_weight=0"
)


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a MONAI ResNet stage into MedicalNet's stride-1 dilated form (weights are unaffected)."""
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1, 1)
            conv.dilation = (dilation,) * 3
            conv.padding = (dilation,) * 3
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1, 1)


def medicalnet_resnet10() -> nn.Module:
    """An untrained MedicalNet-shaped ResNet-10 backbone (no classification head)."""
    net = resnet10(
        spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2,
        shortcut_type="B", bias_downsample=False, feed_forward=False,
    )
    _dilate(net.layer3, 2)
    _dilate(net.layer4, 4)
    return net


def find_medicalnet_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Resolve the weight file: the given path, else a known file name under ``$TORCH_HOME``.

    Raises:
        FileNotFoundError: naming the places searched and how to provide the weights.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MedicalNet weights not found at {path}: {HOW_TO_PROVIDE}")
        return path
    hub = Path(torch.hub.get_dir())
    candidates = [d / n for d in (hub / "checkpoints", hub.parent / "medicalnet") for n in WEIGHT_FILE_NAMES]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MedicalNet weights not found (no path given; searched {', '.join(map(str, candidates))}): {HOW_TO_PROVIDE}"
    )


class MedicalNetFeatures(nn.Module):
    """Frozen MedicalNet ResNet-10 returning the outputs of its four residual stages.

    Input volumes are z-scored per sample (MedicalNet was trained on z-scored intensities), so the [-1, 1]
    scaling of our CT does not matter.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MedicalNetFeatures:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 1, D, H, W)`` -> ``[(B, 64, D/4, ...), (B, 128, D/8, ...), (B, 256, D/8, ...), (B, 512, D/8, ...)]``."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"MedicalNet expects (B, 1, D, H, W), got shape {tuple(x.shape)}")
        dims = (1, 2, 3, 4)
        x = (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + 1e-6)
        net = self.backbone
        h = net.maxpool(net.act(net.bn1(net.conv1(x))))
        feats = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            feats.append(h)
        return feats


def load_medicalnet(weights_path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> MedicalNetFeatures:
    """Build the frozen MedicalNet feature extractor from local weights.

    Args:
        weights_path: a ``.pth``/``.pt`` file holding a state dict (or ``{"state_dict": ...}``); a leading
            ``module.`` (DataParallel) is stripped and the segmentation head (``conv_seg``) ignored. ``None``
            searches ``$TORCH_HOME`` (see :func:`find_medicalnet_weights`).
        map_location: device to load the tensors onto.

    Returns:
        :class:`MedicalNetFeatures` in eval mode with no trainable parameters.

    Raises:
        FileNotFoundError: no weights found (the message says how to provide them).
        ValueError: the file does not hold MedicalNet ResNet-10 weights.
    """
    from dataset.checkpoint import load_torch_file  # lazy: the feature network alone needs no dataset code

    path = find_medicalnet_weights(weights_path)
    state = load_torch_file(path, "MedicalNet ResNet-10 weight file (resnet_10_23dataset.pth)", map_location)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    backbone = medicalnet_resnet10()
    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{path} is not a MedicalNet ResNet-10 state dict: {len(missing)} backbone tensors missing "
            f"(e.g. {missing[:3]})"
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from MedicalNet ResNet-10 for {wrong[:3]}")
    backbone.load_state_dict(state, strict=False)
    return MedicalNetFeatures(backbone)
