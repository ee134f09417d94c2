"""Hostile but realistic inputs to export, predict, evaluate, report and resume: damaged bundles and run
directories, odd input files and output paths. Each is exit 2 with a message naming what is wrong, never a
traceback, and nothing the user made is written or changed.

One real run (a tiny random-weight BERT, one trial of one epoch; its `run` exports RUN_DIR/best) is built once per
module; each case copies what it needs into its own tmp_path and damages the copy."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tune_app import cli

TEXT = "Forest fire near La Ronge Sask. Canada"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models, tweets_csv, ray_session):
    """One finished run of one tiny trial; its best bundle is RUN_DIR/best."""
    import pandas as pd

    root = tmp_path_factory.mktemp("hostile-outputs")
    data = root / "tweets.csv"
    pd.read_csv(tweets_csv).sample(n=120, random_state=0).to_csv(data, index=False)
    study = root / "study.yaml"
    study.write_text(f"""
name: hostile
data: {{source: {data}, text: text, label: target, limit: 120, max_length: 32}}
models:
  tiny: {{checkpoint: {tiny_models("bert")}, cpu: 1}}
train: {{epochs: 1, batch_size: 16, eval_batch_size: 16}}
tune: {{num_samples: 1, seed: 0, asha: {{enabled: false}}}}
output_dir: {root / 'runs'}
wandb: {{mode: disabled}}
""")
    assert cli.main(["run", str(study)]) == 0
    (run_dir,) = (root / "runs").iterdir()
    assert (run_dir / "best" / "bundle.json").is_file()
    return run_dir


class Ctx:
    """A case's own folder, with copies of the module's run directory and bundle made on demand."""

    def __init__(self, tmp: Path, request):
        self.tmp, self._request = tmp, request

    def _built(self) -> Path:
        return self._request.getfixturevalue("built")

    def bundle(self) -> Path:
        target = self.tmp / "bundle"
        if not target.exists():
            shutil.copytree(self._built() / "best", target)
        return target

    def run(self) -> Path:
        target = self.tmp / "run"
        if not target.exists():
            shutil.copytree(self._built(), target, ignore=shutil.ignore_patterns("best"))
        return target

    def checkpoint(self) -> Path:
        (folder,) = self.run().glob("tiny_*/checkpoint_*")
        return folder

    def file(self, name: str, content: str | bytes = "") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True)
        return path

    def labelled(self, name: str = "labelled.csv", labels=(0, 1, 1)) -> Path:
        rows = "\n".join(f'"{TEXT} {i}",{label}' for i, label in enumerate(labels))
        return self.file(name, f"text,target\n{rows}\n")

    def texts(self, name: str = "texts.csv") -> Path:
        return self.file(name, f'text\n"{TEXT}"\nI love fruits\n')


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)  # changes data in place (what it returns, e.g. a popped value, is not the file)
    path.write_text(json.dumps(data))


def predict_text(b: Path) -> list[str]:
    return ["predict", str(b), "--text", TEXT]


def evaluate(ctx: Ctx, b: Path) -> list[str]:
    return ["evaluate", str(b), "--data", str(ctx.labelled())]


def parquet(path: Path) -> Path:
    import pandas as pd

    pd.DataFrame({"tweet": [TEXT, "I love fruits"]}).to_parquet(path, index=False)
    return path


def unfinished_run(ctx: Ctx) -> Path:
    """The run as a study interrupted midway leaves it: Tune's state, study.yaml, no summary yet."""
    run = ctx.run()
    (run / "summary.json").unlink()
    return run


# --------------------------------------------------------------------------------------------- bundle damage

def _adapter(content: bytes | Callable[[bytes], bytes]):
    def setup(ctx: Ctx, verb: str) -> list[str]:
        b = ctx.bundle()
        f = b / "adapter_model.safetensors"
        f.write_bytes(content(f.read_bytes()) if callable(content) else content)
        return predict_text(b) if verb == "predict" else evaluate(ctx, b)
    return setup


def _bundle_file(name: str, damage: Callable[[Path], None]):
    def setup(ctx: Ctx, verb: str) -> list[str]:
        b = ctx.bundle()
        damage(b / name)
        return predict_text(b) if verb == "predict" else evaluate(ctx, b)
    return setup


def _three_labels(p: Path) -> None:
    names = ["0", "1", "2"]
    p.write_text(json.dumps({"label_names": names, "id2label": dict(enumerate(names)),
                             "label2id": {n: i for i, n in enumerate(names)}, "class_weights": [1, 1, 1]}))


BUNDLE_DAMAGE = [
    ("adapter-truncated", _adapter(lambda b: b[: len(b) // 2]), "adapter_model.safetensors"),
    ("adapter-garbage", _adapter(b"\x89garbage, not a safetensors file" * 50), "adapter_model.safetensors"),
    ("adapter-empty", _adapter(b""), "adapter_model.safetensors"),
    ("adapter-config-missing", _bundle_file("adapter_config.json", Path.unlink), "adapter_config.json"),
    ("adapter-config-garbled", _bundle_file("adapter_config.json", lambda p: p.write_text("{'r': 8,")),
     "adapter_config.json"),
    ("adapter-config-list", _bundle_file("adapter_config.json", lambda p: p.write_text("[1, 2]")),
     "adapter_config.json"),
    ("bundle-json-garbled", _bundle_file("bundle.json", lambda p: p.write_text("{\"model\": ")), "bundle.json"),
    ("bundle-json-empty", _bundle_file("bundle.json", lambda p: p.write_text("")), "bundle.json"),
    ("bundle-json-list", _bundle_file("bundle.json", lambda p: p.write_text("[]")), "bundle.json"),
    ("bundle-json-no-data", _bundle_file("bundle.json", lambda p: edit_json(p, lambda d: d.pop("data"))),
     "bundle.json"),
    ("bundle-json-no-base", _bundle_file("bundle.json", lambda p: edit_json(p, lambda d: d.pop("base"))),
     "bundle.json"),
    ("threshold-string", _bundle_file("bundle.json", lambda p: edit_json(
        p, lambda d: d["decision"].update(threshold="0.5"))), "threshold"),
    ("threshold-out-of-range", _bundle_file("bundle.json", lambda p: edit_json(
        p, lambda d: d["decision"].update(threshold=1.7))), "threshold"),
    ("max-length-string", _bundle_file("bundle.json", lambda p: edit_json(
        p, lambda d: d["data"].update(max_length="long"))), "max_length"),
    ("labels-json-garbled", _bundle_file("labels.json", lambda p: p.write_text("label_names: [0, 1]")),
     "labels.json"),
    ("labels-json-no-names", _bundle_file("labels.json", lambda p: edit_json(p, lambda d: d.pop("label_names"))),
     "label_names"),
    ("label-names-not-list", _bundle_file("labels.json", lambda p: edit_json(
        p, lambda d: d.update(label_names="01"))), "label_names"),
    ("label-names-one-class", _bundle_file("labels.json", lambda p: edit_json(
        p, lambda d: d.update(label_names=["0"]))), "label_names"),
    ("labels-head-disagree", _bundle_file("labels.json", _three_labels), "3 class"),
]

BUNDLE_CASES = [
    pytest.param(verb, setup, phrase, id=f"{verb}-{name}")
    for name, setup, phrase in BUNDLE_DAMAGE for verb in ("predict",)
] + [
    pytest.param("evaluate", setup, phrase, id=f"evaluate-{name}")
    for name, setup, phrase in BUNDLE_DAMAGE
    if name in ("adapter-garbage", "bundle-json-garbled", "labels-json-no-names", "labels-head-disagree")
]


# --------------------------------------------------------------------------------------------- everything else

def _b(ctx: Ctx) -> str:
    return str(ctx.bundle())


def _predict_input(make: Callable[[Ctx], Path | str], *extra: str):
    def setup(ctx: Ctx) -> list[str]:
        return ["predict", _b(ctx), "--input", str(make(ctx)), "--output", str(ctx.tmp / "out.csv"), *extra]
    return setup


def _evaluate_data(make: Callable[[Ctx], Path | str], *extra: str):
    def setup(ctx: Ctx) -> list[str]:
        return ["evaluate", _b(ctx), "--data", str(make(ctx)), *extra]
    return setup


def _export(change: Callable[[Ctx, Path], object] | None = None, *extra: str | Callable[[Ctx], str]):
    def setup(ctx: Ctx) -> list[str]:
        run = ctx.run()
        if change is not None:
            change(ctx, run)
        return ["export", str(run), *(e(ctx) if callable(e) else e for e in extra)]
    return setup


def _report(change: Callable[[Ctx, Path], object]):
    def setup(ctx: Ctx) -> list[str]:
        run = ctx.run()
        (run / "report.md").unlink()
        change(ctx, run)
        return ["report", str(run)]
    return setup


def _resume(change: Callable[[Ctx, Path], object]):
    def setup(ctx: Ctx) -> list[str]:
        run = unfinished_run(ctx)
        change(ctx, run)
        return ["resume", str(run)]
    return setup


def _write(name: str, content: str) -> Callable[[Ctx, Path], None]:
    return lambda ctx, run: (run / name).write_text(content)


def _damaged(run: Path, name: str, content: str) -> Path:
    (run / name).write_text(content)
    return run


PANDAS_COLUMNS_JSON = json.dumps({"text": {"0": TEXT, "1": "I love fruits"}})
INVALID_STUDY = "name: hostile\nmodels: {}\ntrain: {epochs: -1}\n"

OTHER_CASES = [
    # predict: input files
    ("predict-input-header-only", _predict_input(lambda c: c.file("in.csv", "text\n")), "no rows"),
    ("predict-input-zero-bytes", _predict_input(lambda c: c.file("in.csv", "")), "empty"),
    ("predict-input-unknown-extension", _predict_input(lambda c: c.file("in.txt", TEXT)), "unsupported file type"),
    ("predict-input-folder", _predict_input(lambda c: c.folder("texts.csv")), "a folder"),
    ("predict-input-dev-null", _predict_input(lambda c: "/dev/null"), "/dev/null"),
    ("predict-input-json-empty-list", _predict_input(lambda c: c.file("in.json", "[]")), "no rows"),
    ("predict-input-jsonl-blank-lines", _predict_input(lambda c: c.file("in.jsonl", "\n\n")), "in.jsonl"),
    ("predict-input-json-bare-string", _predict_input(lambda c: c.file("in.json", json.dumps(TEXT))), "in.json"),
    ("predict-input-json-garbled", _predict_input(lambda c: c.file("in.jsonl", '{"text": "a"}\n{"text": ')),
     "cannot read"),
    ("predict-input-parquet-no-text-column", _predict_input(lambda c: parquet(c.tmp / "in.parquet")),
     "no column 'text'"),
    ("predict-input-csv-blank-texts", _predict_input(lambda c: c.file("in.csv", "text\n\n \n,\n")), "text"),
    ("predict-text-column-missing", _predict_input(lambda c: c.texts(), "--text-column", "tweet"),
     "no column 'tweet'"),
    ("predict-text-empty", lambda c: ["predict", _b(c), "--text", ""], "empty text"),
    ("predict-text-blank", lambda c: ["predict", _b(c), "--text", TEXT, "--text", "   "], "empty text"),
    ("predict-output-below-file", lambda c: ["predict", _b(c), "--text", TEXT, "--output",
                                             str(c.file("a-file.txt", "x") / "sub" / "out.csv")], "is a file"),
    ("predict-output-exists", lambda c: ["predict", _b(c), "--input", str(c.texts()), "--output",
                                         str(c.file("out.csv", "keep me\n"))], "already exists"),
    ("predict-output-unknown-extension", lambda c: ["predict", _b(c), "--input", str(c.texts()), "--output",
                                                    str(c.tmp / "out.xlsx")], "unsupported file type"),
    ("predict-output-is-input", lambda c: ["predict", _b(c), "--input", str(c.texts()), "--output",
                                           str(c.tmp / "texts.csv")], "already exists"),
    ("predict-bundle-is-file", lambda c: ["predict", str(c.file("bundle.zip", "PK")), "--text", TEXT],
     "no such bundle directory"),
    ("predict-bundle-is-run-dir", lambda c: ["predict", str(c.run()), "--text", TEXT], "not a tune-app bundle"),
    # evaluate
    ("evaluate-header-only", _evaluate_data(lambda c: c.file("l.csv", "text,target\n")), "no rows"),
    ("evaluate-zero-bytes", _evaluate_data(lambda c: c.file("l.csv", "")), "empty"),
    ("evaluate-unseen-labels", _evaluate_data(lambda c: c.labelled(labels=("yes", "no", 1))), "never saw"),
    ("evaluate-label-nans", _evaluate_data(lambda c: c.file("l.csv", f"text,target\n{TEXT},\nfruit,\n")),
     "missing label"),
    ("evaluate-label-column-missing", _evaluate_data(lambda c: c.labelled(), "--label", "y"), "no column 'y'"),
    ("evaluate-data-folder", _evaluate_data(lambda c: c.tmp), "a folder"),
    ("evaluate-json-out-below-file", _evaluate_data(
        lambda c: c.labelled(), "--json-out", "PLACEHOLDER"), "is a file"),
    ("evaluate-json-out-exists", _evaluate_data(lambda c: c.labelled(), "--json-out", "EXISTS"), "already exists"),
    # export
    ("export-out-below-file", _export(None, "--out", lambda c: str(c.file("a-file.txt", "x") / "bundle")),
     "is a file"),
    ("export-out-non-empty", _export(None, "--out", lambda c: str(c.file("mine/notes.txt", "mine").parent)),
     "not empty"),
    ("export-out-is-file", _export(None, "--out", lambda c: str(c.file("mine.txt", "mine"))), "is a file"),
    ("export-unknown-trial", _export(None, "--trial", "deadbeef"), "--trial deadbeef"),
    ("export-unknown-model", _export(None, "--model", "gpt5"), "--model gpt5"),
    ("export-run-dir-is-file", lambda c: ["export", str(c.file("run.txt", "x"))], "run.txt"),
    ("export-run-dir-missing", lambda c: ["export", str(c.tmp / "nope")], "no such run directory"),
    ("export-summary-garbled", _export(_write("summary.json", "{\"best\": {")), "summary.json"),
    ("export-summary-empty", _export(_write("summary.json", "")), "summary.json"),
    ("export-summary-list", _export(_write("summary.json", "[]")), "summary.json"),
    ("export-summary-best-not-dict", _export(lambda c, r: edit_json(r / "summary.json",
                                                                    lambda d: d.update(best="tiny"))),
     "summary.json"),
    ("export-trials-garbled", _export(_write("trials.csv", "\x00\x01garbage\"\n\"x")), "trials.csv"),
    ("export-trials-empty", _export(_write("trials.csv", "")), "trials.csv"),
    ("export-trials-missing-columns", _export(_write("trials.csv", "a,b\n1,2\n")), "trials.csv"),
    ("export-study-yaml-invalid-yaml", _export(_write("study.yaml", "name: [unclosed\n  models: {")), "study.yaml"),
    ("export-study-yaml-invalid-study", _export(_write("study.yaml", INVALID_STUDY)), "study.yaml"),
    ("export-study-yaml-missing", _export(lambda c, r: (r / "study.yaml").unlink()), "study.yaml"),
    ("export-checkpoint-deleted", _export(lambda c, r: shutil.rmtree(c.checkpoint())), "checkpoint"),
    ("export-checkpoint-adapter-garbage", _export(lambda c, r: (c.checkpoint() / "adapter_model.safetensors")
                                                  .write_bytes(b"garbage" * 100)), "adapter_model.safetensors"),
    ("export-checkpoint-adapter-truncated", _export(lambda c, r: (
        c.checkpoint() / "adapter_model.safetensors").write_bytes(
        (c.checkpoint() / "adapter_model.safetensors").read_bytes()[:100])), "adapter_model.safetensors"),
    ("export-checkpoint-metrics-garbled", _export(lambda c, r: (c.checkpoint() / "metrics.json").write_text("{")),
     "metrics.json"),
    # report
    ("report-summary-garbled", _report(_write("summary.json", "{\"metric\": ")), "summary.json"),
    ("report-summary-list", _report(_write("summary.json", "[1]")), "summary.json"),
    ("report-summary-no-metric", _report(lambda c, r: edit_json(r / "summary.json", lambda d: d.pop("metric"))),
     "summary.json"),
    ("report-trials-garbled", _report(_write("trials.csv", "\"unclosed\nx,y\n")), "trials.csv"),
    ("report-trials-empty", _report(_write("trials.csv", "")), "trials.csv"),
    ("report-run-dir-is-file", lambda c: ["report", str(c.file("run.txt", "x"))], "run.txt"),
    # resume
    ("resume-run-dir-is-file", lambda c: ["resume", str(c.file("run.txt", "x"))], "run.txt"),
    ("resume-empty-folder", lambda c: ["resume", str(c.tmp)], "study.yaml"),
    ("resume-study-yaml-invalid-yaml", _resume(_write("study.yaml", "name: [unclosed\n  models: {")), "study.yaml"),
    ("resume-study-yaml-invalid-study", _resume(_write("study.yaml", INVALID_STUDY)), "study.yaml"),
    ("resume-study-yaml-list", _resume(_write("study.yaml", "- a\n- b\n")), "study.yaml"),
    ("resume-summary-garbled", lambda c: ["resume", str(_damaged(c.run(), "summary.json", "{"))], "summary.json"),
]

FAST = {"predict-bundle-is-file", "export-run-dir-is-file", "export-run-dir-missing", "report-run-dir-is-file",
        "resume-run-dir-is-file", "resume-empty-folder"}
"""Cases that need neither the run nor the bundle (the rest are marked slow: they build the module's run)."""


def _params(cases):
    return [pytest.param(setup, phrase, id=name, marks=() if name in FAST else pytest.mark.slow)
            for name, setup, phrase in cases]


# --------------------------------------------------------------------------------------------- the checks


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root with its content hash: a case must leave it exactly as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def check_refused(argv: list[str], phrase: str, tmp: Path, capsys, monkeypatch) -> str:
    monkeypatch.delenv("TUNE_APP_TRACEBACK", raising=False)
    before = tree(tmp)
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, f"exit {code}, expected 2 (bad input): {text[-2000:]}"
    assert "Traceback" not in text, text
    assert phrase.lower() in text.lower(), f"{phrase!r} not in: {text[-2000:]}"
    assert tree(tmp) == before, "a refused command wrote or changed files"
    return text


@pytest.mark.slow
@pytest.mark.parametrize("verb,setup,phrase", BUNDLE_CASES)
def test_damaged_bundle_refused(verb, setup, phrase, tmp_path, request, capsys, monkeypatch):
    ctx = Ctx(tmp_path, request)
    argv = setup(ctx, verb)
    text = check_refused(argv, phrase, tmp_path, capsys, monkeypatch)
    assert "export" in text, "the message says how to fix it: export the bundle again"


@pytest.mark.parametrize("setup,phrase", _params(OTHER_CASES))
def test_hostile_input_refused(setup, phrase, tmp_path, request, capsys, monkeypatch):
    ctx = Ctx(tmp_path, request)
    argv = setup(ctx)
    for i, arg in enumerate(argv):  # --json-out cases: the path needs the case's folder
        if arg == "PLACEHOLDER":
            argv[i] = str(ctx.file("a-file.txt", "x") / "report.json")
        elif arg == "EXISTS":
            argv[i] = str(ctx.file("report.json", "{}"))
    check_refused(argv, phrase, tmp_path, capsys, monkeypatch)


def test_case_count():
    assert len(BUNDLE_CASES) + len(OTHER_CASES) >= 45


@pytest.mark.slow
def test_pandas_column_json_is_read_as_its_rows(tmp_path, request, capsys):
    """pandas' default DataFrame.to_json() layout ({"text": {"0": ..., "1": ...}}) is two rows, not one."""
    ctx = Ctx(tmp_path, request)
    out = tmp_path / "predictions.jsonl"
    assert cli.main(["predict", str(ctx.bundle()), "--input", str(ctx.file("in.json", PANDAS_COLUMNS_JSON)),
                     "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == [TEXT, "I love fruits"]
    assert "2 predictions" in capsys.readouterr().err
