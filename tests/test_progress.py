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
        "m a1 finished | running 1, done 1, failed 0, pending 0 of 2 | best f1: m 0.5000",
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
