"""Tiny autoencoder configurations and a MedicalNet weight file written by the tests themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from AutoEncoder.medicalnet import medicalnet_resnet10


def tiny_config(factor: int = 4, n_codes: int = 32, **overrides: Any) -> dict[str, Any]:
    """A few-channel autoencoder config with 4x or 8x compression."""
    levels = {4: 3, 8: 4}[factor]
    cfg: dict[str, Any] = {
        "in_channels": 1, "channels": [8] * levels, "embedding_dim": 4, "n_codes": n_codes,
        "num_res_blocks": 1, "attention_heads": 1, "num_groups": 4, "patch_size": 16, "encode_chunk_size": 4,
        "codebook": {"decay": 0.9, "dead_threshold": 0.01},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def medicalnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MedicalNet-format file: ``{"state_dict": {"module.<name>": ...}}`` plus a segmentation head to ignore."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in medicalnet_resnet10().state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 512, 3, 3, 3)
    path = tmp_path_factory.mktemp("medicalnet") / "resnet_10_23dataset.pth"
    torch.save({"state_dict": state}, path)
    return path
