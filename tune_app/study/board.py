"""The study's progress board: a small actor on the driver's node that each running trial tells where it is inside
its epoch (`tune_app.train.heartbeat.Heartbeat`), and that the progress printer (`tune_app.study.progress`) reads.

Kept apart from the printer, which is a Ray Tune callback: every process that unpickles a handle to the board (the
board's own, every pack's) loads this module, and importing Ray Tune would cost each of them seconds of a core
(it imports pandas) before it could start its work.
"""

from __future__ import annotations

from typing import Any

BOARD = "tune_app-progress"
"""The board's actor name: one per Ray cluster, trials keyed by their (unique) Tune trial id."""


class ProgressBoard:
    """Where each running trial is inside its epoch, as its heartbeats said last (a Ray actor: `start_board`)."""

    def __init__(self):
        self.trials: dict[str, dict[str, Any]] = {}

    def update(self, trial_id: str, where: dict[str, Any]) -> None:
        self.trials[trial_id] = where

    def snapshot(self, trial_ids: list[str]) -> dict[str, dict[str, Any]]:
        return {t: self.trials[t] for t in trial_ids if t in self.trials}


def start_board():
    """The cluster's progress board (started, or the one a study on this cluster started before)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).options(name=BOARD, get_if_exists=True).remote()
