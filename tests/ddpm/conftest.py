"""Tiny BiFlowNet configurations shared by the ddpm tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

XRAY = {"image_size": [16, 16], "patch_size": 4, "dim": 16, "depth": 1, "num_heads": 2}


def tiny_network(**overrides) -> dict:
    """BiFlowNet kwargs for a 4-channel 8^3 latent, 4^3 sub-volumes, 16x16 X-rays."""
    cfg = {
        "in_channels": 4,
        "latent_shape": [8, 8, 8],
        "model_channels": 8,
        "channel_mults": [1, 1, 2],
        "attn_levels": [2],
        "norm_groups": 4,
        "sub_volume": 4,
        "token_patch": 2,
        "dit_heads": 2,
        "mlp_ratio": 2.0,
        "num_mid_dit": 1,
        "num_classes": 2,
        "xray": dict(XRAY),
        "cross_attention": "full",
        "back_projection": False,
    }
    cfg.update(overrides)
    return cfg


def randomize(module: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with noise so zero-initialised paths become active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(2, 4, 8, 8, 8, generator=g),
        "t": torch.tensor([3, 700]),
        "y": torch.tensor([0, 1]),
        "ap": torch.rand(2, 1, 16, 16, generator=g),
        "lat": torch.rand(2, 1, 16, 16, generator=g),
    }


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every ddpm test runs single-threaded (``one_thread`` in tests/conftest.py)."""
