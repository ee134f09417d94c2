"""`tune-app resume`: a study whose driver was SIGKILLed midway (Ray's local cluster with it) continues to the end;
finished trials are kept and never train again, the summary counts every trial once; resuming a finished study
changes nothing; a folder that is not a study is refused with exit 2."""

from __future__ import annotations

import csv
import glob
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, one_model_study
from tune_app import cli
from tune_app.spec.rundir import STUDY, SUMMARY, TRIALS


class StudyProcess:
    """`python -m tune_app ...` in its own process group (its local Ray cluster too), output read line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, inherit: bool = True):
        """`env` on top of this process's environment, or (inherit=False) as the whole of it."""
        self.args, self.env, self.inherit = args, env, inherit
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()

    def __enter__(self) -> StudyProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "tune_app", *self.args], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**(os.environ if self.inherit else {}), "WANDB_MODE": "disabled",
                                          **(self.env or {})})
        self.pgid = os.getpgid(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float) -> str:
        """Block until an output line satisfies `predicate`; fail with the output so far on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"process exited before the expected line:\n{self.output[-4000:]}")
            self.lines.append(line)
            if predicate(line):
                return line
        pytest.fail(f"no expected line within {timeout}s:\n{self.output[-4000:]}")

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None or exc[0] is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)  # never leave a study or its Ray cluster behind
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def saved_iteration(run_dir: Path, trial_id: str) -> tuple[int, str] | None:
    """(training_iteration, status) of a trial in Tune's newest saved experiment state (synced after each
    checkpoint when keep_checkpoints is 1), or None while it is not there."""
    for state_file in sorted(run_dir.glob("experiment_state-*.json"), reverse=True)[:1]:
        try:
            return trial_in_state(state_file.read_text(), trial_id)
        except OSError:
            return None  # being replaced right now
    return None


def trial_in_state(state: str, trial_id: str) -> tuple[int, str] | None:
    """(training_iteration, status) of a trial in the text of an experiment_state-*.json Tune saved, or None where
    the trial is not in it or the text is cut short (being replaced right now)."""
    try:
        trial_data = json.loads(state)["trial_data"]
    except ValueError:
        return None
    for trial_json, metadata in trial_data:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        if trial.get("trial_id") == trial_id:
            meta = json.loads(metadata) if isinstance(metadata, str) else metadata
            return int((meta.get("last_result") or {}).get("training_iteration") or 0), trial.get("status")
    return None


def iterations(trial_dir: Path) -> list[int]:
    """training_iteration of every result line a trial ever logged (a re-trained epoch shows up twice)."""
    return [json.loads(line)["training_iteration"] for line in (trial_dir / "result.json").read_text().splitlines()]


EPOCHS, TRIALS_PLANNED = 2, 3


@pytest.mark.slow
def test_sigkilled_study_resumes_to_completion_without_rerunning_finished_trials(tmp_path, tiny_models, tweets_csv):
    space = {"lora_rank": {"choice": [2, 4, 8]}, "learning_rate": {"loguniform": [1.0e-4, 1.0e-3]}}
    study = one_model_study("killed", tiny_models("bert"), tweets_csv, tmp_path / "runs", space=space,
                            epochs=EPOCHS, trials=TRIALS_PLANNED)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))

    # Kill -9 the driver and its Ray cluster once one trial has finished and the next has reported an epoch.
    with StudyProcess(["run", str(tmp_path / "study.yaml")]) as proc:
        finished_first = proc.wait_for(lambda line: " completed |" in line, timeout=240).split("] ", 1)[1].split()[1]
        line = proc.wait_for(lambda line: " epoch 1:" in line and finished_first not in line, timeout=120)
        running = line.split("] ", 1)[1].split()[1]
        run_dir = Path(glob.glob(str(tmp_path / "runs" / "killed-*"))[0])
        deadline = time.monotonic() + 30
        while (saved := saved_iteration(run_dir, running)) is None or saved[0] < 1:  # its checkpoint is on record
            assert time.monotonic() < deadline, "Tune never saved the running trial's first epoch"
            time.sleep(0.05)
        os.killpg(proc.pgid, signal.SIGKILL)
        proc.proc.wait(timeout=30)
    assert (run_dir / STUDY).is_file() and not (run_dir / SUMMARY).exists()
    assert f"tune-app resume {run_dir}" in proc.output  # said at the start, for exactly this case
    before = {p.name: iterations(p) for p in run_dir.glob("tiny_*") if (p / "result.json").is_file()}

    with StudyProcess(["resume", str(run_dir)]) as resumed:
        rc = resumed.finish(timeout=400)
    assert rc == 0, resumed.output[-4000:]

    summary = json.loads((run_dir / SUMMARY).read_text())
    rows = list(csv.DictReader(open(run_dir / TRIALS)))
    assert summary["complete"] is True and summary["finished_trials"] == TRIALS_PLANNED
    assert summary["models"]["tiny"]["trials"] == TRIALS_PLANNED == len(rows) == len({r["trial_id"] for r in rows})
    assert all(r["status"] == "COMPLETED" and int(r["epochs"]) == EPOCHS for r in rows), rows
    trial_dirs = sorted(run_dir.glob("tiny_*"))
    assert len(trial_dirs) == TRIALS_PLANNED
    assert sum(d.name.endswith(finished_first) for d in trial_dirs) == 1  # the check below does run
    for trial_dir in trial_dirs:
        history = iterations(trial_dir)
        assert history[-1] == EPOCHS and sorted(set(history)) == list(range(1, EPOCHS + 1)), (trial_dir, history)
        if trial_dir.name.endswith(finished_first):
            assert history == before[trial_dir.name] == list(range(1, EPOCHS + 1))  # finished: never ran again
    # The model's Optuna study in the run's optuna.db, continued by the resume: every trial told once, COMPLETE.
    import optuna

    trials = optuna.load_study(study_name=f"{run_dir.name}/tiny", storage=f"sqlite:///{run_dir / 'optuna.db'}").trials
    assert sorted(t.user_attrs["tune_trial_id"] for t in trials) == sorted(r["trial_id"] for r in rows)
    assert all(t.state == optuna.trial.TrialState.COMPLETE and len(t.intermediate_values) == EPOCHS for t in trials)
    # The trial that was mid-way continued from its checkpoint instead of starting over.
    assert f"tiny_{running}/checkpoint_" in resumed.output and "from checkpoint" in resumed.output, \
        resumed.output[-4000:]

    # Resuming again: says it is finished, exits 0, touches nothing.
    stamp = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = subprocess.run([sys.executable, "-m", "tune_app", "resume", str(run_dir)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "already finished" in result.stdout, result.stdout + result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == stamp


def test_resume_refuses_what_is_not_a_study(tmp_path, capsys):
    assert cli.main(["resume", str(tmp_path / "missing")]) == cli.EXIT_BAD_INPUT
    assert "no such run directory" in capsys.readouterr().err

    assert cli.main(["resume", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert f"not a tune-app run directory (no {STUDY} inside)" in capsys.readouterr().err

    # study.yaml written, but the driver died before Ray Tune saved anything: nothing to resume, say how to restart.
    (tmp_path / STUDY).write_text("name: x\n")
    assert cli.main(["resume", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "nothing to resume" in err and f"tune-app run {tmp_path}/{STUDY}" in err

    assert cli.main(["resume", "nosuchscheme://bucket/run"]) == cli.EXIT_BAD_INPUT
    assert "cannot open 'nosuchscheme://bucket/run'" in capsys.readouterr().err


def test_study_yaml_reruns_from_another_directory(tmp_path, small_csv, minilm_path, monkeypatch):
    """study.yaml pins relative paths and output_dir, so `resume` works from any working directory; a file://
    output_dir is the same local folder as the plain path, and stays spelled so."""
    from tune_app.spec import config as config_mod
    from tune_app.spec.rundir import open_run_dir
    from tune_app.study.storage import load_run_config, new_run_dir, save_study

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "tweets.csv").write_bytes(small_csv.read_bytes())
    (project / "study.yaml").write_text(yaml.safe_dump({
        "name": "portable", "data": {"source": "data/tweets.csv", "text": "text", "label": "target"},
        "models": {"minilm": {"checkpoint": minilm_path}}, "output_dir": f"file://{tmp_path}/out"}))
    monkeypatch.chdir(project)
    cfg = config_mod.load("study.yaml")
    run = new_run_dir(cfg)
    assert not run.remote and run.uri == str(run.local) and run.local.parent == tmp_path / "out"
    save_study(cfg, run)

    monkeypatch.chdir(tmp_path)
    again = load_run_config(open_run_dir(run.uri))
    assert again.data.source == str(project / "data" / "tweets.csv")
    # output_dir pinned to the run's parent, spelled as written: file:// is the user's word that the folder is a
    # shared filesystem, which a resume on a cluster takes again (cluster.check_storage_reachable).
    assert again.output_dir == f"file://{tmp_path / 'out'}" and again.models["minilm"].checkpoint == minilm_path
