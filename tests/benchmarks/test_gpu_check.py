"""benchmarks/gpu_check: the shell script parses, and its dry run writes every piece's JSON with sane fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.usefixtures("one_thread")


def _read(out: Path, piece: str) -> dict:
    record = json.loads((out / f"{piece}.json").read_text())
    assert record["piece"] == piece and record["status"] == "ok" and record["dry_run"] is True
    return record


def test_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_script_rejects_unknown_option(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--fast", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpu_check.sh: error: unknown option --fast "
                                   "(expected --dry-run and/or an output folder)")
    assert not any(tmp_path.iterdir())


def test_peak_table_matches_names() -> None:
    assert dict(gpu_check.PEAK_BF16_TFLOPS)["H100 PCIe"] == 756.0
    # first match wins, so a PCIe H100 is not read as the SXM part
    names = [k for k, _ in gpu_check.PEAK_BF16_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")


def test_real_run_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["env", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "env.json").exists()


def test_dry_run_pieces_in_process(tmp_path: Path) -> None:
    for command in ("env", "train-step", "codec", "generate"):
        assert gpu_check.main([command, "--dry-run", "--out", str(tmp_path)]) == 0, command
    env = _read(tmp_path, "env")
    assert env["device"] == "cpu" and env["peak_bf16_tflops"] is None
    step = _read(tmp_path, "train_step")
    assert [r["batch"] for r in step["batches"]] == [1, 2]
    one, two = step["batches"]
    assert one["step_s"] > 0 and one["achieved_tflops"] > 0 and one["mfu"] is None
    # model FLOPs are counted per sample and scale with the batch; the executed count includes them
    assert two["model_tflop_per_step"] == pytest.approx(2 * one["model_tflop_per_step"])
    assert two["executed_tflop_per_step"] == pytest.approx(two["model_tflop_per_step"], rel=0.05)
    codec = _read(tmp_path, "codec")
    assert [r["size"] for r in codec["sizes"]] == [32, 64]
    small, large = codec["sizes"]
    assert small["latent_shape"] == [4, 4, 4, 4] and large["latent_shape"] == [4, 8, 8, 8]
    assert (small["sliding"], large["sliding"]) == (False, True)  # dry-run decode window: 4 latent voxels
    assert all(r["encode_s"] > 0 and r["decode_s"] > 0 for r in codec["sizes"])
    gen = _read(tmp_path, "generate")
    assert [r["ddim_steps"] for r in gen["runs"]] == [2, 3]
    assert gen["latent_shape"] == [4, 4, 4, 4] and gen["precision"] == "fp32"
    assert all(r["seconds"] > 0 for r in gen["runs"])
    # summary: the pieces not run here are reported, and the exit code says so
    assert gpu_check.main(["summary", "--dry-run", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["failed_or_missing"] == ["prepare", "ddp", "fsdp"]
    assert set(summary["pieces"]) == {"env", "train_step", "codec", "generate"}


@pytest.mark.slow
def test_script_dry_run_writes_every_piece(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_BUDGET_S": "900"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr
    for piece in gpu_check.PIECES:
        _read(out, piece)
    assert not list(out.glob("*.failed.json"))
    prep = _read(out, "prepare")
    assert prep["subjects"] == 8 and prep["splits"]["train"] >= 2 and prep["latent_shape"] == [4, 8, 8, 8]
    ddp = _read(out, "ddp")
    assert ddp["steps"] == 20 and ddp["step_s_median"] > 0 and "trainer=ddp_cpu" in ddp["command"]
    # Lightning's FSDP trains on GPUs only: the dry run builds the strategy and wraps the blocks, trains nothing
    fsdp = _read(out, "fsdp")
    assert fsdp["built_only"] and fsdp["steps"] == 0 and "trainer=fsdp" in fsdp["command"]
    assert fsdp["wrapped_blocks"]["DiTBlock"] > 0
    assert _read(out, "fsdp")["strategy"] == "FSDPStrategy"
    assert _read(out, "ddp")["strategy"] == "DDPStrategy"
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failed_or_missing"] == []
