"""The benchmark script end to end on the packaged MiniLM, at toy sizes: all three parts run, the JSON holds their
figures, and the parts of the study's fixed overhead are durations. The trial part's F1 is scored again with
scikit-learn from the logits its evaluation produced."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_trials(monkeypatch) -> tuple[list, list]:
    """Record, in this process, what the bench's in-process trials return (trainable.fit's epoch metrics) and the
    validation labels and logits each evaluation scored (evaluation.predict_logits, which `evaluate` calls)."""
    from tune_app.train import evaluation, trainable

    histories, scored = [], []
    fit, predict_logits = trainable.fit, evaluation.predict_logits

    def recording_fit(*args, **kwargs):
        history = fit(*args, **kwargs)
        histories.append([dict(m) for m in history])
        return history

    def recording_predict_logits(model, split, *args, **kwargs):
        logits, fitted = predict_logits(model, split, *args, **kwargs)
        scored.append((split.labels.copy(), logits.copy()))
        return logits, fitted

    monkeypatch.setattr(trainable, "fit", recording_fit)  # bench.trial imports fit when it runs
    monkeypatch.setattr(evaluation, "predict_logits", recording_predict_logits)
    return histories, scored


def test_bench_measures_reference_trial_and_study(ray_session, tweets_csv, tmp_path, capsys, monkeypatch):
    bench = _bench_module()
    histories, scored = _record_trials(monkeypatch)
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "minilm", "--parts", "reference,trial,study", "--steps", "4", "--warmup", "1",
                       "--k", "2", "--trials", "3", "--limit", "60", "--epochs", "1", "--max-length", "64",
                       "--data", str(tweets_csv), "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())["models"]["minilm"]
    assert not [part for part, r in result.items() if "error" in r], result

    reference, trial, study = result["reference"], result["trial"], result["study"]
    assert reference["samples_per_s"] > 0 and trial["samples_per_s"] > 0
    assert trial["cuda_graphs"] == 0 and 0.0 <= trial["f1"] <= 1.0  # CPU: no graphs; the epoch trained and scored
    assert trial["base_reused"] is True and 0.0 <= trial["model_load_reused_s"] <= trial["model_load_s"]
    assert study["trials"] == 3 and study["failed"] == 0
    assert study["bases_reused"] == 1  # 2 workers, 3 trials: the third runs in a worker that kept its base
    assert 0.0 < study["utilisation"] <= 1.0
    parts = ("setup_per_trial_s", "checkpoints_per_trial_s", "between_trials_per_trial_s", "tail_per_trial_s")
    assert study["setup_per_trial_s"] >= study["imports_per_trial_s"] >= 0.0
    assert min(study[p] for p in parts) > -0.5, study  # each part a duration: the trial clock agrees with Tune's
    assert "| minilm | study |" in capsys.readouterr().out  # the markdown table is printed last
    _check_trial_f1(trial, histories, scored, tweets_csv)


def _check_trial_f1(trial: dict, histories: list, scored: list, tweets_csv) -> None:
    """The trial part's f1 is the F1 of the positive class (id 1) of the argmax predictions on the first 256 rows
    of the study's validation split, as scikit-learn computes it from the logits the trial's evaluation produced;
    and the epoch's precision and recall agree with it (F1 = 2PR / (P + R))."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    from tune_app.spec.config import DataConfig
    from tune_app.spec.data import load_splits

    # Two in-process fits of one epoch each: the measured one, then its reused-base rerun on 8 rows.
    assert [len(h) for h in histories] == [1, 1] and [len(labels) for labels, _ in scored] == [256, 8], (
        [len(h) for h in histories], [len(labels) for labels, _ in scored])
    (epoch,), (labels, logits) = histories[0], scored[0]
    splits = load_splits(DataConfig(source=str(tweets_csv), text="text", label="target", max_length=64))
    np.testing.assert_array_equal(labels, splits.val_labels[:256])  # the bench's validation rows, in order
    assert splits.label_names == ["0", "1"] and logits.shape == (256, 2) and np.isfinite(logits).all()

    preds = logits.argmax(axis=1)
    expected = {"f1": f1_score(labels, preds, pos_label=1, zero_division=0),
                "precision": precision_score(labels, preds, pos_label=1, zero_division=0),
                "recall": recall_score(labels, preds, pos_label=1, zero_division=0),
                "accuracy": accuracy_score(labels, preds)}
    assert trial["f1"] == epoch["f1"]  # the bench reports the trial's own figure
    for name, value in expected.items():
        assert epoch[name] == pytest.approx(value, abs=1e-9), (name, epoch[name], value)
    p, r = epoch["precision"], epoch["recall"]
    assert epoch["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0, abs=1e-9)
    hits = int((preds == labels).sum())
    assert epoch["accuracy"] * 256 == pytest.approx(hits, abs=1e-6)  # a count of rows, exactly


@pytest.mark.gpu
def test_the_memory_cap_makes_each_gpu_as_small_as_asked():
    """--gpu-memory-gb (the issue's 24 GB check of 8 packed llama-7b trials): past the cap an allocation fails as on
    a smaller GPU; under it, it succeeds."""
    import torch

    bench = _bench_module()
    torch.cuda.empty_cache()
    bench.cap_gpu_memory(1.0)
    try:
        fits = torch.empty(2**29, dtype=torch.uint8, device="cuda")  # 0.5 GiB
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2**31, dtype=torch.uint8, device="cuda")  # 2 GiB
        del fits
    finally:
        for device in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(1.0, device)
