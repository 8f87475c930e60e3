"""The end-to-end demo (`make demo`) at toy size: every stage runs, the summary and outputs exist, a rerun resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import pytest

from benchmarks import bench_guidance
from evaluation import demo

SUMMARY_KEYS = ("n_train", "n_test", "ae_psnr_db", "x2ct_psnr_db", "x2ct_ssim", "baseline_mean_psnr_db",
                "drr_consistency_psnr_db", "margin_over_baseline_db", "wall_s", "x2ct_unguided_psnr_db",
                "drr_consistency_unguided_psnr_db", "lung_dice", "bone_dice", "seconds_per_volume_guided",
                "seconds_per_volume_unguided", "ae_drr_consistency_psnr_db", "baseline_mean_drr_consistency_psnr_db")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` passes it
    out = tmp_path / "demo"
    args = ["--out", "demo", "--subjects", "8", "--size", "32", "--ae-steps", "3", "--diffusion-steps", "3",
            "--num-samples", "2", "--inference-steps", "2", "--no-progress"]
    assert demo.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), key
    assert summary["n_train"] + summary["n_test"] <= 8 and summary["n_test"] >= 1
    assert summary["margin_over_baseline_db"] == pytest.approx(summary["x2ct_psnr_db"] - summary["baseline_mean_psnr_db"])
    test_ids = [r["subject_id"] for r in _csv_rows(out / "evaluation" / "per_case.csv")]
    assert len(test_ids) == summary["n_test"]
    for sid in test_ids:
        assert nib.load(str(out / "generated" / f"{sid}.nii.gz")).shape == (32, 32, 32)
        assert (out / "generated" / f"{sid}_std.nii.gz").is_file()
        assert (out / "figures" / f"{sid}.png").stat().st_size > 0
        assert nib.load(str(out / "generated_unguided" / f"{sid}.nii.gz")).shape == (32, 32, 32)
    assert summary["settings"]["projection_guidance"]["weight"] > 0  # the default generation is guided

    # bench_guidance scores settings exactly as the demo does: its unguided and default settings give the demo's figures
    capsys.readouterr()  # drop the demo's own report
    assert bench_guidance.main([str(out), "--settings", "0", str(summary["settings"]["projection_guidance"]["weight"]),
                                "--num-samples", "2", "--inference-steps", "2"]) == 0
    bench = json.loads(capsys.readouterr().out)
    unguided, default = bench["settings"].values()
    assert unguided["psnr_db"] == pytest.approx(summary["x2ct_unguided_psnr_db"], abs=1e-4)
    assert default["default"] and default["psnr_db"] == pytest.approx(summary["x2ct_psnr_db"], abs=1e-4)
    assert default["drr_consistency_psnr_db"] == pytest.approx(summary["drr_consistency_psnr_db"], abs=1e-4)
    assert default["vs_unguided"]["psnr_db_delta"] == pytest.approx(default["psnr_db"] - unguided["psnr_db"])

    ckpts = [out / "autoencoder" / "checkpoints" / "last.ckpt", out / "biflownet" / "checkpoints" / "last.ckpt"]
    steps = [demo.checkpoint_step(p) for p in ckpts]
    assert steps == [3, 3]
    assert demo.main(args) == 0  # resumes: nothing is retrained
    assert [demo.checkpoint_step(p) for p in ckpts] == steps
    assert json.loads((out / "summary.json").read_text())["x2ct_psnr_db"] == pytest.approx(summary["x2ct_psnr_db"])

    # a longer autoencoder run makes the latents and the denoiser stale: both are rebuilt, not reused
    more = args.copy()
    more[more.index("--ae-steps") + 1] = "4"
    assert demo.main(more) == 0
    assert [demo.checkpoint_step(p) for p in ckpts] == [4, 3]
    stats = json.loads((out / "data" / "latent_stats.json").read_text())
    assert Path(stats["ae_checkpoint"]) == ckpts[0].resolve()


def _csv_rows(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


def test_a_stale_demo_run_is_one_error_that_says_how_to_start_over(tmp_path: Path) -> None:
    """A checkpoint an earlier demo configuration left is refused with the demo's own advice (not the entry point's
    run_name / ckpt_path options, which `python -m evaluation.demo` does not take); other errors pass unchanged."""
    from train.common import ResumeMismatch

    def stale(cfg):
        raise ResumeMismatch("x.ckpt: cannot resume: its autoencoder differs from this run's (upsample: None there, "
                             "'transposed' here)", "give this run its own run_name=... (now demo_stage1), or start "
                             "fresh with ckpt_path=null")

    with pytest.raises(ValueError) as err:
        demo.train_stage(stale, None, tmp_path)
    msg = str(err.value)
    assert msg.startswith("x.ckpt: cannot resume: its autoencoder differs") and "run_name" not in msg
    assert f"python -m evaluation.demo --fresh --out {tmp_path}" in msg and "DEMO_OUT" in msg

    def broken(cfg):
        raise ValueError("something else, cannot resume")

    with pytest.raises(ValueError, match="^something else, cannot resume$"):
        demo.train_stage(broken, None, tmp_path)
    assert demo.train_stage(lambda cfg: {"ok": cfg}, 3, tmp_path) == {"ok": 3}
