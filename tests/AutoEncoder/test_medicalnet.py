"""MedicalNet weights from a file the test writes, from a pre-filled TORCH_HOME, and the missing-weights error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from AutoEncoder import PatchVolumeModule, PerceptualLoss, load_medicalnet
from AutoEncoder.medicalnet import medicalnet_resnet10
from tests.AutoEncoder.conftest import tiny_config


def test_loads_weights_from_file(medicalnet_weights: Path) -> None:
    net = load_medicalnet(medicalnet_weights)
    torch.manual_seed(0)
    reference = medicalnet_resnet10().state_dict()  # same seed as the fixture -> same weights
    assert torch.equal(net.backbone.conv1.weight, reference["conv1.weight"])
    assert torch.equal(net.backbone.layer4[0].conv2.weight, reference["layer4.0.conv2.weight"])
    assert not any(p.requires_grad for p in net.parameters())
    feats = net(torch.rand(1, 1, 16, 16, 16) * 2 - 1)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    assert [f.shape[2] for f in feats] == [4, 2, 2, 2]  # stride-1 dilated layers 3 and 4, as in MedicalNet
    net.train()
    assert not net.training


def test_loads_from_prefilled_torch_home(medicalnet_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(medicalnet_weights, tmp_path / "hub" / "checkpoints" / "resnet_10_23dataset.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert load_medicalnet(None).backbone.conv1.weight.shape == (64, 1, 7, 7, 7)


def test_missing_weights_error_says_how_to_provide_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="loss.perceptual.weights_path=.*TORCH_HOME.*loss.perceptual_weight=0"):
        load_medicalnet(None)
    with pytest.raises(FileNotFoundError, match="not found at"):
        load_medicalnet(tmp_path / "nope.pth")
    cfg = {"perceptual_weight": 1.0, "gan_weight": 0.0}
    with pytest.raises(FileNotFoundError, match="MedicalNet weights not found"):
        PatchVolumeModule(tiny_config(4), loss=cfg)
    # perceptual weight 0: no weights needed
    module = PatchVolumeModule(tiny_config(4), loss={"perceptual_weight": 0.0, "gan_weight": 0.0})
    assert module.perceptual is None


def test_wrong_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="not a MedicalNet ResNet-10"):
        load_medicalnet(path)


def test_perceptual_loss_properties(medicalnet_weights: Path) -> None:
    loss = PerceptualLoss(medicalnet_weights)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(y, x)
    assert value.item() > 0
    value.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal shapes"):
        loss(x, x[..., :8])
    with pytest.raises(ValueError, match="'3d' or 'triplane'"):
        PerceptualLoss(medicalnet_weights, mode="2d")
