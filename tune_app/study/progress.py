"""Live progress: one line per epoch result and per finished trial (why it finished), with the counts and the best
so far; and, while epochs run, where each running trial is inside its epoch.

Trials tell a board (a small actor on the driver's node, `tune_app.study.board`) their step every few seconds, by
calls that do not wait (`tune_app.train.heartbeat.Heartbeat`: no device sync, nothing the step waits on). The
printer reads the board between Tune's steps: on a terminal, one status line redrawn in place every TTY_EVERY_S; to a
file or a pipe (`ray job logs`, CI), a plain line every PLAIN_EVERY_S.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from tune_app.spec.metrics import better
from tune_app.spec.space import MODEL_KEY
from tune_app.study.board import BOARD

TTY_EVERY_S = 2.0
PLAIN_EVERY_S = 20.0


def describe(where: dict[str, Any]) -> str:
    """`epoch 1 16% (step 120/762), 11.3 samples/s, ETA 4m10s` of one trial's last heartbeat."""
    step, steps = where["step"], max(1, where["steps"])
    rate = where["samples"] / where["seconds"] if where["seconds"] > 0 else 0.0
    eta = where["seconds"] * (steps - step) / step if step else None
    return (f"epoch {where['epoch']} {100 * step / steps:.0f}% (step {step}/{steps}), {rate:.1f} samples/s, "
            f"ETA {_duration(eta)}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressPrinter(Callback):
    def __init__(self, metric: str, mode: str, total: int, stream=None, epochs: int | None = None):
        self.metric, self.mode, self.total, self.epochs = metric, mode, total, epochs
        # Resolved at print time, never stored: Tune pickles its callbacks, and sys.stdout under pytest or
        # Jupyter cannot be pickled. The board is found by name for the same reason (a resume restores this).
        self.stream = stream
        self.best: dict[str, tuple[float, str]] = {}
        self.start = time.monotonic()
        self._shown = 0.0  # when the in-epoch progress was last shown
        self._status = False  # a status line is on the terminal now (cleared before any other line)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_status": False}

    @property
    def _out(self):
        return self.stream or sys.stdout

    def _tty(self) -> bool:
        return bool(getattr(self._out, "isatty", lambda: False)())

    def _print(self, text: str) -> None:
        if self._status:  # the status line gives way to the line, and is drawn again at the next refresh
            self._out.write("\r\033[K")
            self._status = False
        print(text, file=self._out, flush=True)

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
        self._print(f"[{self._elapsed():7.0f}s] {text} | {counts} | best {self.metric}: {best or '-'}")

    def _elapsed(self) -> float:
        return time.monotonic() - self.start

    def _consider(self, model: str, value: float, trial_id: str) -> None:
        if model not in self.best or better(value, self.best[model][0], self.mode):
            self.best[model] = (value, trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"{trial.config.get(MODEL_KEY, '?')} {trial.trial_id} started", trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        model = trial.config.get(MODEL_KEY, "?")
        value = result.get(self.metric)
        if value is not None:
            self._consider(model, value, trial.trial_id)
        self._line(f"{model} {trial.trial_id} epoch {result.get('training_iteration')}: "
                   f"{self.metric}={value:.4f}" if value is not None else f"{model} {trial.trial_id}", trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = (trial.last_result or {}).get("training_iteration")
        why = ("stopped by ASHA at epoch " + str(epochs) if self.epochs and epochs and epochs < self.epochs
               else "completed")
        self._line(f"{trial.config.get(MODEL_KEY, '?')} {trial.trial_id} {why}", trials, finished=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{trial.config.get(MODEL_KEY, '?')} {trial.trial_id} FAILED (traceback in the run directory)",
                   trials)

    def on_step_end(self, iteration, trials, **info):
        """Where the running trials are inside their epochs, from the board: redrawn in place on a terminal, a
        plain line now and then otherwise."""
        tty = self._tty()
        now = time.monotonic()
        if now - self._shown < (TTY_EVERY_S if tty else PLAIN_EVERY_S):
            return
        self._shown = now
        running = [t for t in trials if t.status == "RUNNING"]
        where = self._snapshot([t.trial_id for t in running])
        parts = [f"{t.config.get(MODEL_KEY, '?')} {t.trial_id} {describe(where[t.trial_id])}"
                 for t in running if t.trial_id in where]
        if not parts:
            return
        text = f"[{self._elapsed():7.0f}s] in progress: " + "; ".join(parts)
        if tty:  # one line, cut to the terminal's width: a wrapped line could not be redrawn in place
            import shutil

            width = shutil.get_terminal_size().columns
            self._out.write("\r\033[K" + (text if len(text) < width else text[:width - 2] + "…"))
            self._out.flush()
            self._status = True
        else:
            self._print(text)

    def on_experiment_end(self, trials, **info):
        if self._status:
            self._out.write("\r\033[K")
            self._status = False

    @staticmethod
    def _snapshot(trial_ids: list[str]) -> dict[str, dict[str, Any]]:
        try:
            import ray

            return ray.get(ray.get_actor(BOARD).snapshot.remote(trial_ids), timeout=2)
        except Exception:  # noqa: BLE001 - no board (a benchmark without one) or a slow moment: nothing to show
            return {}
