"""Live progress: one line per epoch result and per finished trial, with the counts and the best so far."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from tune_app.spec.metrics import better
from tune_app.spec.space import MODEL_KEY


class ProgressPrinter(Callback):
    def __init__(self, metric: str, mode: str, total: int, stream=None):
        self.metric, self.mode, self.total = metric, mode, total
        # Resolved at print time, never stored: Tune pickles its callbacks, and sys.stdout under pytest or
        # Jupyter cannot be pickled.
        self.stream = stream
        self.best: dict[str, tuple[float, str]] = {}
        self.start = time.monotonic()

    def _line(self, text: str, trials, finished=None) -> None:
        # Tune calls on_trial_complete before it marks the trial TERMINATED (on_trial_error after it marks the
        # trial ERROR): count a finished trial as done already.
        states = ["TERMINATED" if t is finished else t.status for t in trials]
        for t in trials:  # trials restored by a resume bring their results (Tune's metric_analysis) with them
            seen = (getattr(t, "metric_analysis", None) or {}).get(self.metric)
            if seen and seen.get(self.mode) is not None:
                self._consider(t.config.get(MODEL_KEY, "?"), seen[self.mode], t.trial_id)
        counts = (f"running {states.count('RUNNING')}, done {states.count('TERMINATED')}, "
                  f"failed {states.count('ERROR')}, pending {states.count('PENDING')} of {self.total}")
        best = "; ".join(f"{m} {v:.4f}" for m, (v, _) in sorted(self.best.items()))
        elapsed = time.monotonic() - self.start
        print(f"[{elapsed:7.0f}s] {text} | {counts} | best {self.metric}: {best or '-'}",
              file=self.stream or sys.stdout, flush=True)

    def _consider(self, model: str, value: float, trial_id: str) -> None:
        if model not in self.best or better(value, self.best[model][0], self.mode):
            self.best[model] = (value, trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        model = trial.config.get(MODEL_KEY, "?")
        value = result.get(self.metric)
        if value is not None:
            self._consider(model, value, trial.trial_id)
        self._line(f"{model} {trial.trial_id} epoch {result.get('training_iteration')}: "
                   f"{self.metric}={value:.4f}" if value is not None else f"{model} {trial.trial_id}", trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(f"{trial.config.get(MODEL_KEY, '?')} {trial.trial_id} finished", trials, finished=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{trial.config.get(MODEL_KEY, '?')} {trial.trial_id} FAILED (traceback in the run directory)",
                   trials)
