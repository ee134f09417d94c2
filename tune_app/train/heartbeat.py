"""A trial's heartbeat: where it is inside its epoch, told to the study's progress board (tune_app.study.board)."""

from __future__ import annotations

import time

HEARTBEAT_S = 5.0
"""Seconds between a trial's heartbeats to the progress board."""


class Heartbeat:
    """Tells the study's progress board where a trial is inside its epoch, at most every HEARTBEAT_S seconds, by a
    call that does not wait: the step never syncs the device or waits on the driver for it."""

    def __init__(self, board, trial_id: str):
        self.board, self.trial_id, self.last = board, trial_id, 0.0

    def __call__(self, epoch: int, step: int, steps: int, samples: int, seconds: float, *, force: bool = False):
        now = time.monotonic()
        if self.board is None or (now - self.last < HEARTBEAT_S and not force):
            return
        self.last = now
        self.board.update.remote(self.trial_id, {"epoch": epoch, "step": step, "steps": steps, "samples": samples,
                                                 "seconds": seconds})
