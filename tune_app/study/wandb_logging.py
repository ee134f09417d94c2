"""Weights & Biases: one run per trial, offline by default. Imported only when W&B is on.

All of a study's runs live in ONE logging actor on the driver's node (W&B hosts several runs in a process with
`reinit="create_new"`). Ray's own `WandbLoggerCallback` starts a new actor process per trial instead: a Ray
worker plus a wandb import and service start, several CPU seconds per trial taken from the cores the trials
train on. Here a trial's run costs one `wandb.init` (about 0.2 s) in that shared actor, and the driver never
waits for it (measured on 2 cores: fixed overhead per trial 12.4 s with Ray's callback, 5.9 s with this one,
4.5 s without W&B; benchmarks/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tune_app.spec.config import WandbConfig
from tune_app.spec.space import MODEL_KEY

TUNE_BOOKKEEPING = {"done", "should_checkpoint", "config", "pid", "hostname", "node_ip", "timestamp", "date",
                    "trial_id", "experiment_tag", "checkpoint_dir_name", "iterations_since_restore",
                    "time_since_restore", "time_this_iter_s"}
"""Result keys Tune adds that say nothing about the trial's training (the rest, training_iteration and
time_total_s included, are logged)."""


class StudyRuns:
    """The logging actor: trial id -> its open W&B run. Methods run in call order (one caller, one thread)."""

    def __init__(self, init_kwargs: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self._common = init_kwargs
        # No per-run system monitor (every run would chart the same shared machine, and sampling costs the
        # trials CPU) and no console capture (this actor's output is not the trial's).
        self._settings = wandb.Settings(x_disable_stats=True, console="off")
        self._runs: dict[str, Any] = {}

    def start(self, trial_id: str, name: str, model: str, config: dict[str, Any]) -> None:
        if trial_id in self._runs:  # a trial retried after a failure goes on logging into its run
            return
        self._runs[trial_id] = self._wandb.init(
            id=trial_id, name=name, job_type=model, tags=[model], config=config, reinit="create_new",
            resume="allow", allow_val_change=True, settings=self._settings, **self._common)

    def log(self, trial_id: str, metrics: dict[str, Any], step: int | None) -> None:
        if (run := self._runs.get(trial_id)) is not None:
            run.log(metrics, step=step)

    def finish(self, trial_id: str, failed: bool = False) -> None:
        if (run := self._runs.pop(trial_id, None)) is not None:
            run.finish(exit_code=1 if failed else 0)

    def close(self) -> None:
        """Finish every open run and stop W&B's service (before Ray kills the actor, so that wandb's atexit hook
        does not print a "Connection lost" traceback)."""
        for trial_id in list(self._runs):
            self.finish(trial_id)
        self._wandb.teardown()


def loggable(result: dict[str, Any]) -> dict[str, Any]:
    """A Tune result's numbers worth a W&B chart: the trial's metrics, not Tune's bookkeeping."""
    return {k: v for k, v in result.items()
            if k not in TUNE_BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrialWandbCallback(Callback):
    """One W&B run per trial: id = trial id, name = <model>-<trial id>, group = the study run, job_type and tag =
    the model, config = the trial's hyperparameters, one history row per epoch.

    Offline runs land in <run_dir>/wandb/offline-run-* and are uploaded later with `wandb sync`. No API key is
    passed, written or printed: online mode uses the user's own `wandb login` or WANDB_API_KEY.
    """

    def __init__(self, settings: WandbConfig, *, run_name: str, run_dir: Path):
        self.init_kwargs = dict(project=settings.project, entity=settings.entity, group=run_name,
                                mode=settings.mode, dir=str(run_dir))
        self._runs = None  # the StudyRuns actor, started with the first trial

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment (resume)
        return {**self.__dict__, "_runs": None}

    def _actor(self):
        if self._runs is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            env = {k: os.environ[k] for k in ("WANDB_API_KEY",) if k in os.environ}  # login: ~/.netrc
            self._runs = ray.remote(StudyRuns).options(
                num_cpus=0, scheduling_strategy=here, runtime_env={"env_vars": env}).remote(self.init_kwargs)
        return self._runs

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        model = trial.config.get(MODEL_KEY, "model")
        self._actor().start.remote(trial.trial_id, f"{model}-{trial.trial_id}", model, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._actor().log.remote(trial.trial_id, loggable(result), result.get("training_iteration"))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._actor().finish.remote(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._actor().finish.remote(trial.trial_id, True)

    def on_experiment_end(self, trials, **info) -> None:
        if self._runs is None:
            return
        import ray

        try:
            ray.get(self._runs.close.remote(), timeout=300)  # online: the last runs finish their uploads
        except Exception as error:  # noqa: BLE001 - W&B trouble must never cost the study its results
            cause = getattr(error, "cause", None) or error  # a RayTaskError wraps what the actor raised
            print(f"[tune_app] W&B logging did not finish cleanly ({type(cause).__name__}: {cause}); the study's "
                  f"results are not affected", flush=True)
        finally:
            ray.kill(self._runs)
            self._runs = None
