"""Resumable optuna search over the training config of train_BiFlowNet or train_PatchVolume.

    python -m train.tune target=biflownet study_name=my-study storage=sqlite:///outputs/tune/my-study.db n_trials=20
        experiment=biflownet_tiny paths.data_dir=outputs/demo/data trainer.max_steps=2000
    python -m train.tune target=patchvolume study_name=ae-lr search_space.lr.high=1e-2 experiment=ae_tiny

Arguments whose first key is a key of ``config/tune.yaml`` (target, study_name, storage, n_trials,
search_space, pruner, ...) configure the search; all others are Hydra overrides of the training config.
Each trial composes the training config with those overrides plus its sampled parameters, writes its
run to ``<tune_dir>/trial_<number>`` and reports the validation metric after every validation so the
pruner can stop it early. A NaN/Inf loss or metric prunes the trial. Rerunning the same command resumes
the study: finished trials are kept, trials cut short by an interruption or a crash are run again with
the same parameters under new numbers, and only the missing trials are added. The best parameters are
printed and saved (atomically, after every new best) as an experiment config under the study's folder,
``<tune_dir>/experiment/tuned_<study_name>.yaml`` (``best_config=...`` to change it):
``python -m train.train_BiFlowNet hydra.searchpath=[file://<tune_dir>] experiment=tuned_my-study ...``.

Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import optuna
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.trial import FrozenTrial, TrialState

from dataset.cli import quiet_libraries, run_cli
from dataset.io import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARAM_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}


# ----------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class SearchParam:
    """One searched value: optuna parameter ``name`` sets the training-config key ``path``."""

    name: str
    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = field(default_factory=tuple)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample this parameter for ``trial`` (a queued trial gets its fixed value back)."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))


_ABSENT = object()


def _has_key(cfg: DictConfig, path: str) -> bool | str:
    """True if ``path`` (dotted) is a value in ``cfg``; "node" if it names a sub-config; False if absent."""
    value = OmegaConf.select(cfg, path, default=_ABSENT, throw_on_resolution_failure=False)
    if value is _ABSENT:
        return False
    return "node" if isinstance(value, DictConfig) else True


def parse_search_space(space: DictConfig | None, train_cfg: DictConfig, config_name: str) -> list[SearchParam]:
    """Check the search space against the composed training config and return its parameters.

    Raises:
        ValueError: empty space, an entry without a known type or with bad bounds, or a ``path`` that is
            not a key of ``train_cfg`` (named, with the keys that do exist next to it).
    """
    if space is None or len(space) == 0:
        raise ValueError("search_space is empty; pick one (search_space=biflownet) or add entries")
    params = []
    for name, entry in OmegaConf.to_container(space, resolve=True).items():
        where = f"search_space.{name}"
        if not isinstance(entry, dict) or "path" not in entry or "type" not in entry:
            raise ValueError(f"{where}: expected a mapping with `path` and `type`, got {entry!r}")
        kind, path = entry["type"], str(entry["path"])
        if kind not in PARAM_TYPES:
            raise ValueError(f"{where}: type {kind!r} is not one of {sorted(PARAM_TYPES)}")
        unknown = set(entry) - PARAM_TYPES[kind] - {"path", "type"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} for type {kind} "
                             f"(allowed: path, type, {', '.join(sorted(PARAM_TYPES[kind]))})")
        found = _has_key(train_cfg, path)
        if found is False:
            parent = path.rpartition(".")[0]
            sub = OmegaConf.select(train_cfg, parent) if parent else train_cfg
            near = f"; keys under {parent or 'the top level'}: {', '.join(map(str, sub.keys()))}" if isinstance(sub, DictConfig) else ""
            raise ValueError(f"{where}: unknown parameter path '{path}' - not a key of the composed {config_name} "
                             f"config{near}")
        if found == "node":
            raise ValueError(f"{where}: '{path}' is a whole sub-config of {config_name}; name one value inside it")
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: categorical needs a non-empty list `choices`, got {choices!r}")
            if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise ValueError(f"{where}: choices must be numbers, strings, booleans or null, got {choices!r}")
            params.append(SearchParam(name, path, kind, choices=tuple(choices)))
            continue
        low, high, log, step = entry.get("low"), entry.get("high"), bool(entry.get("log", False)), entry.get("step")
        numeric = (int,) if kind == "int" else (int, float)
        if not all(isinstance(v, numeric) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ValueError(f"{where}: {kind} needs numeric low < high, got low={low!r} high={high!r}")
        if log and low <= 0:
            raise ValueError(f"{where}: log scale needs low > 0, got low={low}")
        if log and step not in (None, 1):
            raise ValueError(f"{where}: log scale and step={step} cannot be combined")
        params.append(SearchParam(name, path, kind, low, high, log, step))
    return params


def override_value(value: Any) -> str:
    """A Python value as the right-hand side of a Hydra override (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override")


# ------------------------------------------------------------------------- trial reporting
class TrialReporter(L.Callback):
    """Reports ``metric`` to the optuna trial after every validation and prunes the run when asked to.

    Any non-finite logged value (training loss or validation metric) prunes the trial at once.
    The exception that stopped the fit is kept in ``exception`` (Lightning turns Ctrl-C into SystemExit).
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.exception: BaseException | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        bad = sorted(k for k, v in trainer.callback_metrics.items() if not math.isfinite(float(v)))
        if bad:
            self.trial.set_user_attr("pruned_reason", f"non-finite {', '.join(bad)} at step {step}")
            raise optuna.TrialPruned(f"non-finite {', '.join(bad)} at step {step}")
        if self.metric not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.metric]), step=step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_reason", f"{self.metric} below the pruner's bar at step {step}")
            raise optuna.TrialPruned(f"pruned at step {step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.exception = exception


# ------------------------------------------------------------------------------- the search
@dataclass
class TuneJob:
    """Everything a search needs, checked before any trial runs."""

    cfg: DictConfig
    train_overrides: list[str]
    params: list[SearchParam]
    config_name: str
    entry: str
    metric: str
    direction: str
    tune_dir: Path
    best_config: Path
    base_experiment: str | None


def split_args(args: list[str], tune_keys: set[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` arguments into (search overrides, training overrides) by their first key."""
    tune, train = [], []
    for arg in args:
        if "=" not in arg and not arg.startswith("~"):
            raise ValueError(f"argument {arg!r} is not a Hydra override (key=value); see `python -m train.tune --help`")
        key = arg.lstrip("~+").split("=", 1)[0]
        (tune if re.split(r"[./@]", key, maxsplit=1)[0] in tune_keys else train).append(arg)
    return tune, train


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return hydra.compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"cannot compose {config_name} with {' '.join(overrides)}: {message}") from e


def _base_experiment(overrides: list[str]) -> str | None:
    chosen = None
    for arg in overrides:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "experiment":
            chosen = None if value in ("", "null") else value.strip("'\"")
    return chosen


def prepare(args: list[str]) -> TuneJob:
    """Compose the search and training configs from command-line ``args`` and check them (needs Hydra initialised).

    Raises:
        ValueError: missing/unknown target, bad study name, training overrides that do not compose,
            a search space that names unknown keys, or a trainer that would start several processes.
    """
    tune_keys = {k for k in OmegaConf.load(CONFIG_DIR / "tune.yaml") if k != "defaults"} | {"search_space"}
    tune_args, train_args = split_args(args, tune_keys)
    chooses_space = any(a.lstrip("~+").split("=", 1)[0] == "search_space" for a in tune_args)
    # the default space follows the target, so edits of it (search_space.lr.high=...) wait for the second compose
    cfg = _compose("tune", tune_args if chooses_space else [a for a in tune_args if not a.lstrip("~+").startswith("search_space")])
    for key in ("target", "study_name"):
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"{key}=... is required (targets: {', '.join(cfg.targets)})")
    if cfg.target not in cfg.targets:
        raise ValueError(f"target={cfg.target} is not one of {', '.join(cfg.targets)}")
    if not STUDY_NAME.match(str(cfg.study_name)):
        raise ValueError(f"study_name={cfg.study_name!r}: use letters, digits, '_' and '-' (it names files)")
    if not chooses_space:
        cfg = _compose("tune", [f"search_space={cfg.target}", *tune_args])
    if not isinstance(cfg.n_trials, int) or cfg.n_trials < 1:
        raise ValueError(f"n_trials={cfg.n_trials}: expected a positive integer")
    target = cfg.targets[cfg.target]
    direction = cfg.direction or target.direction
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction}: expected minimize or maximize")

    train_cfg = _compose(target.config, train_args)
    params = parse_search_space(cfg.search_space, train_cfg, target.config)
    devices, nodes = train_cfg.trainer.get("devices", 1), int(train_cfg.trainer.get("num_nodes", 1))
    if devices == "auto":
        train_args = [*train_args, "trainer.devices=1"]  # one process per trial; see the README for parallel workers
    elif nodes != 1 or (devices if isinstance(devices, int) else len(devices)) != 1:
        raise ValueError(f"trainer.devices={devices} num_nodes={nodes}: every trial runs in this one process; use "
                         "trainer.devices=1 and start one `python -m train.tune` per GPU on the same storage")
    base = _base_experiment(train_args)
    best = Path(cfg.best_config) if cfg.best_config else CONFIG_DIR / "experiment" / f"tuned_{cfg.study_name}.yaml"
    if best.suffix != ".yaml" or best.parent.name != "experiment":
        raise ValueError(f"best_config={best}: expected <folder>/experiment/<name>.yaml, so Hydra finds it as experiment=<name>")
    if base and base == best.stem:
        raise ValueError(f"experiment={base} is the file this search writes its best parameters to; copy it to a new name")
    return TuneJob(cfg, train_args, params, target.config, target.entry, cfg.metric or target.metric, direction,
                   Path(cfg.tune_dir), best, base)


def open_storage(url: str, job: TuneJob) -> optuna.storages.RDBStorage:
    """Open (create) the study database; stale RUNNING trials are failed and queued again.

    Raises:
        ValueError: an in-memory SQLite URL, an SQLite file whose folder cannot be created or written, or
            any other storage that cannot be opened.
    """
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises several types for malformed URLs
        raise ValueError(f"storage={url}: not a database URL ({e}); e.g. sqlite:///outputs/tune/my-study.db") from e
    if parsed.drivername.startswith("sqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"storage={url}: an in-memory database cannot be resumed; give a file, sqlite:///path.db")
        db = Path(parsed.database)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=db.parent):
                pass
            if db.exists():
                with open(db, "ab"):
                    pass
        except OSError as e:
            raise ValueError(f"storage={url}: the SQLite file {db} is not writable ({e.strerror or e}); "
                             "pass storage=sqlite:///<writable folder>/<name>.db") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            # optuna 4.9 renamed failed_trial_callback; requirements.txt allows older releases too
            names = inspect.signature(optuna.storages.RDBStorage).parameters
            stale = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names else "failed_trial_callback"
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=job.cfg.heartbeat_interval,
                grace_period=job.cfg.grace_period,
                **{stale: lambda study, trial: requeue(study, trial, job.cfg.max_retry)},
            )
        except Exception as e:  # noqa: BLE001 - sqlalchemy/optuna errors for unreachable or unwritable storages
            raise ValueError(f"storage={parsed.render_as_string(hide_password=True)}: cannot open it ({e})") from e


def requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial, max_retry: int) -> None:
    """Queue ``trial``'s parameters again (new trial number) unless they were already tried 1 + max_retry times."""
    attrs = trial.user_attrs
    attempt = int(attrs.get("attempt", 1))
    if attempt > max_retry:
        print(f"tune: trial {trial.number} failed on attempt {attempt}; not retried (max_retry={max_retry})", file=sys.stderr)
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "attempt": attempt + 1})
    print(f"tune: trial {trial.number} did not finish; its parameters are queued again", flush=True)


def _close_wandb() -> None:
    # Lightning leaves a W&B run open; finish it so its files are complete and the next trial gets its own run
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _objective(job: TuneJob, study: optuna.Study, trial: optuna.Trial) -> float:
    from ddpm.biflownet_module import NonFiniteLossError
    from train.common import NonFiniteWeightsError

    n = trial.number
    out_dir = job.tune_dir / f"trial_{n}"
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists, so this study's trial {n} would mix with an older run; "
                         f"the study database was probably replaced - move {job.tune_dir} away or use another study_name")
    values = {p.path: p.suggest(trial) for p in job.params}
    trial.set_user_attr("overrides", values)
    overrides = [*job.train_overrides, *(f"{path}={override_value(v)}" for path, v in values.items()),
                 f"run_name=trial_{n}", f"paths.output_dir={override_value(str(out_dir))}", "ckpt_path=null"]
    cfg = _compose(job.config_name, overrides)
    reporter = TrialReporter(trial, job.metric)
    run = importlib.import_module(job.entry).run
    try:
        result = run(cfg, callbacks=[reporter])
    except optuna.TrialPruned:
        raise
    except (NonFiniteLossError, NonFiniteWeightsError) as e:
        trial.set_user_attr("pruned_reason", str(e))
        raise optuna.TrialPruned(str(e)) from e
    except (ValueError, FileNotFoundError):
        raise
    except SystemExit as e:
        # Lightning answers Ctrl-C with a graceful shutdown and sys.exit(1); report it as the interruption it is,
        # so optuna marks the trial failed instead of leaving it RUNNING
        requeue(study, trial, job.cfg.max_retry)
        if isinstance(reporter.exception, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise RuntimeError(f"training of trial {n} exited with code {e.code}") from e
    except BaseException:
        requeue(study, trial, job.cfg.max_retry)
        raise
    finally:
        _close_wandb()
    if job.metric not in result["metrics"]:
        raise ValueError(f"metric {job.metric} was never logged by {job.entry} (logged: {sorted(result['metrics'])}); "
                         "set metric=<one of them> or validate at least once (trainer.val_check_interval)")
    value = float(result["metrics"][job.metric])
    if not math.isfinite(value):
        trial.set_user_attr("pruned_reason", f"non-finite final {job.metric}")
        raise optuna.TrialPruned(f"non-finite final {job.metric} ({value})")
    return value


def train_command(job: TuneJob) -> str:
    """How to train with the saved best config (a config outside config/experiment needs a search path)."""
    where = job.best_config.resolve().parent
    if where == CONFIG_DIR / "experiment":
        return f"python -m {job.entry} experiment={job.best_config.stem}"
    return f"python -m {job.entry} hydra.searchpath=[file://{where.parent}] experiment={job.best_config.stem}"


def best_config_text(job: TuneJob, study: optuna.Study) -> str:
    """The best trial as an experiment config (``# @package _global_``) on top of the searched experiment."""
    best = study.best_trial
    body = OmegaConf.create({"defaults": [f"/experiment/{job.base_experiment}", "_self_"]} if job.base_experiment else {})
    for path, value in best.user_attrs.get("overrides", {}).items():
        OmegaConf.update(body, path, value, force_add=True)
    searched = " ".join(job.train_overrides) or "(none)"
    return (
        "# @package _global_\n"
        f"# Best trial of optuna study '{job.cfg.study_name}': trial {best.number}, {job.metric} = {best.value:.6g} "
        f"({job.direction}).\n"
        "# Written by `python -m train.tune`. The search ran with these training overrides (add the data, path\n"
        f"# and trainer ones you still want):\n#   {searched}\n"
        f"#   {train_command(job)}\n"
        + OmegaConf.to_yaml(body)
    )


def _save_if_best(job: TuneJob, study: optuna.Study, trial: FrozenTrial) -> None:
    if trial.state != TrialState.COMPLETE or study.best_trial.number != trial.number:
        return
    atomic_write_text(job.best_config, best_config_text(job, study))


def load_study(job: TuneJob) -> optuna.Study:
    """Create or resume the named study; fail stale trials; check it was made for the same target and metric."""
    storage = open_storage(job.cfg.storage, job)
    try:
        existing = len(storage.get_all_trials(storage.get_study_id_from_name(job.cfg.study_name)))
    except KeyError:
        existing = 0
    sampler_cfg = OmegaConf.to_container(job.cfg.sampler, resolve=True)
    if sampler_cfg.get("seed") is not None:
        sampler_cfg["seed"] = int(sampler_cfg["seed"]) + existing  # a resumed search must not replay the first samples
    study = optuna.create_study(
        study_name=job.cfg.study_name, storage=storage, load_if_exists=True, direction=job.direction,
        sampler=hydra.utils.instantiate(sampler_cfg), pruner=hydra.utils.instantiate(job.cfg.pruner),
    )
    made_for = {"target": job.cfg.target, "metric": job.metric, "direction": job.direction}
    if not study.user_attrs:
        for key, value in {**made_for, "train_overrides": job.train_overrides}.items():
            study.set_user_attr(key, value)
    for key, value in made_for.items():
        if study.user_attrs.get(key) != value:
            raise ValueError(f"study {job.cfg.study_name} in {job.cfg.storage} was made with {key}="
                             f"{study.user_attrs.get(key)}, not {value}; use another study_name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study


def search(args: list[str]) -> optuna.Study:
    """Run (or resume) the search described by command-line ``args``; return the study.

    Raises:
        ValueError, FileNotFoundError: bad input, before any trial where it can be checked up front.
        KeyboardInterrupt: the search was interrupted; rerunning the same command resumes it.
    """
    with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="tune"):
        job = prepare(args)
        study = load_study(job)
        done = sum(t.state in FINISHED for t in study.trials)
        if done:
            print(f"tune: study {job.cfg.study_name}: {done} of {job.cfg.n_trials} trials already finished", flush=True)
        if done < job.cfg.n_trials:
            study.optimize(
                lambda trial: _objective(job, study, trial), n_trials=job.cfg.n_trials - done, timeout=job.cfg.timeout,
                callbacks=[optuna.study.MaxTrialsCallback(job.cfg.n_trials, states=FINISHED),
                           lambda s, t: _save_if_best(job, s, t)],
                gc_after_trial=True,
            )
        report_best(job, study)
    return study


def report_best(job: TuneJob, study: optuna.Study) -> None:
    """Print the best trial and (re)write its experiment config."""
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        print(f"tune: study {job.cfg.study_name} has no completed trial yet", flush=True)
        return
    best = study.best_trial
    atomic_write_text(job.best_config, best_config_text(job, study))
    lines = [f"tune: best trial {best.number}: {job.metric} = {best.value:.6g} ({job.direction})"]
    lines += [f"  {path} = {value}" for path, value in best.user_attrs.get("overrides", {}).items()]
    lines += [f"tune: saved {job.best_config}; train with it:", f"  {train_command(job)}"]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: bad input -> one line on stderr and 2; interrupted -> 130 (one line)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    quiet_libraries()
    return run_cli("python -m train.tune", lambda: search(argv) and None,
                   interrupted="rerun the same command to resume the study")


if __name__ == "__main__":
    sys.exit(main())
