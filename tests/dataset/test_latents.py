"""dataset.latents: the LatentStats type (validation, normalise / denormalise, JSON round trip) and latent files."""

import json
from pathlib import Path

import pytest
import torch

from dataset.checkpoint import CheckpointError
from dataset.latents import LatentStats, check_latent_origin, read_latent, write_latent


def test_normalise_uses_per_channel_values_computed_by_hand() -> None:
    stats = LatentStats(mean=[1.0, -2.0], std=[2.0, 0.5])
    z = torch.tensor([3.0, -1.0]).reshape(1, 2, 1, 1, 1)
    # (3 - 1) / 2 = 1 ; (-1 + 2) / 0.5 = 2
    assert stats.normalize(z).flatten().tolist() == [1.0, 2.0]
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z)
    mean, std = LatentStats(mean=0.5, std=2.0).tensors(3)  # one value serves every channel
    assert mean.shape == (1, 3, 1, 1, 1) and std.flatten().tolist() == [2.0, 2.0, 2.0]
    assert LatentStats.identity().normalize(z).equal(z)


@pytest.mark.parametrize("mean, std, match", [
    ([0.0], [0.0], "must be positive"),
    ([0.0], [-1.0], "must be positive"),
    ([float("nan")], [1.0], "finite"),
    ([0.0], [float("inf")], "finite"),
    ([0.0, 1.0, 2.0], [1.0, 1.0], "3 means but 2 stds"),
    ("abc", [1.0], "not a list of numbers"),
    ([], [1.0], "at least one"),
])
def test_invalid_statistics_are_refused(mean, std, match) -> None:
    with pytest.raises(ValueError, match=match):
        LatentStats(mean=mean, std=std)


def test_wrong_channel_count_names_network_in_channels() -> None:
    with pytest.raises(ValueError, match="network.in_channels"):
        LatentStats(mean=[0.0, 0.0], std=[1.0, 1.0]).tensors(4)


def test_json_round_trip_and_relative_checkpoint(tmp_path: Path) -> None:
    stats = LatentStats(mean=[0.1, 0.2], std=[1.5, 2.5], ae_fingerprint="ab" * 32, ae_checkpoint="ae.ckpt", count=12,
                        extra={"scale_factor": 0.5})
    stats.save(tmp_path / "latent_stats.json")
    back = LatentStats.load(tmp_path / "latent_stats.json")
    assert back.mean == stats.mean and back.std == stats.std and back.count == 12 and back.extra == {"scale_factor": 0.5}
    assert back.ae_fingerprint == stats.ae_fingerprint and back.ae_checkpoint == str((tmp_path / "ae.ckpt").resolve())
    assert LatentStats.from_dict(back.to_dict()) == back


@pytest.mark.parametrize("text, match", [("{", "not valid JSON"), ('{"mean": [0]}', "expected 'mean' and 'std'"),
                                         ('{"mean": [0], "std": [0]}', "must be positive")])
def test_bad_stats_file_is_one_line_naming_it(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "latent_stats.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        LatentStats.load(tmp_path / "latent_stats.json")
    assert "latent_stats.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="generate_training_latent"):
        LatentStats.load(tmp_path / "missing.json")


def test_latent_files_carry_their_autoencoder(tmp_path: Path) -> None:
    z = torch.randn(4, 2, 2, 2)
    write_latent(z, tmp_path / "a.pt", "f" * 64)
    got, fp = read_latent(tmp_path / "a.pt")
    assert torch.equal(got, z) and fp == "f" * 64
    torch.save(z, tmp_path / "bare.pt")  # older files and hand-made stand-ins: origin unknown
    assert read_latent(tmp_path / "bare.pt")[1] is None
    torch.save({"x": z}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="without a latent tensor"):
        read_latent(tmp_path / "dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: not a checkpoint"):
        read_latent(tmp_path / "junk.pt")


def test_latents_of_another_autoencoder_are_refused(tmp_path: Path) -> None:
    stats = LatentStats(mean=[0.0], std=[1.0], ae_fingerprint="a" * 64, ae_checkpoint="/ae.ckpt")
    write_latent(torch.zeros(1, 2, 2, 2), tmp_path / "same.pt", "a" * 64)
    torch.save(torch.zeros(1, 2, 2, 2), tmp_path / "unknown.pt")
    check_latent_origin([tmp_path / "same.pt", tmp_path / "unknown.pt"], stats, "latent_stats.json")
    write_latent(torch.zeros(1, 2, 2, 2), tmp_path / "other.pt", "b" * 64)
    with pytest.raises(ValueError, match="other.pt: latent made by autoencoder bbbbbbbbbbbb.*generate_training_latent"):
        check_latent_origin([tmp_path / "same.pt", tmp_path / "other.pt"], stats, "latent_stats.json")
    assert json.dumps(stats.to_dict())  # plain data
