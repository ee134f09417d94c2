"""Weights & Biases: one run per trial, offline by default. Imported only when W&B is on."""

from __future__ import annotations

import os
from pathlib import Path

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

from tune_app.config import WandbConfig


class _ClosingWandbLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor, which also shuts its W&B service down before Ray kills the actor.

    Without this, wandb's own atexit hook runs after the service is gone and prints a
    "ConnectionResetError: Connection lost" traceback for every trial.
    """

    def run(self):
        try:
            super().run()
        finally:
            self._wandb.teardown()


class TrialWandbCallback(WandbLoggerCallback):
    """Ray's W&B logger with our naming: group = the study run, job_type = the model, name = model-trial id.

    Offline runs land in <run_dir>/wandb/offline-run-* and are uploaded later with `wandb sync`. No API key is
    passed, written or printed: online mode uses the user's own `wandb login` or WANDB_API_KEY.
    """

    _logger_actor_cls = _ClosingWandbLoggingActor

    def __init__(self, settings: WandbConfig, *, run_name: str, run_dir: Path):
        super().__init__(project=settings.project, entity=settings.entity, group=run_name, mode=settings.mode,
                         dir=str(run_dir), log_config=False)

    def setup(self, *args, **kwargs) -> None:
        # Ray demands an API key unless the WANDB_MODE variable says offline; our YAML's `wandb.mode: offline`
        # needs none either, so Ray is shown that mode while it checks (and the user's environment is restored).
        if self.kwargs.get("mode") != "offline":
            return super().setup(*args, **kwargs)
        before = os.environ.get("WANDB_MODE")
        os.environ["WANDB_MODE"] = "offline"
        try:
            super().setup(*args, **kwargs)
        finally:
            if before is None:
                del os.environ["WANDB_MODE"]
            else:
                os.environ["WANDB_MODE"] = before

    def log_trial_start(self, trial) -> None:
        model = trial.config.get("model", "model")
        self.kwargs.update(job_type=model, tags=[model])
        super().log_trial_start(trial)
        # Ray names runs after the trainable; ours read "<model>-<trial id>".

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
        wandb_init_kwargs["name"] = f"{trial.config.get('model', 'model')}-{trial.trial_id}"
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def __del__(self):
        # Ray's __del__ talks to actors at interpreter exit and prints "Exception ignored in ...__del__".
        # Logging actors are already finished by on_experiment_end; nothing is left to flush here.
        try:
            super().__del__()
        except Exception:  # noqa: BLE001
            pass
