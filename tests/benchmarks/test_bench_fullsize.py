"""benchmarks.bench_fullsize at a tiny size with the tiny presets: every stage runs and reports sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_fullsize

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--size", "32", "--ae-experiment", "ae_tiny", "--dit-experiment", "biflownet_tiny", "--data", "synthetic",
        "--threads", "1"]


def test_every_stage_in_process(capsys: pytest.CaptureFixture) -> None:
    assert bench_fullsize.main([*TINY, "--in-process"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["size"] == 32 and set(record["stages"]) == set(bench_fullsize.STAGES)
    assert set(record["seconds"]) == set(bench_fullsize.STAGES) and all(v > 0 for v in record["seconds"].values())
    assert 0 < record["peak_rss_gb"] < 20
    assert record["peak_rss_gb"] == pytest.approx(max(s["peak_rss_gb"] for s in record["stages"].values()), rel=0.05)
    ae = record["stages"]["ae_step"]
    # every loss ran once: L1, perceptual (stand-in weights), VQ commitment, hinge G/D losses, adaptive weight
    assert {"l1", "perceptual", "commitment", "g_adv", "d_loss", "adaptive_weight"} <= set(ae["losses"])
    assert ae["losses"]["perceptual"] > 0 and ae["losses"]["adaptive_weight"] > 0
    assert "stand-in" in record["perceptual_weights"] and ae["patch"] == 16
    codec = record["stages"]["codec"]
    assert codec["latent_shape"] == [4, 8, 8, 8] and codec["sliding"] is False  # ae_tiny never slides
    dit = record["stages"]["dit_step"]
    assert dit["latent_shape"] == [4, 8, 8, 8] and dit["xray_size"] == 32 and dit["optimizer"] == "torch.optim.AdamW"
    gen = record["stages"]["generate"]
    assert gen["ddim_steps"] == 2 and gen["decode_s"] > 0 and gen["sampling_s"] > 0
    assert gen["seconds"] == pytest.approx(gen["decode_s"] + gen["sampling_s"])


def test_forced_sliding_decode(capsys: pytest.CaptureFixture) -> None:
    assert bench_fullsize.main([*TINY, "--in-process", "--stages", "codec", "--decode-window", "4"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(record["stages"]) == ["codec"]
    assert record["stages"]["codec"]["sliding"] is True and record["stages"]["codec"]["decode_window"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--stages", "train"], "--stages 'train': expected a comma-separated subset"),
    (["--size", "30"], "--size 30 must be a multiple of the autoencoder's factor 4"),
    (["--size", "nan"], "is not an integer"),
])
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    try:
        code = bench_fullsize.main([*TINY, *argv])
    except SystemExit as e:  # argparse rejects the value itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_stages_in_their_own_processes(capsys: pytest.CaptureFixture) -> None:
    assert bench_fullsize.main([*TINY, "--stages", "codec,generate"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["in_process"] is False and list(record["stages"]) == ["codec", "generate"]
    for stage in record["stages"].values():
        assert 0 < stage["rss_before_gb"] <= stage["peak_rss_gb"] <= record["peak_rss_gb"]
