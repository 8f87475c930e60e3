"""train.tune: a resumable SQLite study on tiny BiFlowNet runs - interruption and resume, a killed worker's
trial retried, NaN trials pruned, pruning decisions, the best-parameter experiment config, bad input."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.train.test_loggers import wandb_history
from tests.train.test_train_BiFlowNet import write_proxy_latents
from train.tune import TrialReporter, main

ROOT = Path(__file__).resolve().parents[2]


class InterruptInTrial(L.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) after the first training step of the run in ``run_dir``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if Path(trainer.default_root_dir).name == self.run_dir:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def latents(tiny_prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_proxy_latents(tiny_prepared_dataset, tmp_path_factory.mktemp("tune_latents") / "data")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def _args(data: Path, tmp: Path, n_trials: int, *extra: str) -> list[str]:
    return [
        "target=biflownet", "study_name=s", f"storage=sqlite:///{tmp}/study.db", f"n_trials={n_trials}",
        f"tune_dir={tmp}/runs", f"best_config={tmp}/cfg/experiment/best.yaml",
        "experiment=biflownet_tiny", f"paths.data_dir={data}", "logger=none", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "module.val_sample_steps=0",
        "callbacks.checkpoint.every_n_train_steps=4", "network.xray.image_size=[32,32]", *extra,
    ]


def _study(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp}/study.db")


def test_interrupted_study_resumes_without_losing_trials(latents: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    interrupt = ["+callbacks.interrupt._target_=tests.train.test_tune.InterruptInTrial",
                 "+callbacks.interrupt.run_dir=trial_1"]
    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert main(_args(latents, tmp_path, 3, *interrupt)) == 130
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
    err = capsys.readouterr().err
    assert "Traceback" not in err and "python -m train.tune: interrupted; rerun the same command to resume" in err
    trials = _study(tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    first, interrupted = trials[0], trials[1]
    assert trials[2].user_attrs == {"retry_of": 1, "attempt": 2}

    assert main(_args(latents, tmp_path, 3)) == 0  # same command without the interruption: resume
    trials = _study(tmp_path).get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].params == first.params and trials[0].value == first.value  # the finished trial is kept
    assert trials[2].params == interrupted.params  # the interrupted trial ran again under a new number
    assert trials[3].params != trials[2].params  # the resumed sampler does not replay earlier samples
    for t in trials[2:]:
        assert sorted(t.intermediate_values) == [2, 4]  # reported after each validation
        assert (tmp_path / "runs" / f"trial_{t.number}" / "checkpoints" / "last.ckpt").is_file()
    assert main(_args(latents, tmp_path, 3)) == 0  # already complete: nothing new
    assert len(_study(tmp_path).trials) == 4

    # the saved best parameters compose as an experiment on top of the searched one
    best = _study(tmp_path).best_trial
    text = (tmp_path / "cfg" / "experiment" / "best.yaml").read_text()
    assert text.startswith("# @package _global_") and f"trial {best.number}," in text
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        cfg = hydra.compose("train_BiFlowNet", overrides=[f"hydra.searchpath=[file://{tmp_path}/cfg]", "experiment=best"])
    assert cfg.optimizer.lr == pytest.approx(best.params["lr"])
    assert cfg.optimizer.weight_decay == pytest.approx(best.params["weight_decay"])
    assert cfg.trainer.gradient_clip_val == pytest.approx(best.params["grad_clip"])
    assert cfg.module.p_uncond == pytest.approx(best.params["p_uncond"])
    assert cfg.run_name == "tiny" and cfg.network.latent_shape == [8, 8, 8]  # from biflownet_tiny underneath


def test_trial_left_running_by_a_killed_worker_is_retried(latents: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_home",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache"}.items():
        monkeypatch.setenv(key, str(value))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/study.db", heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(study_name="s", storage=storage)
    killed = study.ask()
    for name, low, high in [("lr", 1e-5, 1e-3), ("weight_decay", 1e-6, 1e-2), ("grad_clip", 0.1, 10.0)]:
        killed.suggest_float(name, low, high, log=True)
    killed.suggest_float("p_uncond", 0.0, 0.3)
    storage.record_heartbeat(killed._trial_id)  # then the worker dies: no more beats, state stays RUNNING
    # ... an hour ago: its last beat is older than any grace period, with no waiting and no race
    with closing(sqlite3.connect(tmp_path / "study.db")) as db, db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?",
                   (killed._trial_id,))
    storage.remove_session()
    # a grace period far above the beat interval: the live trials' own heartbeats never look stale
    assert main(_args(latents, tmp_path, 2, "heartbeat_interval=1", "grace_period=60", "logger=wandb")) == 0
    trials = _study(tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == killed.params and trials[1].user_attrs["retry_of"] == 0
    # each trial is a W&B run of its own, inside its run dir, holding the searched metric
    run_files = [list((tmp_path / "runs" / f"trial_{n}" / "wandb").glob("offline-run-*/run-*.wandb")) for n in (1, 2)]
    assert [len(files) for files in run_files] == [1, 1] and run_files[0][0].name != run_files[1][0].name
    for (run_file,) in run_files:
        assert any("val/loss" in row for row in wandb_history(run_file))


def test_nan_loss_prunes_the_trial(latents: Path, tmp_path: Path) -> None:
    absurd = ["search_space.lr.low=1e29", "search_space.lr.high=1e30"]  # Adam steps of ~1e30 overflow at once
    assert main(_args(latents, tmp_path, 2, *absurd)) == 0
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all("non-finite" in t.user_attrs["pruned_reason"] for t in trials)
    assert not (tmp_path / "cfg" / "experiment" / "best.yaml").exists()  # no completed trial, no best config


def _trainer(step: int, **metrics: float) -> SimpleNamespace:
    return SimpleNamespace(sanity_checking=False, global_step=step,
                           callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})


def test_reporter_reports_prunes_on_median_and_on_non_finite_values() -> None:
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    TrialReporter(good, "val/loss").on_validation_end(_trainer(2, **{"val/loss": 1.0}), None)
    study.tell(good, 1.0)
    assert study.trials[0].intermediate_values == {2: 1.0}

    worse = study.ask()
    with pytest.raises(optuna.TrialPruned):
        TrialReporter(worse, "val/loss").on_validation_end(_trainer(2, **{"val/loss": 5.0}), None)
    better = study.ask()
    TrialReporter(better, "val/loss").on_validation_end(_trainer(2, **{"val/loss": 0.5}), None)  # kept
    with pytest.raises(optuna.TrialPruned, match="non-finite train/loss"):
        TrialReporter(better, "val/loss").on_validation_end(_trainer(4, **{"val/loss": 0.4, "train/loss": float("inf")}), None)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["+search_space.bogus={path: optimizer.lrr, type: float, low: 0.1, high: 1.0}"],
         r"search_space.bogus: unknown parameter path 'optimizer.lrr'.*keys under optimizer: .*lr"),
        (["+search_space.bogus={path: nothing.here, type: int, low: 1, high: 4}"], "unknown parameter path 'nothing.here'"),
        (["search_space.lr.low=1.0", "search_space.lr.high=0.1"], "numeric low < high"),
        (["+search_space.p_uncond.choices=[1]"], "unknown field"),
        (["search_space.lr.type=loguniform"], "type 'loguniform' is not one of"),
        (["storage=sqlite:///:memory:"], "in-memory database cannot be resumed"),
        (["storage=sqlite:////proc/no-such-dir/s.db"], "is not writable"),
        (["study_name=my/study"], "study_name"),
        (["trainer.devices=2"], "every trial runs in this one process"),
        (["best_config=/tmp/best.yaml"], "expected <folder>/experiment/<name>.yaml"),
    ],
)
def test_bad_input_exits_2_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], match: str) -> None:
    assert main(_args(tmp_path / "no-data", tmp_path, 3, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m train.tune: error:") and len(err.splitlines()) == 1
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "study.db").exists()  # checked before the study exists


def test_storage_under_a_file_is_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(_args(tmp_path, tmp_path, 3, f"storage=sqlite:///{tmp_path}/afile/s.db")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/afile/s.db is not writable" in err and "pass storage=sqlite:///" in err


def test_cli_runs_a_trial_and_prints_the_best(latents: Path, tmp_path: Path) -> None:
    # `python -m train.tune` runs as __main__; each trial gets its reporter through the entry point's run()
    proc = subprocess.run([sys.executable, "-m", "train.tune", *_args(latents, tmp_path, 1)], cwd=ROOT, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = _study(tmp_path).best_trial
    assert sorted(best.intermediate_values) == [2, 4]
    assert f"tune: best trial 0: val/loss = {best.value:.6g} (minimize)" in proc.stdout
    assert f"hydra.searchpath=[file://{tmp_path}/cfg] experiment=best" in proc.stdout
    assert (tmp_path / "cfg" / "experiment" / "best.yaml").is_file()


@pytest.mark.parametrize("target,experiment", [("biflownet", "biflownet_tiny"), ("patchvolume", "ae_tiny"),
                                               ("biflownet", "biflownet_base"), ("patchvolume", "ae_8x_stage1")])
def test_default_search_spaces_fit_the_training_configs(target: str, experiment: str, tmp_path: Path) -> None:
    from train.tune import CONFIG_DIR, prepare

    with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        # multi-GPU presets must be narrowed to one device per trial
        job = prepare([f"target={target}", "study_name=s", f"experiment={experiment}", "trainer.devices=1"])
    assert job.params and job.metric == {"biflownet": "val/loss", "patchvolume": "val/psnr"}[target]
    # never into the source tree: under the study's own folder
    assert job.best_config == Path("outputs/tune/s/experiment/tuned_s.yaml") and job.base_experiment == experiment
