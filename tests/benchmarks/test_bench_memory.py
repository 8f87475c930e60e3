"""benchmarks.bench_memory: its meta-device byte count equals a real one, and its figures behave like memory."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_memory
from benchmarks.bench_memory import biflownet_config
from ddpm import fast_conv
from ddpm.memory import LiveBytes, count_training_step
from tests.AutoEncoder.conftest import tiny_config


def test_the_meta_count_equals_the_real_count() -> None:
    from AutoEncoder import PatchVolumeAutoencoder

    peaks = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        with torch.device(device):  # slab decoding (4 > decode_window) and the whole decode
            ae = PatchVolumeAutoencoder(**tiny_config(4, n_codes=0, decode_window=2, decode_slab=1)).eval()
        z = torch.randn(1, 4, 4, 4, 4, device=device)
        for mode in ("slab", "whole"):
            counter = LiveBytes()
            with counter, torch.no_grad():
                ae.decode(z, quantize=False) if mode == "slab" else ae.decoder(z)
            peaks[device, mode] = counter.peak
    assert peaks["meta", "slab"] == peaks["cpu", "slab"] < peaks["meta", "whole"] == peaks["cpu", "whole"]
    cfg = biflownet_config("tiny", 64, False)
    meta, cpu = count_training_step(cfg, 2), count_training_step(cfg, 2, "cpu")
    assert cpu.peak > 0 and abs(meta.peak - cpu.peak) <= 0.1 * cpu.peak  # the footprint gather counts every voxel
    assert fast_conv.MAX_FP32_CHANNELS_LAST_CHANNELS == 32  # the CPU-only layout route, off while counting, is back


def test_figures_grow_with_batch_and_size(capsys: pytest.CaptureFixture) -> None:
    code = bench_memory.main(["--network", "tiny", "--ae-preset", "tiny", "--sizes", "64,128", "--batches", "1,4"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["precision"] == "fp32" and 0 < out["bf16_peak_ratio"] < 2
    train = {(r["ct"], r["batch"], r["checkpointing"]): r for r in out["biflownet_train"]}
    for ckpt in (True, False):
        assert train[64, 1, ckpt]["total_gb"] <= train[64, 4, ckpt]["total_gb"] <= train[128, 4, ckpt]["total_gb"]
    gen = {r["ct"]: r for r in out["generate"]}
    assert gen[64]["decode_gb"] < gen[128]["decode_gb"]
    assert out["autoencoder_train"][0]["total_gb"] < out["autoencoder_train"][1]["total_gb"]


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "100"], "--sizes '100'; expected comma-separated positive integers that are multiples of 64"),
    (["--batches", "0"], "--batches '0'"),
    (["--network", "huge"], "no such network preset"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code = bench_memory.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
