"""Where a study's Optuna studies live (tune.storage): a real PostgreSQL server holds them when named, and a later
study warm-starts from that database; a storage URL's password never reaches the terminal or summary.json."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import one_model_study
from tune_app.cli import main
from tune_app.spec.rundir import OPTUNA_DB, SUMMARY, RunDir


@pytest.mark.slow
def test_studies_in_postgresql_and_a_warm_start_from_them(ray_session, postgres_url, tiny_models, tweets_csv,
                                                          tmp_path, capsys):
    import optuna

    checkpoint = tiny_models("bert")
    space = {"lora_rank": {"choice": [2, 4]}, "learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}}
    first = one_model_study("pg", checkpoint, tweets_csv, tmp_path / "runs", space=space, epochs=1, trials=2)
    first["tune"]["storage"] = postgres_url
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(first))
    assert main(["run", str(tmp_path / "first.yaml")]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"optuna: each model's study in {postgres_url} as {run_dir.name}/<model>" in out
    assert not (run_dir / OPTUNA_DB).exists()  # in the database, not beside the run
    stored = optuna.load_study(study_name=f"{run_dir.name}/tiny", storage=postgres_url).trials
    assert len(stored) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in stored)
    assert all(t.intermediate_values == {1: t.value} and t.user_attrs["epochs"] == 1 for t in stored)
    assert json.loads((run_dir / SUMMARY).read_text())["optuna_storage"] == postgres_url

    second = one_model_study("warm", checkpoint, tweets_csv, tmp_path / "runs2", space=space, epochs=1, trials=1)
    second["tune"]["warm_start"] = postgres_url  # every study of model tiny in the database
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(second))
    assert main(["run", str(tmp_path / "second.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"warm start: tiny: 2 of 2 earlier trial(s) from {postgres_url}; its best 2 configuration(s) first" in out
    (warm_dir,) = (tmp_path / "runs2").iterdir()
    trials = optuna.load_study(study_name=f"{warm_dir.name}/tiny", storage=f"sqlite:///{warm_dir / OPTUNA_DB}").trials
    best = max(stored, key=lambda t: t.value)  # f1, max
    assert [t.params for t in trials if "warm_start_from" not in t.user_attrs] == [best.params]


def test_a_storage_password_is_never_shown():
    assert RunDir.shown_storage("postgresql://tune:s3cret@db.example:5432/studies") == \
        "postgresql://tune:***@db.example:5432/studies"
    assert RunDir.shown_storage("sqlite:////runs/x/optuna.db") == "sqlite:////runs/x/optuna.db"
    assert RunDir.shown_storage(None) is None


@pytest.mark.parametrize("override, message", [
    ("tune.storage=studies.db", "tune.storage: must be an Optuna storage URL such as sqlite:///studies.db"),
    ("tune.storage=postgresql://tune:pw@127.0.0.1:1/none",
     "tune.storage: cannot open postgresql://tune:***@127.0.0.1:1/none (OperationalError"),
    ("tune.warm_start=.", "tune.warm_start: . holds no optuna.db; name the run directory of an earlier study"),
])
def test_a_storage_or_warm_start_that_cannot_be_used_is_refused_by_validate(small_csv, minilm_path, tmp_path,
                                                                             monkeypatch, capsys, override, message):
    """Exit 2 with the problem and the fix, before Ray or any model: by validate, as by run."""
    monkeypatch.chdir(tmp_path)
    study = one_model_study("bad", minilm_path, small_csv, tmp_path / "runs", space={}, epochs=1, trials=1)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    for verb in ("validate", "run"):
        assert main([verb, str(tmp_path / "s.yaml"), override]) == 2
        err = capsys.readouterr().err
        assert message in err and "pw@" not in err, err
    assert not (tmp_path / "runs").exists()
