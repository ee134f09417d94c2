"""The live progress line: counts as the user reads them."""

from __future__ import annotations

import io

from ray.tune.experiment import Trial

from tune_app.study.progress import ProgressPrinter


def test_a_trial_that_just_ended_counts_as_done_or_failed():
    """Tune calls on_trial_complete before it marks the trial TERMINATED (Ray 2.60's TuneController.stop_trial),
    and on_trial_error after it marks it ERROR: either line counts the trial as ended, not as still running."""
    first, second = (Trial("t", config={"model": "m"}, trial_id=tid, stub=True) for tid in ("a1", "b2"))
    for trial in (first, second):
        trial.set_status(Trial.RUNNING)
    out = io.StringIO()
    printer = ProgressPrinter("f1", "max", 2, stream=out)
    printer.on_trial_result(1, [first, second], first, {"f1": 0.5, "training_iteration": 1})
    printer.on_trial_complete(1, [first, second], first)
    first.set_status(Trial.TERMINATED)
    second.set_status(Trial.ERROR)
    printer.on_trial_error(1, [first, second], second)
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        "m a1 epoch 1: f1=0.5000 | running 2, done 0, failed 0, pending 0 of 2 | best f1: m 0.5000",
        "m a1 completed | running 1, done 1, failed 0, pending 0 of 2 | best f1: m 0.5000",
        "m b2 FAILED (traceback in the run directory) | running 0, done 1, failed 1, pending 0 of 2 "
        "| best f1: m 0.5000",
    ]


def test_best_so_far_includes_trials_a_resume_restored():
    """A resumed study's Tune trials carry the results they had (metric_analysis): the best so far counts them
    from the first line on, not only what the resumed session reports."""
    done, running = (Trial("t", config={"model": "m"}, trial_id=tid, stub=True) for tid in ("old1", "new2"))
    done.update_last_result({"f1": 0.59, "training_iteration": 1})
    done.update_last_result({"f1": 0.55, "training_iteration": 2})  # the best epoch was the first
    done.set_status(Trial.TERMINATED)
    running.set_status(Trial.RUNNING)
    out = io.StringIO()
    ProgressPrinter("f1", "max", 2, stream=out).on_trial_result(1, [done, running], running,
                                                                 {"f1": 0.40, "training_iteration": 1})
    assert out.getvalue().rstrip().endswith("| best f1: m 0.5900")


def test_the_line_that_ends_a_trial_says_why():
    stopped, completed = (Trial("t", config={"model": "m"}, trial_id=tid, stub=True) for tid in ("s1", "c2"))
    stopped.update_last_result({"f1": 0.4, "training_iteration": 1})
    completed.update_last_result({"f1": 0.6, "training_iteration": 3})
    out = io.StringIO()
    printer = ProgressPrinter("f1", "max", 2, stream=out, epochs=3)
    printer.on_trial_complete(1, [stopped, completed], stopped)
    printer.on_trial_complete(1, [stopped, completed], completed)
    lines = [line.split("] ", 1)[1].split(" |")[0] for line in out.getvalue().splitlines()]
    assert lines == ["m s1 stopped by ASHA at epoch 1", "m c2 completed"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_epoch_progress_from_the_board(ray_session, monkeypatch):
    """Heartbeats reach the board without waiting; the printer shows the running trials' step, samples/s and ETA:
    a plain line to a file, one status line redrawn in place on a terminal, cleared before any other line."""
    import time

    import ray

    from tune_app.study.board import start_board
    from tune_app.train import heartbeat

    board = start_board()
    assert start_board()._actor_id == board._actor_id  # one per cluster: found again by name
    beat = heartbeat.Heartbeat(board, "a1")
    beat(1, 1, 10, 8, 2.0, force=True)
    beat(1, 2, 10, 16, 4.0)  # within HEARTBEAT_S of the last: not sent
    assert ray.get(board.snapshot.remote(["a1"]))["a1"]["step"] == 1
    beat(1, 5, 10, 40, 10.0, force=True)
    running = Trial("t", config={"model": "m"}, trial_id="a1", stub=True)
    running.set_status(Trial.RUNNING)
    waiting = Trial("t", config={"model": "m"}, trial_id="b2", stub=True)  # no heartbeat yet: not shown

    plain = io.StringIO()
    printer = ProgressPrinter("f1", "max", 2, stream=plain)
    deadline = time.monotonic() + 10
    while "in progress" not in plain.getvalue() and time.monotonic() < deadline:
        printer._shown = 0.0
        printer.on_step_end(1, [running, waiting])
    assert plain.getvalue().split("] ", 1)[1] == \
        "in progress: m a1 epoch 1 50% (step 5/10), 4.0 samples/s, ETA 10s\n"
    printer.on_step_end(1, [running, waiting])  # within PLAIN_EVERY_S: nothing more
    assert plain.getvalue().count("in progress") == 1

    terminal = Terminal()
    printer = ProgressPrinter("f1", "max", 2, stream=terminal)
    printer.on_step_end(1, [running, waiting])
    assert terminal.getvalue().startswith("\r\033[K[") and not terminal.getvalue().endswith("\n")
    printer.on_trial_result(1, [running, waiting], running, {"f1": 0.5, "training_iteration": 1})
    status, result = terminal.getvalue().split("\r\033[K")[1:]
    assert "in progress: m a1 epoch 1 50%" in status and result.endswith("best f1: m 0.5000\n")
