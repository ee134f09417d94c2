"""Failures that must not sink a study: a trial that always raises is retried, then reported FAILED (summary,
trials.csv, traceback kept, Optuna told FAIL) while the others finish; checkpoints are adapter-only and bounded;
Ctrl-C stops cleanly, keeps what finished and prints the resume command.

The OOM fallback's arithmetic (micro-batches with the same effective batch train the same) is tested in-process
in tests/test_trial.py; here it runs through Ray in tests/test_cluster.py (job runtime env -> trials)."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from tests.conftest import one_model_study
from tests.test_resume import StudyProcess
from tune_app.spec import config as config_mod
from tune_app.spec.rundir import STUDY, SUMMARY, TRIALS

EPOCHS = 2


def corrupt_copy(model_dir: str, out: Path) -> str:
    """The same tiny model with its weights file overwritten by garbage: every trial of it fails to load."""
    shutil.copytree(model_dir, out)
    (out / "model.safetensors").write_bytes(b"this is not a safetensors file" * 100)
    return str(out)


@pytest.mark.slow
def test_failing_trial_is_reported_and_the_study_completes(tmp_path, tiny_models, tweets_csv, ray_session):
    from tune_app.study.runner import run_study

    good = tiny_models("bert")
    broken = corrupt_copy(good, tmp_path / "broken-bert")
    study = {
        "name": "failures",
        "data": {"source": str(tweets_csv), "text": "text", "label": "target", "limit": 200, "max_length": 64},
        "models": {"good": {"checkpoint": good}, "broken": {"checkpoint": broken}},
        "space": {"lora_rank": {"choice": [2, 4]}},
        "train": {"epochs": EPOCHS, "batch_size": 16},
        "tune": {"num_samples": 1, "max_failures": 1, "keep_checkpoints": 1, "asha": {"enabled": False}},
        "output_dir": str(tmp_path / "runs"),
        "wandb": {"mode": "disabled"},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    summary = run_study(config_mod.load(tmp_path / "study.yaml"))

    run_dir = Path(summary["run_dir"])
    assert summary["complete"] is True and summary["finished_trials"] == 2
    assert summary["models"]["broken"]["failed"] == 1 and summary["models"]["broken"]["best_metric"] is None
    assert summary["models"]["good"]["completed"] == 1 and summary["best"]["model"] == "good"
    assert json.loads((run_dir / SUMMARY).read_text()) == summary

    rows = {r["model"]: r for r in csv.DictReader(open(run_dir / TRIALS))}
    assert rows["broken"]["status"] == "FAILED" and rows["good"]["status"] == "COMPLETED"
    traceback = (run_dir / rows["broken"]["error"]).read_text()
    # The whole stack down to the weights loader, once per attempt: the first try and max_failures (1) retry.
    assert "load_base" in traceback and "SafetensorError" in traceback, traceback[-2000:]
    assert traceback.count("Failure # ") == 2, traceback[-2000:]
    assert not rows["good"]["error"]
    assert summary["failed_trials"] == [{"trial_id": rows["broken"]["trial_id"], "model": "broken",
                                         "error": rows["broken"]["error"]}]

    # The searcher was told: the broken model's Optuna study holds the trial as FAIL, the good one as COMPLETE.
    import optuna

    def states(model: str) -> list:
        study = optuna.load_study(study_name=f"{run_dir.name}/{model}", storage=f"sqlite:///{run_dir / 'optuna.db'}")
        return [t.state for t in study.trials]

    assert states("broken") == [optuna.trial.TrialState.FAIL]
    assert states("good") == [optuna.trial.TrialState.COMPLETE]

    # Disk: after the study, keep_checkpoints (1) adapter-only checkpoint per trial, far smaller than the base.
    checkpoints = sorted(glob.glob(str(run_dir / "*" / "checkpoint_*")))
    assert len(checkpoints) == 1 and Path(checkpoints[0]).parent.name.startswith("good_"), checkpoints
    files = sorted(p.name for p in Path(checkpoints[0]).iterdir())
    assert "adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), files
    checkpoint_bytes = sum(p.stat().st_size for p in Path(checkpoints[0]).iterdir())
    assert checkpoint_bytes < 0.2 * Path(good, "model.safetensors").stat().st_size
    assert (run_dir / rows["good"]["checkpoint"]).resolve() == Path(checkpoints[0]).resolve()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_what_finished_and_says_how_to_resume(tmp_path, tiny_models, tweets_csv):
    study = one_model_study("ctrl-c", tiny_models("bert"), tweets_csv, tmp_path / "runs",
                            space={"lora_rank": {"choice": [2, 4]}}, epochs=EPOCHS, trials=2)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    with StudyProcess(["run", str(tmp_path / "study.yaml")]) as proc:
        proc.wait_for(lambda line: " completed |" in line, timeout=240)
        os.killpg(proc.pgid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rc = proc.finish(timeout=120)
    output = proc.output
    assert rc == 130, output[-3000:]

    run_dir = Path(glob.glob(str(tmp_path / "runs" / "ctrl-c-*"))[0])
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert (f"interrupted: {summary['finished_trials']} of 2 trials finished (kept); continue with: "
            f"tune-app resume {run_dir}") in output, output[-3000:]
    assert "Tuner.restore" not in output  # Ray Tune's own hint, for its Python API: one hint, ours
    assert summary["complete"] is False and summary["resume_command"] == f"tune-app resume {run_dir}"
    assert summary["finished_trials"] == 1 and summary["planned_trials"] == 2
    rows = list(csv.DictReader(open(run_dir / TRIALS)))
    assert len(rows) == summary["finished_trials"]  # what finished, and only that
    assert all(r["status"] == "COMPLETED" and int(r["epochs"]) == EPOCHS for r in rows), rows
    assert (run_dir / STUDY).is_file()
    # What was kept says it is partial: the report, and a bundle exported from it (the best so far).
    assert (f"**Interrupted: 1 of 2 trials finished; this report covers those. Continue with `tune-app resume "
            f"{run_dir}`.**") in (run_dir / "report.md").read_text()
    from tune_app import cli

    assert cli.main(["export", str(run_dir)]) == 0
    assert json.loads((run_dir / "best" / "bundle.json").read_text())["run_complete"] is False
    assert "the best of the 1 of 2 trials that finished before the study was interrupted" in \
        (run_dir / "best" / "README.md").read_text()
