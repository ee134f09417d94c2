"""One end-to-end study through `tune-app run` (shared by every slow test here), its retrain from
best_config.yaml in a real process, and the searcher's seed determinism (no training)."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import REPO
from tune_app.cli import main
from tune_app.spec import config, rundir, space

EPOCHS = 3
FAKE_API_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # the 40-character form of a W&B key


def study_raw(tiny_a: str, tiny_b: str, source: Path, output_dir: Path) -> dict:
    """Two tiny models sharing the MiniLM tokenizer; trials run one at a time so that ASHA sees the results in
    proposal order and its decisions repeat run after run."""
    return {
        "name": "e2e",
        "data": {"source": str(source), "text": "text", "label": "target", "limit": 300, "max_length": 32},
        "models": {"a": {"checkpoint": tiny_a, "cpu": 1},
                   "b": {"checkpoint": tiny_b, "cpu": 1, "num_samples": 1}},
        "space": {"lora_rank": {"choice": [2, 4]}, "learning_rate": {"loguniform": [1.0e-4, 5.0e-2]},
                  "lora_dropout": 0.0},
        "train": {"epochs": EPOCHS, "batch_size": 16},
        # eval_loss: random tiny models all predict one class at first, so their F1s tie and ASHA (which stops
        # only strictly worse trials) would keep them all; their losses differ.
        "tune": {"num_samples": 4, "metric": "eval_loss", "mode": "min", "seed": 0, "max_concurrent": 1,
                 "n_startup_trials": 4,  # seeded random proposals: TPE would hand ASHA ever better trials
                 "keep_checkpoints": 1, "asha": {"grace_period": 1, "reduction_factor": 2}},
        "output_dir": str(output_dir),
        "wandb": {"mode": "offline", "project": "tune-app-test"},
    }


@pytest.fixture(scope="module")
def study(ray_session, tiny_models, tweets_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tiny_a, tiny_b = tiny_models("bert"), tiny_models("bert", num_hidden_layers=1)
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study_raw(tiny_a, tiny_b, tweets_csv, root / "runs"), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        # Offline must come from the YAML alone, as for a user with no W&B setup (conftest sets WANDB_MODE).
        mp.delenv("WANDB_MODE", raising=False)
        mp.delenv("WANDB_API_KEY", raising=False)
        assert main(["run", str(path)]) == 0
    (run_dir,) = (root / "runs").iterdir()
    with open(run_dir / rundir.TRIALS, newline="") as f:
        rows = list(csv.DictReader(f))
    return SimpleNamespace(root=root, yaml=path, run_dir=run_dir, rows=rows, cfg=config.load(path),
                           summary=json.loads((run_dir / rundir.SUMMARY).read_text()))


@pytest.mark.slow
def test_summary(study):
    s = study.summary
    assert s["run_dir"] == str(study.run_dir) and study.run_dir.name.startswith("e2e-")
    assert s["metric"] == "eval_loss" and s["mode"] == "min"
    assert s["tokenizations"] == 1  # a and b share the MiniLM tokenizer: the data was tokenized once
    assert s["data"]["train_rows"] == 240 and s["data"]["validation_rows"] == 60
    # The run's study.yaml spells out the split it was drawn with (a later default cannot change it on resume).
    assert yaml.safe_load((study.run_dir / rundir.STUDY).read_text())["data"]["stratify"] is True
    assert set(s["models"]) == {"a", "b"}
    for name, m in s["models"].items():
        mine = [r for r in study.rows if r["model"] == name]
        assert m["trials"] == len(mine) == study.cfg.model_samples(name)
        assert m["failed"] == 0
        assert m["stopped_early"] == sum(r["status"] == "STOPPED_EARLY" for r in mine)
        assert m["best_metric"] == min(float(r["best_eval_loss"]) for r in mine)
        best_row = next(r for r in mine if r["trial_id"] == m["best_trial"])
        assert m["best_config"]["learning_rate"] == float(best_row["learning_rate"])
        assert set(m["best_config"]) == {h for h in space.HYPERPARAMETERS if best_row[h] != ""}
    best_model = min(s["models"], key=lambda n: s["models"][n]["best_metric"])
    assert s["best"]["model"] == best_model
    assert s["best"]["eval_loss"] == s["models"][best_model]["best_metric"]


@pytest.mark.slow
def test_trials_table(study):
    assert len(study.rows) == 5
    columns = set(study.rows[0])
    assert {"trial_id", "model", "status", "epochs", "final_eval_loss", "best_eval_loss"} <= columns
    assert set(space.HYPERPARAMETERS) <= columns
    for row in study.rows:
        params = json.loads(next(study.run_dir.glob(f"{row['model']}_{row['trial_id']}/params.json")).read_text())
        assert int(row["lora_rank"]) == params["lora_rank"] in (2, 4)
        assert float(row["learning_rate"]) == params["learning_rate"] and 1e-4 <= params["learning_rate"] <= 5e-2
        assert float(row["lora_dropout"]) == 0.0 and int(row["batch_size"]) == 16
        history = (study.run_dir / f"{row['model']}_{row['trial_id']}" / "result.json").read_text().splitlines()
        losses = [json.loads(line)["eval_loss"] for line in history]
        assert int(row["epochs"]) == len(losses)
        assert float(row["final_eval_loss"]) == losses[-1] and float(row["best_eval_loss"]) == min(losses)
        assert row["status"] == ("COMPLETED" if len(losses) == EPOCHS else "STOPPED_EARLY")


@pytest.mark.slow
def test_trials_reuse_one_worker_process(study):
    """tune.reuse_actors (on by default): trials of equal resources run one after another in the same worker,
    those ASHA stopped included, so process start and imports are paid once, not per trial."""
    pids = {json.loads(line)["pid"] for row in study.rows
            for line in (study.run_dir / f"{row['model']}_{row['trial_id']}" / "result.json").read_text().splitlines()}
    assert len(pids) == 1, pids


@pytest.mark.slow
def test_asha_stopped_a_trial_early(study):
    stopped = [r for r in study.rows if r["status"] == "STOPPED_EARLY"]
    assert stopped, [(r["trial_id"], r["epochs"]) for r in study.rows]
    assert all(int(r["epochs"]) in (1, 2) for r in stopped)  # the rungs: grace 1 x reduction factor 2^k
    assert (study.run_dir / rundir.SCHEDULER_STATE).is_file()  # the rungs, for a resume


@pytest.mark.slow
def test_only_the_best_checkpoints_are_kept(study):
    keep = study.cfg.tune.keep_checkpoints
    for row in study.rows:
        trial_dir = study.run_dir / f"{row['model']}_{row['trial_id']}"
        kept = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
        assert len(kept) == keep, (trial_dir.name, kept)
        assert row["checkpoint"] == f"{trial_dir.name}/{kept[0]}"
        # An adapter-only checkpoint: the LoRA weights and the head, never the base model's weights.
        assert (trial_dir / kept[0] / "adapter_model.safetensors").is_file()
        assert not list((trial_dir / kept[0]).glob("model.safetensors"))


def _wandb_records(path: Path):
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""  # 7: W&B's file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


@pytest.mark.slow
def test_one_offline_wandb_run_per_trial(study):
    runs = sorted((study.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(study.rows)
    seen = {}
    for run in runs:
        (log,) = run.glob("run-*.wandb")
        records = list(_wandb_records(log))
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        epochs = [r for r in records if r.WhichOneof("record_type") == "history"]
        seen[info.run_id] = (info.display_name, info.run_group, info.job_type, len(epochs))
    expected = {r["trial_id"]: (f"{r['model']}-{r['trial_id']}", study.run_dir.name, r["model"], int(r["epochs"]))
                for r in study.rows}
    assert seen == expected  # named <model>-<trial id>, grouped by study run, job type = model, one log per epoch


@pytest.fixture(scope="module")
def retrain(study, ray_session):
    """`python -m tune_app run best_config.yaml name=e2e` in a real process, on the session's Ray, with a W&B key
    in its environment (which must end up nowhere in the run directory)."""
    best = study.run_dir / rundir.BEST_CONFIG
    before = {p: p.stat().st_mtime_ns for p in study.run_dir.rglob("*")}
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY=FAKE_API_KEY, PYTHONPATH=str(REPO),
               RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    done = subprocess.run([sys.executable, "-m", "tune_app", "run", str(best), "name=e2e"], cwd=study.root,
                          env=env, capture_output=True, text=True, timeout=300)
    runs = sorted((study.root / "runs").iterdir())
    return SimpleNamespace(done=done, best=best, before=before, runs=runs)


@pytest.mark.slow
def test_best_config_retrains_one_trial(study, retrain):
    assert retrain.done.returncode == 0, retrain.done.stderr[-3000:]
    cfg = config.load(retrain.best)  # a complete, valid study YAML
    winner = study.summary["best"]
    assert list(cfg.models) == [winner["model"]] and cfg.model_samples(winner["model"]) == 1
    assert cfg.space == winner["config"] and not space.searched(cfg.model_space(winner["model"]))
    (second,) = [r for r in retrain.runs if r != study.run_dir]
    summary = json.loads((second / rundir.SUMMARY).read_text())
    assert {n: m["trials"] for n, m in summary["models"].items()} == {winner["model"]: 1}
    assert summary["models"][winner["model"]]["best_config"] == winner["config"]


def test_best_config_reads_the_same_files_from_anywhere(tmp_path, small_csv, tiny_models, monkeypatch):
    """A study written with paths relative to where it ran gives a best_config.yaml with absolute paths, which
    validates from any other folder."""
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(small_csv, work / "tweets.csv")
    monkeypatch.chdir(work)
    (work / "study.yaml").write_text(yaml.safe_dump({
        "name": "rel", "data": {"source": "./tweets.csv", "text": "text", "label": "target"},
        "models": {"m": {"checkpoint": os.path.relpath(tiny_models("bert"), work)}},
        "space": {"lora_rank": {"choice": [2, 4]}}}))
    cfg = config.load("study.yaml")
    text = rundir.retrain_yaml(cfg, "m", {"lora_rank": 4}, "# header\n")
    (elsewhere / "best_config.yaml").write_text(text)
    monkeypatch.chdir(elsewhere)
    again = config.load(elsewhere / "best_config.yaml")  # raises ConfigError on a path it cannot find
    assert again.data.source == str(work / "tweets.csv")
    assert again.models["m"].checkpoint == tiny_models("bert")


@pytest.mark.slow
def test_a_second_run_never_overwrites_the_first(study, retrain):
    assert len(retrain.runs) == 2 and all(r.name.startswith("e2e-") for r in retrain.runs)
    after = {p: p.stat().st_mtime_ns for p in study.run_dir.rglob("*")}
    assert after == retrain.before


@pytest.mark.slow
def test_no_api_key_on_disk_and_a_quiet_exit(study, retrain):
    for run_dir in retrain.runs:
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert FAKE_API_KEY.encode() not in path.read_bytes(), path
    assert FAKE_API_KEY not in retrain.done.stdout + retrain.done.stderr
    # Ray's W&B callback and wandb's service used to print tracebacks at exit.
    for noise in ("Exception ignored", "Traceback", "ConnectionResetError"):
        assert noise not in retrain.done.stderr, retrain.done.stderr[-3000:]


# --------------------------------------------------------------------------------------------- searcher seeds

SPACES = {
    "a": {"lora_rank": {"choice": [4, 8, 16]}, "learning_rate": {"loguniform": [1e-5, 1e-3]},
          "lora_dropout": {"uniform": [0.0, 0.1]}, "batch_size": 8},
    "b": {"lora_rank": {"int": [2, 32]}, "learning_rate": 1e-4},
}


def _proposals(seed: int, n: int = 6) -> list[dict]:
    from tune_app.study.search import PerModelSearch

    searcher = PerModelSearch(SPACES, {"a": 4, "b": 2}, metric="f1", mode="max", seed=seed, epochs=2)
    return [searcher.suggest(f"trial_{i}") for i in range(n)]


def test_same_seed_same_proposals():
    first = _proposals(seed=0)
    assert first == _proposals(seed=0)
    assert [p["model"] for p in first] == ["a", "b", "a", "b", "a", "a"]  # round robin while samples last
    assert all(p["batch_size"] == 8 for p in first if p["model"] == "a")  # fixed values join every proposal
    assert all(p["learning_rate"] == 1e-4 for p in first if p["model"] == "b")
    assert all(2 <= p["lora_rank"] <= 32 for p in first if p["model"] == "b")


def test_a_ratio_sets_the_proposed_lora_alpha():
    """Trials record the lora_alpha they train with: ratio x rank where lora_alpha_ratio is set."""
    from tune_app.study.search import PerModelSearch

    spaces = {"r": {"lora_rank": {"choice": [4, 8]}, "lora_alpha": 16, "lora_alpha_ratio": {"choice": [1.0, 2.0]}},
              "a": {"lora_rank": {"choice": [4, 8]}, "lora_alpha": 16, "lora_alpha_ratio": None}}
    searcher = PerModelSearch(spaces, {"r": 3, "a": 3}, metric="f1", mode="max", seed=0, epochs=2)
    proposals = [searcher.suggest(f"t{i}") for i in range(6)]
    for p in proposals:
        expected = p["lora_alpha_ratio"] * p["lora_rank"] if p["model"] == "r" else 16
        assert p["lora_alpha"] == expected, p


def test_different_seeds_differ():
    assert _proposals(seed=0) != _proposals(seed=1)


def test_searcher_finishes_when_every_model_is_done():
    from ray.tune.search import Searcher

    from tune_app.study.search import PerModelSearch

    searcher = PerModelSearch(SPACES, {"a": 1, "b": 1}, metric="f1", mode="max", seed=0, epochs=2)
    assert [searcher.suggest(f"t{i}")["model"] for i in range(2)] == ["a", "b"]
    assert searcher.suggest("t2") == Searcher.FINISHED


def test_wandb_callback_pickles_without_its_actor(tmp_path):
    """Tune pickles callbacks with the experiment (resume restores them): the logging actor's handle stays out,
    and a restored callback starts a new actor with the same run settings."""
    import pickle

    from tune_app.spec.config import WandbConfig
    from tune_app.study.wandb_logging import TrialWandbCallback, loggable

    callback = TrialWandbCallback(WandbConfig(), run_name="e2e-1", run_dir=tmp_path)
    callback._runs = lambda: None  # stands in for an actor handle (and cannot be pickled)
    restored = pickle.loads(pickle.dumps(callback))
    assert restored._runs is None and restored.init_kwargs == callback.init_kwargs
    assert restored.init_kwargs["group"] == "e2e-1" and restored.init_kwargs["mode"] == "offline"
    result = {"f1": 0.5, "epoch": 1, "training_iteration": 1, "pid": 7, "done": False, "date": "x",
              "config": {"lr": 1}, "compiled": False}
    assert loggable(result) == {"f1": 0.5, "epoch": 1, "training_iteration": 1}


def test_asha_rungs_survive_a_resume(tmp_path):
    """Tune restores the searcher on resume but hands back the scheduler as it was when the study started:
    PerModelASHA reads its rungs back from the run directory, so a weak trial after a resume is still stopped."""
    from ray.tune.schedulers import TrialScheduler

    from tune_app.study.search import PerModelASHA

    def scheduler(state_uri=str(tmp_path / "asha_rungs.pkl")):
        return PerModelASHA(["a", "b"], metric="f1", mode="max", max_t=4, grace_period=1, reduction_factor=2,
                            state_uri=state_uri)

    def trial(trial_id, model="a"):
        return SimpleNamespace(trial_id=trial_id, config={"model": model})

    before = scheduler()
    for trial_id, f1 in (("t1", 0.9), ("t2", 0.8), ("t3", 0.85)):
        before.on_trial_add(None, t := trial(trial_id))
        before.on_trial_result(None, t, {"training_iteration": 1, "f1": f1})

    weak = {"training_iteration": 1, "f1": 0.1}
    resumed, forgetful = scheduler(), scheduler(state_uri=None)
    for s in (resumed, forgetful):
        s.on_trial_add(None, trial("t4"))
    assert resumed.on_trial_result(None, trial("t4"), weak) == TrialScheduler.STOP
    assert forgetful.on_trial_result(None, trial("t4"), weak) == TrialScheduler.CONTINUE  # empty rungs: no cutoff
    # Rungs stay per model: model b's first trial has nothing to be compared with.
    resumed.on_trial_add(None, trial("t5", "b"))
    assert resumed.on_trial_result(None, trial("t5", "b"), weak) == TrialScheduler.CONTINUE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asha_rungs.pkl"]  # written whole, then moved in place
    import pickle

    assert pickle.loads(pickle.dumps(resumed))._fs is None  # what Tune pickles carries no open filesystem


def test_unreadable_asha_rungs_never_block_a_resume(tmp_path, capsys):
    from ray.tune.schedulers import TrialScheduler

    from tune_app.study.search import PerModelASHA

    (tmp_path / "asha_rungs.pkl").write_bytes(b"truncated")
    s = PerModelASHA(["a"], metric="f1", mode="max", max_t=4, grace_period=1, reduction_factor=2,
                     state_uri=str(tmp_path / "asha_rungs.pkl"))
    s.on_trial_add(None, t := SimpleNamespace(trial_id="t1", config={"model": "a"}))
    assert s.on_trial_result(None, t, {"training_iteration": 1, "f1": 0.5}) == TrialScheduler.CONTINUE
    assert "could not read ASHA's rungs" in capsys.readouterr().out


class _BrokenRuns:
    def close(self):
        raise RuntimeError("W&B service gone")


def test_wandb_trouble_at_the_end_never_fails_the_study(ray_session, tmp_path, capsys):
    from tune_app.spec.config import WandbConfig
    from tune_app.study.wandb_logging import TrialWandbCallback

    callback = TrialWandbCallback(WandbConfig(), run_name="r", run_dir=tmp_path)
    callback._runs = ray_session.remote(_BrokenRuns).remote()
    callback.on_experiment_end(trials=[])  # must not raise: the summary is written after this
    assert callback._runs is None
    assert capsys.readouterr().out == ("[tune_app] W&B logging did not finish cleanly (RuntimeError: W&B service "
                                       "gone); the study's results are not affected\n")


@pytest.mark.slow
def test_optuna_learns_each_trial_as_the_study_ranks_it(study):
    """Each model's Optuna study, stored in the run's optuna.db: a trial that ran every epoch is COMPLETE with its
    best epoch's value (the one the study ranks it by), one ASHA stopped is PRUNED, every epoch's value is an
    intermediate value, and each trial names its Tune trial and cost."""
    import optuna

    storage = f"sqlite:///{study.run_dir / rundir.OPTUNA_DB}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {f"{study.run_dir.name}/a", f"{study.run_dir.name}/b"}
    studies = {m: optuna.load_study(study_name=f"{study.run_dir.name}/{m}", storage=storage) for m in "ab"}
    assert study.summary["optuna_storage"] == storage
    completed = sum(r["status"] == "COMPLETED" for r in study.rows if r["model"] == "a")
    assert study.summary["importances"]["a"] == {  # 4 trials: too few to say which hyperparameter matters
        "importances": None, "why": f"{completed} completed trial(s); importances need 5"}
    rows = {r["trial_id"]: r for r in study.rows}
    told = {t.user_attrs["tune_trial_id"]: (model, t) for model, s in studies.items() for t in s.trials}
    assert set(told) == set(rows)
    states = set()
    for trial_id, (model, trial) in told.items():
        row = rows[trial_id]
        assert row["model"] == model
        losses = [json.loads(line)["eval_loss"] for line in
                  (study.run_dir / f"{model}_{trial_id}" / "result.json").read_text().splitlines()]
        assert trial.intermediate_values == {epoch: loss for epoch, loss in enumerate(losses, start=1)}
        assert trial.params["learning_rate"] == float(row["learning_rate"])
        assert trial.user_attrs["epochs"] == int(row["epochs"])
        assert trial.user_attrs["best_eval_loss"] == float(row["best_eval_loss"])
        assert trial.user_attrs["best_epoch"] == int(row["best_epoch"])
        assert trial.user_attrs["trial_time_s"] == pytest.approx(float(row["trial_time_s"]))
        if row["status"] == "COMPLETED":
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == float(row["best_eval_loss"])
            assert trial.user_attrs["status"] == "completed"
        else:
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.value == losses[-1]
            assert trial.user_attrs["status"] == "stopped_early"
        states.add(trial.state)
    assert states == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


def test_searcher_tells_optuna_failed_pruned_and_completed_trials():
    """Without Tune: what the searcher tells Optuna for each way a trial ends."""
    import optuna

    from tune_app.study.search import PerModelSearch

    searcher = PerModelSearch(SPACES, {"a": 4, "b": 0}, metric="f1", mode="max", seed=0, epochs=3)
    for i in range(4):
        searcher.suggest(f"t{i}")
    for epoch, value in enumerate([0.5, 0.7, 0.6], start=1):  # completed; best at epoch 2
        searcher.on_trial_result("t0", {"f1": value, "training_iteration": epoch})
    searcher.on_trial_result("t0", {"f1": 0.7, "training_iteration": 2})  # replayed after a resume: ignored
    searcher.on_trial_complete("t0", {"f1": 0.6, "training_iteration": 3})
    searcher.on_trial_complete("t1", {"f1": 0.4, "training_iteration": 1})  # stopped by ASHA at its first rung
    searcher.on_trial_result("t2", {"f1": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("t2", {"f1": 0.3, "training_iteration": 1}, error=True)  # raised in epoch 2
    searcher.on_trial_complete("t3", None, error=True)  # failed before its first epoch
    t0, t1, t2, t3 = searcher.studies["a"].trials
    State = optuna.trial.TrialState
    assert (t0.state, t0.value, t0.intermediate_values) == (State.COMPLETE, 0.7, {1: 0.5, 2: 0.7, 3: 0.6})
    assert t0.user_attrs == {"tune_trial_id": "t0", "status": "completed", "epochs": 3, "best_epoch": 2,
                             "best_f1": 0.7}
    assert (t1.state, t1.value, t1.user_attrs["status"]) == (State.PRUNED, 0.4, "stopped_early")
    assert (t2.state, t2.user_attrs["status"], t2.intermediate_values) == (State.FAIL, "failed", {1: 0.3})
    assert (t3.state, t3.user_attrs["epochs"]) == (State.FAIL, 0)
    assert searcher.suggest("t4") == "FINISHED"


def test_a_resumed_searcher_finds_its_studies_where_it_left_them(tmp_path):
    """Stored studies (SQLite here): Tune's pickle of the searcher reconnects to them; what was told after that
    pickle was taken wins (a trial told since is done; one still running keeps its stored epochs, so a replayed
    epoch is not reported twice)."""
    import pickle

    import optuna

    from tune_app.study.search import PerModelSearch

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = PerModelSearch(SPACES, {"a": 2, "b": 0}, metric="f1", mode="max", seed=0, epochs=3,
                              storage=storage, study_prefix="run-1/")
    searcher.suggest("t0")
    searcher.suggest("t1")
    searcher.on_trial_result("t0", {"f1": 0.5, "training_iteration": 1})
    saved = pickle.dumps(searcher.get_state())
    searcher.on_trial_result("t1", {"f1": 0.4, "training_iteration": 1})  # after the pickle: only in storage
    for epoch in (2, 3):
        searcher.on_trial_result("t0", {"f1": 0.5 + epoch / 10, "training_iteration": epoch})
    searcher.on_trial_complete("t0", {"f1": 0.8, "training_iteration": 3})

    resumed = PerModelSearch.__new__(PerModelSearch)
    resumed.set_state(pickle.loads(saved))
    assert set(resumed.asked) == {"t1"}
    resumed.on_trial_result("t1", {"f1": 0.4, "training_iteration": 1})  # replayed: already stored
    resumed.on_trial_result("t1", {"f1": 0.45, "training_iteration": 2})
    resumed.on_trial_complete("t1", {"f1": 0.45, "training_iteration": 2})  # stopped early
    t0, t1 = optuna.load_study(study_name="run-1/a", storage=storage).trials
    assert (t0.state, t0.value, t0.user_attrs["tune_trial_id"]) == (optuna.trial.TrialState.COMPLETE, 0.8, "t0")
    assert (t1.state, t1.intermediate_values) == (optuna.trial.TrialState.PRUNED, {1: 0.4, 2: 0.45})


def test_importances_once_enough_trials_completed():
    import optuna

    from tune_app.study.studies import MIN_TRIALS_FOR_IMPORTANCE, parameter_importances

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"lora_rank": optuna.distributions.CategoricalDistribution([4, 8]),
             "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    for _ in range(MIN_TRIALS_FOR_IMPORTANCE):
        assert parameter_importances({"m": study})["m"]["importances"] is None
        trial = study.ask(space)
        study.tell(trial, trial.params["learning_rate"] * 1000)  # the rank does not matter at all
    ranked = parameter_importances({"m": study})["m"]
    assert ranked["completed"] == MIN_TRIALS_FOR_IMPORTANCE
    assert list(ranked["importances"]) == ["learning_rate", "lora_rank"]
    assert ranked["importances"]["learning_rate"] > ranked["importances"]["lora_rank"]
    fixed = optuna.create_study()
    fixed.tell(fixed.ask({"lora_rank": optuna.distributions.CategoricalDistribution([4])}), 1.0)
    assert parameter_importances({"m": fixed}) == {"m": {"importances": None, "why": "nothing searched"}}


@pytest.mark.slow
def test_a_warm_started_study_begins_where_the_first_left_off(study, tmp_path, capsys):
    """tune.warm_start: RUN_DIR. Model a's new study holds the first run's finished trials that fit its space (a
    narrower learning-rate range leaves some out, and says so), proposes the earlier best configurations first,
    and the summary and report name those trials; model b, whose space is unchanged, takes all of its."""
    import optuna

    first_a = optuna.load_study(study_name=f"{study.run_dir.name}/a",
                                storage=f"sqlite:///{study.run_dir / rundir.OPTUNA_DB}").trials
    rates = sorted(t.params["learning_rate"] for t in first_a)
    low = (rates[0] + rates[1]) / 2  # the lowest earlier rate falls outside the new range
    raw = yaml.safe_load(study.yaml.read_text())
    raw["models"]["a"]["space"] = {"learning_rate": {"loguniform": [low, 5.0e-2]}}
    raw["models"]["a"]["num_samples"] = 2
    raw["tune"].update(warm_start=str(study.run_dir), n_startup_trials=1)
    raw.update(output_dir=str(tmp_path / "runs"), wandb={"mode": "disabled"})
    path = tmp_path / "warm.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())

    fits = [t for t in first_a if t.state.is_finished() and t.params["learning_rate"] >= low]
    assert f"warm start: a: {len(fits)} of {len(first_a)} earlier trial(s) from {study.run_dir}; left out 1 " \
           f"with values this space does not hold (learning_rate: 1)" in out
    assert "warm start: b: 1 of 1 earlier trial(s)" in out
    storage = f"sqlite:///{run_dir / rundir.OPTUNA_DB}"
    new_a = optuna.load_study(study_name=f"{run_dir.name}/a", storage=storage).trials
    assert sum("warm_start_from" in t.user_attrs for t in new_a) == len(fits)
    # The first proposal of the new run: the earlier best configuration of a that fits (eval_loss: lowest first).
    best = min((t for t in fits if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    proposed = [t for t in new_a if "warm_start_from" not in t.user_attrs]
    assert proposed[0].params == best.params and proposed[0].user_attrs["warm_start"] == str(study.run_dir)
    warm = summary["warm_start"]
    assert warm["source"] == str(study.run_dir) and warm["models"]["a"]["earlier_trials"] == len(fits)
    assert proposed[0].user_attrs["tune_trial_id"] in warm["models"]["a"]["proposed_first"]
    report = (run_dir / "report.md").read_text()
    assert f"Warm start from `{study.run_dir}`" in report and "(warm start)" in report


def test_warm_start_from_nothing_is_refused_before_ray(tmp_path):
    from tune_app.errors import ConfigError
    from tune_app.study import warmstart

    with pytest.raises(ConfigError, match="holds no optuna.db; name the run directory of an earlier study"):
        warmstart.load(str(tmp_path), ["a"])
    import optuna

    optuna.create_study(study_name="old-run/other", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(ConfigError, match=r"has no finished trial of model\(s\) a \(studies there: old-run/other\)"):
        warmstart.load(f"sqlite:///{tmp_path / 'optuna.db'}", ["a"])


@pytest.mark.slow
def test_the_dashboard_shows_the_studies_in_a_browser(study, tmp_path):
    """`tune-app dashboard RUN_DIR` serves optuna-dashboard on 127.0.0.1; headless Chromium (Debian's, through
    Playwright) finds both models' studies and model a's trials, each with its Tune trial id. With
    TUNE_APP_SCREENSHOT=FILE the study's page is saved there (README's screenshot is taken so)."""
    import signal
    import socket
    import time
    import urllib.request

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tune_app", "dashboard", str(study.run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.3)
        a_trials = [r["trial_id"] for r in study.rows if r["model"] == "a"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium),
                                        args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/dashboard")
            for model in ("a", "b"):
                page.get_by_text(f"{study.run_dir.name}/{model}").wait_for(timeout=30_000)
            page.get_by_text(f"{study.run_dir.name}/a").click()
            page.wait_for_url("**/dashboard/studies/*")
            history = page.url
            page.goto(f"{history}/trials")  # the trial list
            page.get_by_text(f"{len(a_trials)} Trials").wait_for(timeout=30_000)
            shown = set()
            for number in range(len(a_trials)):  # each trial's page names its Tune trial
                page.get_by_text(f"Trial {number}", exact=True).first.click()
                page.get_by_text("tune_trial_id").first.wait_for(timeout=30_000)
                body = page.inner_text("body")
                shown |= {t for t in a_trials if t in body}
            assert shown == set(a_trials)
            if target := os.environ.get("TUNE_APP_SCREENSHOT"):
                page.goto(history)  # the optimization history, intermediate values, importances
                page.wait_for_timeout(5000)
                page.screenshot(path=target)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # its own session: the dashboard and nothing else
        proc.wait(timeout=30)
