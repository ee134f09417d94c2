"""tune.confirm and the study's intervals: the confirmation stage (picked configurations, seeds, the winner by
mean, resumable after a SIGKILL), the bundle and report that say so, and the statistics (t intervals, bootstrap
over validation rows) checked against direct computations."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import one_model_study
from tests.test_resume import StudyProcess, saved_iteration
from tune_app import cli
from tune_app.spec import config, space
from tune_app.spec.rundir import BEST_CONFIG, CONFIRM_DIR, SUMMARY, TRIALS
from tune_app.spec.space import CONFIRMS_KEY, MODEL_KEY, SEED_KEY
from tune_app.study import confirm, stats
from tune_app.train.metrics import classification_metrics

# --------------------------------------------------------------------------------------------- statistics


def test_mean_interval_is_students_t():
    from scipy import stats as scipy_stats

    values = [0.78, 0.81, 0.80]
    out = stats.mean_interval(values)
    mean, sem = np.mean(values), scipy_stats.sem(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)
    assert out["n"] == 3 and out["mean"] == pytest.approx(mean) and out["std"] == pytest.approx(np.std(values, ddof=1))
    assert out["ci95"] == pytest.approx([low, high])
    assert stats.mean_interval([0.8]) == {"n": 1, "mean": 0.8, "std": None, "ci95": None}


@pytest.mark.parametrize("num_labels", [2, 4])
@pytest.mark.parametrize("metric", ["f1", "precision", "recall", "accuracy"])
def test_resampled_scores_are_the_trials_metrics(metric, num_labels):
    """Each resample's score is what classification_metrics (a trial's own computation) gives on those rows."""
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, num_labels, 300), rng.integers(0, num_labels, 300)
    rows = rng.integers(0, 300, size=(25, 300))
    scores = stats.resampled_scores(labels, preds, metric, num_labels, rows)
    expected = [classification_metrics(labels[r], preds[r], num_labels)[metric] for r in rows]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_bootstrap_tells_a_real_gap_from_noise():
    """On 1,500 rows: a model 1 point of accuracy behind the best, wrong on other rows than the best, is not
    clearly worse; one 10 points behind is; a model wrong wherever the best is and on 15 rows more is clearly
    worse though only 1 point behind (the paired resamples see it lose on every draw). Each interval holds its
    model's score and is about as wide as the normal approximation says."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 1500)

    def wrong_on(rows: np.ndarray) -> np.ndarray:
        predicted = labels.copy()
        predicted[rows] ^= 1
        return predicted

    best_wrong = rng.choice(1500, 225, replace=False)
    right = np.setdiff1d(np.arange(1500), best_wrong)
    out = stats.bootstrap_comparison(labels, {
        "best": wrong_on(best_wrong),
        "close": wrong_on(rng.choice(1500, 240, replace=False)),
        "far": wrong_on(rng.choice(1500, 375, replace=False)),
        "dominated": wrong_on(np.concatenate([best_wrong, rng.choice(right, 15, replace=False)])),
    }, "accuracy", "max", 2)
    assert out["best"]["gap_to_best_ci95"] == [0.0, 0.0] and not out["best"]["clearly_worse"]
    assert out["close"]["accuracy"] == 1 - 240 / 1500 and not out["close"]["clearly_worse"]
    assert out["far"]["clearly_worse"] and out["dominated"]["clearly_worse"]
    for scored in out.values():
        low, high = scored["ci95"]
        assert low < scored["accuracy"] < high
        p = scored["accuracy"]
        assert high - low == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 1500), rel=0.2)
    assert stats.bootstrap_comparison(labels, {"a": labels}, "eval_loss", "min", 2) == {}  # a loss: no predictions


# --------------------------------------------------------------------------------------------- picking and winning


def _cfg(top=2, seeds=2, mode="max"):
    return config.from_dict({"name": "c", "data": {"source": "x.csv"}, "models": {"m": {"checkpoint": "x"}},
                             "train": {"seed": 5}, "tune": {"mode": mode, "confirm": {"top": top, "seeds": seeds}}},
                            [])


def _row(trial_id, value, rank=4, stage="search", confirms=None, seed=5, status="COMPLETED"):
    return {"trial_id": trial_id, "model": "m", "stage": stage, "confirms": confirms, "seed": seed, "status": status,
            "best_f1": value, "best_epoch": 1, "checkpoint": f"m_{trial_id}/checkpoint_000000",
            **{f"best_{m}": value for m in ("precision", "recall", "accuracy", "eval_loss")},
            **space.merge({"lora_rank": rank, "learning_rate": 1e-3})}


def test_candidates_are_the_best_distinct_configurations():
    rows = [_row("a", 0.70, rank=16), _row("b", 0.80), _row("c", 0.80, rank=8), _row("d", 0.75, rank=8),
            _row("e", None)]
    picked = confirm.candidates(_cfg(top=3), rows)
    # b and c tie (the trial id breaks it); d has c's configuration: skipped; a is the third distinct one.
    assert [r["trial_id"] for r in picked["m"]] == ["b", "c", "a"]
    assert [r["trial_id"] for r in confirm.candidates(_cfg(top=3, mode="min"), rows)["m"]] == ["a", "d", "b"]
    configs = {r["trial_id"]: {MODEL_KEY: "m", "lora_rank": r["lora_rank"]} for r in rows}
    trials = confirm.confirmation_trials(_cfg(top=3), picked, configs)
    assert [(t[CONFIRMS_KEY], t[SEED_KEY]) for t in trials] == [("b", 6), ("c", 6), ("a", 6), ("b", 7), ("c", 7),
                                                                   ("a", 7)]
    assert trials[1]["lora_rank"] == 8 and trials[1][MODEL_KEY] == "m"


def test_the_winner_is_the_best_mean_and_its_best_seed_is_exported():
    cfg = _cfg()
    search = [_row("a", 0.82), _row("b", 0.80, rank=8)]
    picked = confirm.candidates(cfg, search)
    runs = [_row("a6", 0.74, stage="confirm", confirms="a", seed=6),
            _row("a7", 0.78, stage="confirm", confirms="a", seed=7),
            _row("b6", 0.79, rank=8, stage="confirm", confirms="b", seed=6),
            _row("b7", None, rank=8, stage="confirm", confirms="b", seed=7, status="FAILED")]
    out = confirm.summarize(cfg, picked, runs)
    a, b = out["models"]["m"]["configurations"]
    assert (a["mean"], a["n"], a["best_trial"], a["values"]) == (pytest.approx(0.76), 2, "a7", [0.74, 0.78])
    assert (b["mean"], b["n"], b["failed"], b["ci95"]) == (0.79, 1, 1, None)  # one seed left: no spread
    assert out["models"]["m"]["winner"] == "b" and out["seeds"] == [6, 7]
    summary = {"metric": "f1", "mode": "max", "best": {"model": "m", "trial_id": "a"},
               "models": {"m": {"best_trial": "a", "best_metric": 0.82, "best_config": {}}}}
    confirm.apply(summary, out, [*search, *runs])
    assert summary["search_best"] == {"model": "m", "trial_id": "a"}
    assert summary["best"]["trial_id"] == "b6" and summary["best"]["seed"] == 6
    assert summary["models"]["m"]["search_best"]["best_trial"] == "a"
    assert summary["models"]["m"]["confirmed"]["mean"] == 0.79
    assert summary["models"]["m"]["checkpoint"] == "m_b6/checkpoint_000000"


def test_fixed_trials_resume_where_they_stopped(tmp_path):
    searcher = confirm.FixedTrials([{"x": 1}, {"x": 2}], metric="f1", mode="max")
    assert searcher.suggest("t1") == {"x": 1}
    searcher.save(str(tmp_path / "s.pkl"))
    restored = confirm.FixedTrials([], metric="f1", mode="max")
    restored.restore(str(tmp_path / "s.pkl"))
    assert restored.suggest("t2") == {"x": 2} and restored.suggest("t3") == "FINISHED"


def test_confirm_settings_are_checked():
    errors = []
    config.from_dict({"name": "c", "data": {"source": "x.csv"}, "models": {"m": {"checkpoint": "x"}},
                      "tune": {"confirm": {"top": -1, "seeds": 1, "rounds": 2}}}, errors)
    assert any("tune.confirm.top: must be >= 0" in e for e in errors), errors
    assert any("tune.confirm.seeds: must be >= 2, got 1" in e for e in errors), errors
    assert any("tune.confirm.rounds: unknown key" in e for e in errors), errors
    assert not _cfg(top=0).tune.confirm.enabled and _cfg().tune.confirm.enabled


# --------------------------------------------------------------------------------------------- a study


EPOCHS, SEARCH, TOP, SEEDS = 2, 3, 2, 2


@pytest.mark.slow
def test_a_confirmed_study_survives_a_kill_and_exports_its_winner(tmp_path, tiny_models, tweets_csv):
    """Search 3 trials, confirm the best 2 with 2 seeds: the driver is SIGKILLed during the confirmation stage,
    `resume` finishes it without retraining what finished; the winner is the best mean, the bundle is its best
    seed and says so, the report shows the table."""
    space = {"lora_rank": {"choice": [2, 4, 8]}, "learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}}
    study = one_model_study("conf", tiny_models("bert"), tweets_csv, tmp_path / "runs", space=space, epochs=EPOCHS,
                            trials=SEARCH)
    study["tune"].update(metric="eval_loss", mode="min", confirm={"top": TOP, "seeds": SEEDS})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))

    with StudyProcess(["run", str(tmp_path / "study.yaml")]) as proc:
        proc.wait_for(lambda line: line.startswith(f"confirmation: {TOP * SEEDS} trials"), timeout=300)
        line = proc.wait_for(lambda line: " epoch 1:" in line, timeout=120)
        running = line.split("] ", 1)[1].split()[1]
        run_dir = Path(glob.glob(str(tmp_path / "runs" / "conf-*"))[0])
        deadline = time.monotonic() + 30
        while (saved := saved_iteration(run_dir / CONFIRM_DIR, running)) is None or saved[0] < 1:
            assert time.monotonic() < deadline, "Tune never saved the confirmation trial's first epoch"
            time.sleep(0.05)
        os.killpg(proc.pgid, signal.SIGKILL)
        proc.proc.wait(timeout=30)
    assert "confirmation: then each model's 2 best configuration(s) train again with seeds 1, 2" in proc.output
    assert not (run_dir / SUMMARY).exists()
    search_dirs = {p.name: (p / "result.json").read_text() for p in run_dir.glob("tiny_*")}

    with StudyProcess(["resume", str(run_dir)]) as resumed:
        rc = resumed.finish(timeout=400)
    assert rc == 0, resumed.output[-4000:]
    assert "continuing the confirmation stage" in resumed.output
    assert {p.name: (p / "result.json").read_text() for p in run_dir.glob("tiny_*")} == search_dirs  # not rerun

    summary = json.loads((run_dir / SUMMARY).read_text())
    rows = list(csv.DictReader(open(run_dir / TRIALS)))
    search = [r for r in rows if r["stage"] == "search"]
    runs = [r for r in rows if r["stage"] == "confirm"]
    assert summary["complete"] is True and len(search) == SEARCH and len(runs) == TOP * SEEDS
    assert summary["planned_trials"] == summary["finished_trials"] == SEARCH + TOP * SEEDS
    assert all(r["status"] == "COMPLETED" and int(r["epochs"]) == EPOCHS for r in runs), runs
    picked = sorted(search, key=lambda r: float(r["best_eval_loss"]))[:TOP]
    assert {r["confirms"] for r in runs} == {r["trial_id"] for r in picked}
    assert sorted(int(r["seed"]) for r in runs) == [1, 1, 2, 2] and {r["seed"] for r in search} == {"0"}
    for r in runs:  # each confirmation trial trained with its own seed, in RUN_DIR/confirm
        checkpoint = json.loads((run_dir / r["checkpoint"] / "metrics.json").read_text())
        assert r["checkpoint"].startswith(f"{CONFIRM_DIR}/tiny_{r['trial_id']}/")
        assert checkpoint[SEED_KEY] == int(r["seed"]) and (run_dir / r["checkpoint"] / "val_predictions.npy").is_file()
    for original in picked:  # another seed, another result
        assert len({r["best_eval_loss"] for r in runs if r["confirms"] == original["trial_id"]}) == SEEDS

    # The winner: the best mean over the seeds; the exported trial: its best seed.
    means = {t: np.mean([float(r["best_eval_loss"]) for r in runs if r["confirms"] == t]) for t in
             {r["confirms"] for r in runs}}
    winner = min(means, key=means.get)
    best_seed = min((r for r in runs if r["confirms"] == winner), key=lambda r: float(r["best_eval_loss"]))
    best = summary["best"]
    assert best["trial_id"] == best_seed["trial_id"] and best["seed"] == int(best_seed["seed"])
    assert best["confirmed"]["mean"] == pytest.approx(means[winner]) and best["confirmed"]["search_trial"] == winner
    assert summary["search_best"]["trial_id"] == picked[0]["trial_id"]
    assert summary["comparison"] == {}  # eval_loss: no bootstrap of a loss
    assert f"seed: {best['seed']}" in (run_dir / BEST_CONFIG).read_text()

    bundle = run_dir / "best"  # exported by the resume, as at the end of any run
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["trial_id"] == best["trial_id"] and manifest["seed"] == best["seed"]
    assert manifest["confirmed"]["mean"] == pytest.approx(means[winner])
    card = (bundle / "README.md").read_text()
    assert "## Confirmation" in card and f"this bundle is its best seed ({best['seed']})" in card

    assert cli.main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "## Confirmation" in report and f"yes: trial {best['trial_id']} (seed {best['seed']})" in report
