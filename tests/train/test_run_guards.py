"""Both training entry points: NaN/Inf weights are never checkpointed (the run stops naming the step and the last good
checkpoint, exit 3), a checkpoint with NaN/Inf weights is never resumed (exit 2), config values are refused in one line
naming the key before anything is written (exit 2), and the final line names the checkpoint written at train end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from dataset.cli import BAD_INPUT, exit_code_of, one_line
from ddpm.biflownet_module import NonFiniteLossError
from tests.train.poison import NanGradient, NanWeight
from tests.train.test_train_BiFlowNet import latent_dataset  # noqa: F401 - fixture
from train.common import NonFiniteWeightsError

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def _compose(config: str, overrides: list[str]):
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        return hydra.compose(config, overrides=overrides)


def _biflownet(data: Path, out: Path, steps: int, every: int = 1) -> list[str]:
    return ["experiment=biflownet_tiny", f"paths.data_dir={data}", f"paths.output_dir={out}", "logger=none",
            f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            f"callbacks.checkpoint.every_n_train_steps={every}", "network.xray.image_size=[32,32]",
            "trainer.enable_progress_bar=false", "module.val_sample_steps=0"]


def _patchvolume(manifest: Path, out: Path, steps: int, every: int = 2) -> list[str]:
    return ["experiment=ae_tiny", f"paths.data_dir={manifest.parent}", f"paths.output_dir={out}", "logger=none",
            f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            f"callbacks.checkpoint.every_n_train_steps={every}", "data.samples_per_volume=2", "data.queue_length=4",
            "trainer.enable_progress_bar=false"]


def _checkpoints(folder: Path) -> dict[str, dict]:
    """Every checkpoint in ``folder`` by name; each must hold finite weights and optimiser state."""
    from train.common import WEIGHT_KEYS, nonfinite_tensors

    found = {}
    for path in sorted(folder.glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert nonfinite_tensors(ckpt, WEIGHT_KEYS) == [], f"{path.name} holds non-finite tensors"
        found[path.name] = ckpt
    return found


def _poison(path: Path, out: Path) -> Path:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    torch.save(ckpt, out)
    return out


def _assert_one_line(err: BaseException, code: int, *needles: str) -> str:
    text = str(err)
    assert exit_code_of(err) == code and one_line(text) == text.strip() and "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


# ------------------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("poison, expected", [
    (lambda: NanGradient(step=2), "the weights became non-finite (NaN/Inf) at step 2 (state_dict.model."),
    (lambda: NanWeight(step=2, attribute="ema_model"),
     "the weights are non-finite (NaN/Inf) at step 2 (state_dict.ema_model."),
])
def test_biflownet_never_checkpoints_nan_weights_and_names_the_step_and_last_good(latent_dataset: Path, tmp_path: Path,
                                                                                  capsys, poison, expected) -> None:
    from train.train_BiFlowNet import run

    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeightsError) as e:
        run(_compose("train_BiFlowNet", _biflownet(latent_dataset, out, steps=4)), callbacks=[poison()])
    last = out / "checkpoints" / "last.ckpt"
    _assert_one_line(e.value, 3, expected, "stopped at step 2 without checkpointing them",
                     f"the last good checkpoint is {last} (step 1)")
    found = _checkpoints(out / "checkpoints")  # the statement is true: step 1 is there and finite, nothing later
    assert sorted(found) == ["last.ckpt", "step0000001.ckpt"]
    assert all(c["global_step"] == 1 for c in found.values())
    assert "finished at step" not in capsys.readouterr().out


def test_biflownet_nan_loss_names_the_training_step_and_the_last_good_checkpoint(latent_dataset: Path,
                                                                                 tmp_path: Path) -> None:
    from train.train_BiFlowNet import run

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:  # the weights are NaN from before the 3rd step's forward pass
        run(_compose("train_BiFlowNet", _biflownet(latent_dataset, out, steps=6, every=2)),
            callbacks=[NanWeight(step=3)])
    last = out / "checkpoints" / "last.ckpt"
    _assert_one_line(e.value, 3, "non-finite training loss (nan) at step 3;",
                     f"the last good checkpoint is {last} (step 2)")
    found = _checkpoints(out / "checkpoints")
    assert sorted(found) == ["last.ckpt", "step0000002.ckpt"] and found["last.ckpt"]["global_step"] == 2


def test_patchvolume_never_checkpoints_nan_weights(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    from train.train_PatchVolume import run

    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeightsError) as e:
        run(_compose("train_PatchVolume", _patchvolume(tiny_prepared_dataset, out, steps=6)),
            callbacks=[NanGradient(step=3)])
    last = out / "checkpoints" / "last.ckpt"
    _assert_one_line(e.value, 3, "the weights became non-finite (NaN/Inf) at step 3 (state_dict.autoencoder.",
                     "stopped at step 4 without checkpointing them", f"the last good checkpoint is {last} (step 2)")
    found = _checkpoints(out / "checkpoints")
    assert "last.ckpt" in found and all(c["global_step"] == 2 for c in found.values()), sorted(found)


def test_cli_nan_weights_exit_3_in_one_line_and_write_no_checkpoint(latent_dataset: Path, tmp_path: Path) -> None:
    """What `optimizer.lr=inf trainer.max_steps=1` did: NaN weights after the only step, last.ckpt at train end."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.train_BiFlowNet", *_biflownet(latent_dataset, out, steps=1, every=50),
           "+callbacks.poison._target_=tests.train.poison.NanGradient", "+callbacks.poison.step=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("python -m train.train_BiFlowNet: error: "
                               "the weights became non-finite (NaN/Inf) at step 1")
    assert "this run wrote no checkpoint" in lines[0] and "finished at step" not in proc.stdout
    assert not list(out.rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------ resuming NaN weights
def test_patchvolume_refuses_to_resume_or_start_stage_2_from_nan_weights(tiny_prepared_dataset: Path,
                                                                          tmp_path: Path) -> None:
    from train.train_PatchVolume import run

    out = tmp_path / "run"
    first = run(_compose("train_PatchVolume", _patchvolume(tiny_prepared_dataset, out, steps=2)))
    last = Path(first["last_checkpoint"])
    _poison(last, last)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as e:  # ckpt_path=last
        run(_compose("train_PatchVolume", _patchvolume(tiny_prepared_dataset, out, steps=4)))
    _assert_one_line(e.value, 2, f"{last}: cannot resume: its weights hold non-finite values (NaN/Inf) in state_dict.",
                     "ckpt_path=null")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing written
    stage2 = tmp_path / "s2"
    with pytest.raises(ValueError) as e:
        run(_compose("train_PatchVolume", [*_patchvolume(tiny_prepared_dataset, stage2, steps=2), "stage=2",
                                           f"resume_from_checkpoint={last}", "data.patch_size=null",
                                           "data.batch_size=1"]))
    _assert_one_line(e.value, 2, f"resume_from_checkpoint={last}: its weights hold non-finite values")
    assert not stage2.exists()


def test_biflownet_refuses_to_resume_or_fine_tune_from_nan_weights(latent_dataset: Path, tmp_path: Path) -> None:
    from train.train_BiFlowNet import run

    out = tmp_path / "run"
    last = Path(run(_compose("train_BiFlowNet", _biflownet(latent_dataset, out, steps=1)))["last_checkpoint"])
    _poison(last, last)
    with pytest.raises(ValueError) as e:
        run(_compose("train_BiFlowNet", _biflownet(latent_dataset, out, steps=2)))
    _assert_one_line(e.value, 2, f"{last}: cannot resume: its weights hold non-finite values")
    assert _step_of(last) == 1
    other = tmp_path / "lora"
    with pytest.raises(ValueError) as e:
        run(_compose("train_BiFlowNet", [*_biflownet(latent_dataset, other, steps=1), f"+init_from={last}"]))
    _assert_one_line(e.value, 2, f"init_from={last}: its weights hold non-finite values")
    assert not other.exists()


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ------------------------------------------------------------------------------------------ config values
BIFLOWNET_BAD = [
    ("optimizer.lr=inf", "optimizer.lr=inf is out of range; expected a finite value in (0, "),
    ("optimizer.lr=1e300", "optimizer.lr=1e+300 is out of range"),
    ("optimizer.lr=abc", "optimizer.lr='abc' is not a number"),
    ("optimizer.lr=-1", "optimizer.lr=-1 is out of range"),
    ("optimizer.betas=[2,3]", "optimizer.betas[0]=2 is out of range; expected a finite value in [0, 1)"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] is invalid; expected two numbers in [0, 1)"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1 is out of range"),
    ("+optimizer.eps=0", "optimizer.eps=0 is out of range"),
    ("run_name=../../../escape", "run_name='../../../escape' is invalid; expected a plain folder name"),
    ("run_name=a/b", "run_name='a/b' is invalid"),
    ("process.num_train_timesteps=0", "process.num_train_timesteps=0 is out of range; expected an integer >= 1"),
    ("module.val_sample_steps=9 process.num_train_timesteps=4", "module.val_sample_steps=9 is out of range"),
    ("global_batch_size=abc", "global_batch_size='abc' is not an integer; expected an integer >= 1"),
    ("global_batch_size=2.5", "global_batch_size=2.5 is not an integer"),
    ("seed=abc", "seed='abc' is not an integer; expected an integer in [0, 4294967295]"),
    ("seed=-1", "seed=-1 is out of range; expected an integer in [0, 4294967295]"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is out of range; expected an integer >= 1"),
]
PATCHVOLUME_BAD = [
    ("data.batch_size=abc", "data.batch_size='abc' is not an integer; expected an integer >= 1"),
    ("loss.gan_weight=nan", "loss.gan_weight=nan is out of range; expected a finite value in [0, inf)"),
    ("loss.perceptual_weight=-1", "loss.perceptual_weight=-1 is out of range"),
    ("loss.perceptual.mode=bogus", "loss.perceptual.mode='bogus' is invalid; expected one of 3d, triplane"),
    ("module.grad_clip=-1", "grad_clip=-1 is out of range; expected a finite value in [0, inf)"),
    ("optimizer.lr=inf", "optimizer.lr=inf is out of range"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is out of range"),
]


@pytest.mark.parametrize("entry, override, expected", [("train_BiFlowNet", *case) for case in BIFLOWNET_BAD]
                         + [("train_PatchVolume", *case) for case in PATCHVOLUME_BAD])
def test_bad_config_value_is_one_line_naming_the_key_before_anything_is_written(
        entry: str, override: str, expected: str, latent_dataset: Path, tmp_path: Path) -> None:
    import importlib

    run = importlib.import_module(f"train.{entry}").run
    runs = tmp_path / "a" / "b" / "runs"
    own = (["experiment=biflownet_tiny", "network.xray.image_size=[32,32]"] if entry == "train_BiFlowNet"
           else ["experiment=ae_tiny", "data.queue_length=4"])
    overrides = [*own, f"paths.data_dir={latent_dataset}", f"paths.log_dir={runs}", "logger=none", *override.split()]
    with pytest.raises(BAD_INPUT) as e:
        run(_compose(entry, overrides))
    _assert_one_line(e.value, 2, expected)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no config.yaml, no logs, no checkpoint


@pytest.mark.slow  # subprocesses: the in-process test above covers every key
@pytest.mark.parametrize("override, needle", [("optimizer.lr=inf", "optimizer.lr=inf"),
                                              ("run_name=../../../escape", "run_name='../../../escape'")])
def test_cli_bad_config_value_exits_2_and_leaves_no_run_folder(latent_dataset: Path, tmp_path: Path, override: str,
                                                               needle: str) -> None:
    runs = tmp_path / "a" / "b" / "runs"
    cmd = [sys.executable, "-m", "train.train_BiFlowNet", "experiment=biflownet_tiny",
           f"paths.data_dir={latent_dataset}", f"paths.log_dir={runs}", "logger=none", "trainer.max_steps=1", override]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("python -m train.train_BiFlowNet: error: ") and needle in lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not (runs / "train_BiFlowNet" / "tiny").exists() and not (tmp_path / "a" / "escape").exists()


# ------------------------------------------------------------------------------------------ the final line
def test_final_line_names_the_last_checkpoint_written_at_train_end(latent_dataset: Path, tmp_path: Path,
                                                                   capsys) -> None:
    from train.train_BiFlowNet import run

    out = tmp_path / "run"
    run(_compose("train_BiFlowNet", _biflownet(latent_dataset, out, steps=1, every=50)))  # last.ckpt only at train end
    printed = capsys.readouterr().out
    assert f"finished at step 1; checkpoint: {out / 'checkpoints' / 'last.ckpt'}\n" in printed, printed
    assert "no checkpoint written" not in printed


class _RefuseAtSetup(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        raise ValueError("refused while the trainer sets up")


def test_a_run_refused_while_the_trainer_sets_up_leaves_no_config_yaml(tiny_prepared_dataset: Path,
                                                                      tmp_path: Path) -> None:
    from train.train_PatchVolume import run

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="refused while the trainer sets up"):
        run(_compose("train_PatchVolume", _patchvolume(tiny_prepared_dataset, out, steps=1)),
            callbacks=[_RefuseAtSetup()])
    assert not (out / "config.yaml").exists() and not list(out.rglob("*.ckpt"))
    run(_compose("train_PatchVolume", _patchvolume(tiny_prepared_dataset, out, steps=1)))
    assert (out / "config.yaml").is_file()  # written once training starts
