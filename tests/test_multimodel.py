"""Real Ray studies over several model families and label kinds: an encoder (tiny BERT, WordPiece) and a decoder
(tiny Llama, BPE without a pad token) in ONE study with 3 string labels; and a 0/2/4-labelled data set.
Each study is tiny (1 epoch, 1-2 trials per model) and runs through the CLI, so the report is written too."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from tune_app import cli
from tune_app.bundle.report import PLOTS, REPORT
from tune_app.spec.rundir import SUMMARY, TRIALS

pytestmark = pytest.mark.slow


def _three_classes(tweets_csv, path, labels):
    """Shared tweets with a synthetic third class: disasters, questions, everything else (labels named `labels`)."""
    df = pd.read_csv(tweets_csv).sample(n=180, random_state=1)
    question = df["text"].str.contains(r"\?", regex=True)
    df["label"] = [labels[1] if t == 1 else labels[2] if q else labels[0] for t, q in zip(df["target"], question)]
    df[["text", "label"]].to_csv(path, index=False)
    return path


def _run_study(tmp_path, name, source, models, **extra) -> dict:
    study = {"name": name, "data": {"source": str(source), "max_length": 48},
             "models": models, "train": {"epochs": 1, "batch_size": 16},
             "tune": {"num_samples": 2, "max_concurrent": 2}, "output_dir": str(tmp_path / "runs"),
             "wandb": {"mode": "disabled"}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    assert cli.main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return {"dir": run_dir, "summary": json.loads((run_dir / SUMMARY).read_text()),
            "trials": pd.read_csv(run_dir / TRIALS, dtype={"trial_id": str})}


@pytest.fixture(scope="module")
def encoder_decoder_run(tmp_path_factory, tiny_models, tweets_csv, ray_session):
    """One study, two families: BERT (2 trials, space from the study) and Llama (1 trial, its own space)."""
    tmp = tmp_path_factory.mktemp("multimodel")
    source = _three_classes(tweets_csv, tmp / "sentiment3.csv", ["chatter", "disaster", "question"])
    models = {
        "bert": {"checkpoint": tiny_models("bert"), "gpu": 0.25},
        "llama": {"checkpoint": tiny_models("llama"), "gpu": 0.5, "num_samples": 1,
                  "space": {"target_modules": "all_linear", "lora_alpha_ratio": 2.0}},
    }
    space = {"lora_rank": {"choice": [4, 8]}, "learning_rate": {"loguniform": [1.0e-3, 1.0e-2]}}
    return _run_study(tmp, "enc-dec", source, models, space=space)


def test_encoder_and_decoder_share_one_study(encoder_decoder_run):
    summary, trials = encoder_decoder_run["summary"], encoder_decoder_run["trials"]
    assert summary["tokenizations"] == 2  # WordPiece and BPE: two tokenized copies, one per tokenizer
    assert summary["data"]["label_names"] == ["chatter", "disaster", "question"]
    assert sorted(trials["model"]) == ["bert", "bert", "llama"]  # each model its own num_samples
    assert set(trials["status"]) == {"COMPLETED"}
    # Each model its own space: llama's overrides apply to llama only.
    llama, bert = trials[trials["model"] == "llama"].iloc[0], trials[trials["model"] == "bert"]
    assert llama["target_modules"] == "all_linear" and llama["lora_alpha_ratio"] == 2.0
    assert llama["lora_alpha"] == 2.0 * llama["lora_rank"] and (bert["lora_alpha"] == 16).all()  # as trained
    assert set(bert["target_modules"]) == {"attention_qv"} and bert["lora_alpha_ratio"].isna().all()
    # 3 classes: macro-averaged metrics were reported for both models.
    assert trials["best_f1"].between(0, 1).all() and trials["best_accuracy"].between(0, 1).all()


def test_trials_of_both_models_interleave(encoder_decoder_run):
    """The searcher proposes round-robin, so the first two trials started are one of each model."""
    run_dir, trials = encoder_decoder_run["dir"], encoder_decoder_run["trials"]
    starts = []
    for _, row in trials.iterrows():
        first = json.loads((run_dir / f"{row['model']}_{row['trial_id']}" / "result.json").read_text().splitlines()[0])
        starts.append((first["timestamp"] - first["time_this_iter_s"], row["model"]))
    assert {model for _, model in sorted(starts)[:2]} == {"bert", "llama"}


def test_decoder_adapter_saves_its_score_head(encoder_decoder_run):
    from safetensors import safe_open

    run_dir, trials = encoder_decoder_run["dir"], encoder_decoder_run["trials"]
    checkpoint = run_dir / trials[trials["model"] == "llama"].iloc[0]["checkpoint"]
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        score = [k for k in keys if "score" in k]
        assert score and f.get_tensor(score[0]).shape[0] == 3  # the 3-label head, trained in full
    assert any("lora_A" in k and "mlp.down_proj" in k for k in keys)  # all_linear reached the decoder


def test_the_run_wrote_its_report(encoder_decoder_run):
    """`run` wrote report.md and its plots; the comparison table's numbers are trials.csv's best rows."""
    from tests.test_report import md_table, number

    run_dir, trials, summary = (encoder_decoder_run[k] for k in ("dir", "trials", "summary"))
    assert all((run_dir / name).is_file() for name in PLOTS.values())
    table = md_table((run_dir / REPORT).read_text(), "## Models compared")
    assert [row["model"] for row in table] == ["bert", "llama"]
    for row in table:
        best = trials[trials["trial_id"] == summary["models"][row["model"]]["best_trial"]].iloc[0]
        assert number(row["best F1"]) == pytest.approx(best["best_f1"], abs=5e-5)
        assert number(row["accuracy"]) == pytest.approx(best["best_accuracy"], abs=5e-5)
        assert number(row["trainable params"]) == best["trainable_params"]


def _confusion_scores(cm) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-class precision / recall / F1 and their macro averages (sklearn's: F1 averaged over classes, a class
    with nothing to count scores 0), plus accuracy, from a confusion matrix (rows true, columns predicted)."""
    cm = np.asarray(cm, dtype=np.float64)
    hits, predicted, actual = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)

    def ratio(num, den):
        return np.array([n / d if d else 0.0 for n, d in zip(num, den, strict=True)])

    per_class = {"precision": ratio(hits, predicted), "recall": ratio(hits, actual),
                 "f1": ratio(2 * hits, predicted + actual)}
    return per_class, {**{m: float(v.mean()) for m, v in per_class.items()}, "accuracy": float(hits.sum() / cm.sum())}


def test_reported_macro_metrics_are_those_of_the_confusion_matrix(encoder_decoder_run, tmp_path):
    """3 classes: each model's best trial, exported, is scored again on the validation split; the confusion matrix
    of those predictions gives the macro F1 / precision / recall and the accuracy that trials.csv and summary.json
    report for the trial (the same predictions on CPU in fp32: to 1e-9), and that the bundle reproduces."""
    from tune_app.bundle.export import export
    from tune_app.spec import config, data

    run_dir, trials, summary = (encoder_decoder_run[k] for k in ("dir", "trials", "summary"))
    names = summary["data"]["label_names"]
    for model in ("bert", "llama"):
        best = summary["models"][model]
        row = trials[trials["trial_id"] == best["best_trial"]].iloc[0]
        bundle = export(run_dir, model=model, out=tmp_path / model, echo=lambda line: None)
        metrics = json.loads((bundle / "metrics.json").read_text())
        reported, reproduced = metrics["reported_by_trial"], metrics["reproduced_by_bundle"]
        cm = np.asarray(reproduced["confusion_matrix"])

        # The matrix counts every validation row once, each in its true class (labels from the data, not a model).
        cfg = config.load(bundle / "best_config.yaml")
        val_labels = data.load_splits(cfg.data).val_labels
        assert cm.shape == (3, 3) and cm.sum() == metrics["rows"] == summary["data"]["validation_rows"]
        assert cm.sum(axis=1).tolist() == np.bincount(val_labels, minlength=3).tolist()

        per_class, macro = _confusion_scores(cm)
        for i, name in enumerate(names):  # scikit-learn's per-class report of the same predictions
            sk = reproduced["per_class"][name]
            assert sk["support"] == cm[i].sum()
            for ours, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
                assert sk[theirs] == pytest.approx(per_class[ours][i], abs=1e-9), (model, name, ours)
        for m, value in macro.items():
            assert reproduced[m] == pytest.approx(value, abs=1e-9), (model, m)  # the bundle's own scoring
            # What the run reports for the trial: its checkpoint, trials.csv's best row, summary.json.
            assert reported[m] == pytest.approx(row[f"best_{m}"], abs=1e-12), (model, m)
            assert best["metrics"][m] == pytest.approx(row[f"best_{m}"], abs=1e-12), (model, m)
            assert row[f"best_{m}"] == pytest.approx(value, abs=1e-9), (model, m, "trial vs confusion matrix")


def test_non_contiguous_integer_labels(tmp_path, tiny_models, tweets_csv, ray_session):
    """0/2/4 labels (like Sentiment140) become class ids 0/1/2; the mapping is kept in summary.json."""
    source = _three_classes(tweets_csv, tmp_path / "sentiment024.csv", [0, 4, 2])
    run = _run_study(tmp_path, "labels-024", source, {"bert": {"checkpoint": tiny_models("bert")}})
    assert run["summary"]["data"]["label_names"] == ["0", "2", "4"]
    assert len(run["summary"]["data"]["class_weights"]) == 3
    assert len(run["trials"]) == 2 and set(run["trials"]["status"]) == {"COMPLETED"}
