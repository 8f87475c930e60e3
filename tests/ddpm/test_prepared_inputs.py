"""What BiFlowNet takes from a prepared dataset: projection grids (with or without DRR geometry), latent statistics."""

import json
from pathlib import Path

import torch

from ddpm import cone_beam_grids, parallel_projection_grids


def test_cone_beam_grids_differ_from_parallel_beam(tiny_prepared_dataset: Path) -> None:
    ap, lat = cone_beam_grids(tiny_prepared_dataset.parent / "dataset.json", (8, 8, 8))
    pap, plat = parallel_projection_grids((8, 8, 8))
    assert ap.shape == lat.shape == (8, 8, 8, 2)
    assert not torch.allclose(ap, pap)  # magnification depends on depth in a cone beam


def test_dataset_without_geometry_falls_back_to_parallel_beam(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    info = json.loads((tiny_prepared_dataset.parent / "dataset.json").read_text())
    info.pop("geometry")
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    ap, lat = cone_beam_grids(tmp_path / "dataset.json", (8, 8, 8))
    pap, plat = parallel_projection_grids((8, 8, 8))
    assert torch.equal(ap, pap) and torch.equal(lat, plat)


def test_latent_stats_keep_the_autoencoder_path(tmp_path: Path) -> None:
    from ddpm.preflight import read_latent_stats

    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.0], "std": [1.0], "ae_checkpoint": "ae.ckpt"}))
    assert read_latent_stats(tmp_path / "latent_stats.json").ae_checkpoint == str((tmp_path / "ae.ckpt").resolve())
