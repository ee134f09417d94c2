"""The benchmark script end to end on the packaged MiniLM, at toy sizes: all three parts run, the JSON holds their
figures, and the parts of the study's fixed overhead are durations."""

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


def test_bench_measures_reference_trial_and_study(ray_session, tweets_csv, tmp_path, capsys):
    bench = _bench_module()
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
