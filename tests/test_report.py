"""The report: report.md + PNG plots from a run directory. A run directory is built here in the layout a real run
writes (summary.json, trials.csv, `<model>_<trial_id>/result.json` JSON lines as Ray Tune writes them); the real
multi-model run of tests/test_multimodel.py checks its own report against its trials.csv with `md_table` too."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import yaml

from tune_app import cli
from tune_app.bundle.report import PLOTS, REPORT, pareto_front, write_report
from tune_app.spec.rundir import STUDY, SUMMARY, TRIALS
from tune_app.spec.space import HYPERPARAMETERS


def md_table(text: str, after: str) -> list[dict[str, str]]:
    """The first markdown table after the text `after` (e.g. a heading), as rows of header -> cell."""
    lines = text.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    header, rows = table[0], table[2:]
    return [dict(zip(header, row)) for row in rows]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


# (model, trial, status, epochs, per-epoch f1, lr, rank, seconds per epoch); FAILED: no result at all.
TRIALS_SPEC = [
    ("roberta", "a0000001", "COMPLETED", 3, [0.71, 0.78, 0.80], 2e-4, 8, 40.0),
    ("roberta", "a0000002", "STOPPED_EARLY", 1, [0.62], 1e-5, 4, 38.0),
    ("roberta", "a0000003", "COMPLETED", 3, [0.74, 0.81, 0.79], 9e-5, 16, 45.0),
    ("mistral", "b0000001", "COMPLETED", 3, [0.70, 0.73, 0.76], 5e-5, 8, 200.0),
    ("mistral", "b0000002", "STOPPED_EARLY", 1, [0.55], 1.5e-4, 32, 210.0),
    ("mistral", "b0000003", "FAILED", 0, [], 1e-4, 16, 0.0),
]
TOTAL_PARAMS = {"roberta": 356_000_000, "mistral": 7_110_000_000}
TRAINABLE = {"roberta": 1_800_000, "mistral": 3_400_000}


def _epoch(model, tid, e, f1, seconds, t0, config):
    """One line of Ray Tune's result.json, with the fields train_trial reports."""
    return {"f1": f1, "precision": f1 - 0.02, "recall": f1 + 0.03, "accuracy": f1 + 0.05, "eval_loss": 1 - f1,
            "epoch": e, "train_time_s": seconds * e * 0.9, "trainable_params": TRAINABLE[model],
            "total_params": TOTAL_PARAMS[model], "device": "cpu", "peak_memory_mb": 900.0 + 10 * e,
            "timestamp": t0 + seconds * e, "training_iteration": e, "trial_id": tid,
            "time_this_iter_s": seconds, "time_total_s": seconds * e, "config": config}


@pytest.fixture
def run_dir(tmp_path):
    """A finished two-model run as `tune-app run` leaves it (only the files the report reads)."""
    run = tmp_path / "blog-20260101-000000"
    run.mkdir()
    rows = []
    for i, (model, tid, status, epochs, f1s, lr, rank, seconds) in enumerate(TRIALS_SPEC):
        config = {**{k: hp.default for k, hp in HYPERPARAMETERS.items()}, "model": model, "learning_rate": lr,
                  "lora_rank": rank}
        folder = run / f"{model}_{tid}"
        folder.mkdir()
        history = [_epoch(model, tid, e + 1, f1, seconds, 1_767_225_600 + 30 * i, config) for e, f1 in enumerate(f1s)]
        (folder / "result.json").write_text("".join(json.dumps(h) + "\n" for h in history))
        best = max(history, key=lambda h: h["f1"], default=None)
        last = history[-1] if history else {}
        rows.append({"trial_id": tid, "model": model, "status": status,
                     **{k: config[k] for k in HYPERPARAMETERS}, "epochs": epochs,
                     "final_f1": last.get("f1"), "best_f1": best and best["f1"],
                     "best_epoch": best and best["training_iteration"],
                     **{f"best_{m}": best and best[m] for m in ("precision", "recall", "accuracy", "eval_loss")},
                     "train_time_s": last.get("train_time_s"), "trial_time_s": last.get("time_total_s"),
                     "peak_memory_mb": max((h["peak_memory_mb"] for h in history), default=None),
                     "trainable_params": last.get("trainable_params"), "total_params": last.get("total_params"),
                     "checkpoint": None, "error": f"{model}_{tid}/error.txt" if status == "FAILED" else None})
    with open(run / TRIALS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    models = {}
    for model in TOTAL_PARAMS:
        mine = [r for r in rows if r["model"] == model and r["best_f1"] is not None]
        best = max(mine, key=lambda r: r["best_f1"])
        models[model] = {"best_metric": best["best_f1"], "best_trial": best["trial_id"],
                         "trials": sum(r["model"] == model for r in rows),
                         "stopped_early": sum(r["model"] == model and r["status"] == "STOPPED_EARLY" for r in rows),
                         "failed": sum(r["model"] == model and r["status"] == "FAILED" for r in rows)}
    (run / SUMMARY).write_text(json.dumps({
        "study": "blog", "run_dir": str(run), "metric": "f1", "mode": "max", "best_scope": "all", "models": models,
        "best": {"model": "roberta", "trial_id": "a0000003", "f1": 0.81}, "tokenizations": 2,
        "data": {"train_rows": 6090, "validation_rows": 1523, "label_names": ["0", "1"]}}))
    return run


def test_report_files_exist_and_the_table_matches_trials_csv(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / REPORT
    for name in PLOTS.values():
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"]({name})" in path.read_text()  # embedded in report.md
    trials = pd.read_csv(run_dir / TRIALS, dtype={"trial_id": str})
    summary = json.loads((run_dir / SUMMARY).read_text())
    table = md_table(path.read_text(), "## Models compared")
    assert [r["model"] for r in table] == ["roberta", "mistral"]
    for row in table:
        best = trials[trials["trial_id"] == summary["models"][row["model"]]["best_trial"]].iloc[0]
        for column, field in (("best F1", "best_f1"), ("precision", "best_precision"), ("recall", "best_recall"),
                              ("accuracy", "best_accuracy")):
            assert number(row[column]) == pytest.approx(best[field], abs=5e-5), column
        assert number(row["wall time of best trial (s)"]) == pytest.approx(best["trial_time_s"], abs=0.05)
        assert number(row["peak RSS of best trial (MB)"]) == pytest.approx(best["peak_memory_mb"], abs=0.05)
        assert number(row["trainable params"]) == best["trainable_params"]
        assert number(row["trainable %"]) == pytest.approx(100 * best["trainable_params"] / best["total_params"],
                                                           abs=5e-4)
    # The best roberta trial peaked at epoch 2 (0.81) and is judged by it, not by its last epoch (0.79).
    assert number(table[0]["best F1"]) == pytest.approx(0.81)


def test_cost_front_and_trials_tables_match_trials_csv(run_dir):
    text = write_report(run_dir).read_text()
    trials = pd.read_csv(run_dir / TRIALS, dtype={"trial_id": str})
    for row in md_table(text, "## Cost"):
        mine = trials[trials["model"] == row["model"]]
        assert number(row["total trial time (s)"]) == pytest.approx(mine["trial_time_s"].fillna(0).sum(), abs=0.05)
        assert number(row["trials"]) == len(mine)
        assert number(row["epochs trained"]) == mine["epochs"].sum()
    # The front: trials no other trial beats on both time and F1, found here by brute force.
    scored = trials.dropna(subset=["best_f1"])
    dominated = {t for t, c, v in zip(scored["trial_id"], scored["trial_time_s"], scored["best_f1"])
                 if any((c2 <= c and v2 >= v) and (c2, v2) != (c, v)
                        for c2, v2 in zip(scored["trial_time_s"], scored["best_f1"]))}
    front_ids = {row["trial"] for row in md_table(text, "(the front):")}
    assert front_ids == set(scored["trial_id"]) - dominated
    per_trial = {r["trial"]: r for r in md_table(text, "## Trials")}
    assert set(per_trial) == set(trials["trial_id"])
    for _, t in trials.iterrows():
        row = per_trial[t["trial_id"]]
        assert (row["status"], number(row["epochs"])) == (t["status"], t["epochs"])
        assert {"learning_rate", "lora_rank"} <= set(row)  # the searched hyperparameters are columns
    assert per_trial["b0000003"]["best f1"] == "-"  # a failed trial has no metric, and says so


def test_a_searched_hyperparameter_is_searched_even_when_every_trial_drew_the_same(run_dir):
    """lora_dropout searched over a choice that happened to give every trial 0.05: the report says it was searched,
    and does not list it among the values fixed in every trial; nor lora_alpha where lora_alpha_ratio set it."""
    (run_dir / STUDY).write_text(yaml.safe_dump({
        "name": "blog", "data": {"source": "tweets.csv"},
        "models": {"roberta": "roberta-large", "mistral": "mistralai/Mistral-7B-v0.1"},
        "space": {"lora_dropout": {"choice": [0.05, 0.1]}, "learning_rate": {"loguniform": [1.0e-5, 3.0e-4]},
                  "lora_rank": {"choice": [4, 8, 16, 32]}}}))
    trials = pd.read_csv(run_dir / TRIALS, dtype={"trial_id": str})
    trials.loc[trials["model"] == "roberta", "lora_alpha_ratio"] = 2.0  # roberta's alpha: 2 x rank, not 16
    roberta = trials["model"] == "roberta"
    trials.loc[roberta, "lora_alpha"] = 2.0 * trials.loc[roberta, "lora_rank"]  # as trials record it: it varies
    trials.to_csv(run_dir / TRIALS, index=False)
    text = write_report(run_dir).read_text()
    searched = next(line for line in text.splitlines() if line.startswith("Searched: "))
    assert searched.startswith("Searched: lora_rank, lora_dropout, learning_rate."), searched
    fixed = dict(line[2:].split(": ", 1) for line in text.split("Fixed in every trial:")[1].split("\n")
                 if line.startswith("- "))
    assert "lora_dropout" not in fixed["roberta"] + fixed["mistral"]
    assert "lora_alpha_ratio=2" in fixed["roberta"] and "lora_alpha=" not in fixed["roberta"]
    assert "lora_alpha=16" in fixed["mistral"] and "lora_alpha_ratio" not in fixed["mistral"]


def test_pareto_front_for_both_modes():
    points = [(10, 0.7, "a"), (20, 0.8, "b"), (15, 0.6, "c"), (30, 0.8, "d"), (5, 0.5, "e")]
    assert [k for _, _, k in pareto_front(points, "max")] == ["e", "a", "b"]
    assert [k for _, _, k in pareto_front(points, "min")] == ["e"]


def test_report_without_summary_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "trials.csv").write_text("trial_id\n")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no summary.json here" in err and "tune-app run" in err
    assert not (tmp_path / REPORT).exists()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_report_verb_prints_where_it_wrote(run_dir, capsys):
    assert cli.main(["report", str(run_dir)]) == 0
    assert str(run_dir / REPORT) in capsys.readouterr().out


def test_a_run_in_which_no_trial_reported_a_result(run_dir, capsys):
    """Every trial failed: the report draws no (empty) plots and lists each failure with its error's last line;
    the end of `tune-app run` says why the first one failed and exits 1, not 0."""
    (run_dir / "mistral_b0000003" / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-01-01_00-00-00)\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
        "ValueError: no layer | matched\n\n")
    summary = json.loads((run_dir / SUMMARY).read_text())
    summary.update(best=None, complete=True, failed_trials=[
        {"trial_id": "b0000003", "model": "mistral", "error": "mistral_b0000003/error.txt"}])
    summary["models"] = {"mistral": {"best_trial": None, "metrics": None, "trials": 1, "stopped_early": 0,
                                     "failed": 1}}
    (run_dir / SUMMARY).write_text(json.dumps(summary))
    text = write_report(run_dir).read_text()
    assert "**No trial reported a result.**" in text
    assert not any((run_dir / name).exists() for name in PLOTS.values()) and "](plot_" not in text
    # The pipe in the message is escaped: it would split the markdown cell.
    assert "| mistral | b0000003 | ValueError: no layer \\| matched | `mistral_b0000003/error.txt` |" in text

    assert cli._report(summary) == cli.EXIT_NO_RESULT == 1
    err = capsys.readouterr().err
    assert "no trial reported a result (1 of 1 failed); nothing to export" in err
    assert ("first failure, mistral trial b0000003 (mistral_b0000003/error.txt):\n  ValueError: no layer | matched"
            in err)
    assert cli.main(["export", str(run_dir), "--model", "mistral"]) == 2
    assert (f"{run_dir}: no trial of mistral reported a result, so there is no checkpoint to export (1 trial(s) of "
            f"mistral failed: see failed_trials in summary.json and report.md)") in capsys.readouterr().err
