"""Study outputs: the per-trial table, the summary, the best configuration as a runnable study YAML.

Best = the best epoch of any trial (Tune's scope "all"), so a trial ASHA stopped at its first rung is judged by
every epoch it ran, and a trial that peaked before its last epoch is judged by its peak (whose adapter the
checkpoint keeps). With tune.confirm, a model's best is its confirmed winner (tune_app.study.confirm). The summary's
`comparison` puts a bootstrap interval on each model's best score (tune_app.study.stats).
"""

from __future__ import annotations

import csv
import json
import math
import posixpath
from pathlib import Path
from typing import Any

from tune_app.spec.config import StudyConfig
from tune_app.spec.metrics import METRICS, best_of
from tune_app.spec.rundir import (
    BEST_CONFIG,
    SUMMARY,
    TRIALS,
    VAL_PREDICTIONS,
    RunDir,
    best_fields,
    retrain_yaml,
)
from tune_app.spec.space import CONFIRMS_KEY, HYPERPARAMETERS, MODEL_KEY, SEED_KEY

BEST_SCOPE = "all: each trial's best epoch (ASHA-stopped trials included)"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def trial_rows(cfg: StudyConfig, grid, run: RunDir) -> list[dict[str, Any]]:
    """One row per trial: model, stage (search, or confirm with the search trial it confirms) and seed, status,
    every hyperparameter, epochs reached, final and best metric; its checkpoint (and error file) relative to the
    run directory."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for result in grid:
        config = result.config or {}
        history = result.metrics_dataframe
        records = history.to_dict("records") if history is not None and len(history) else []
        records = [r for r in records if r.get(metric) is not None]
        checkpoint = result.get_best_checkpoint(metric, mode) if records else None
        best = _best_record(records, metric, mode, _kept_epoch(result, checkpoint))
        epochs = int(max((r.get("training_iteration", 0) for r in records), default=0))
        status = ("FAILED" if result.error else "STOPPED_EARLY" if epochs < cfg.train.epochs else "COMPLETED")
        row: dict[str, Any] = {
            "trial_id": trial_id_of(result),
            "model": config.get(MODEL_KEY),
            "stage": "confirm" if config.get(CONFIRMS_KEY) else "search",
            "confirms": config.get(CONFIRMS_KEY),
            "seed": config.get(SEED_KEY, cfg.train.seed),
            "status": status,
            **{name: config.get(name) for name in HYPERPARAMETERS},
            "epochs": epochs,
            f"final_{metric}": records[-1][metric] if records else None,
            f"best_{metric}": best[metric] if best else None,
            "best_epoch": int(best["training_iteration"]) if best else None,
            **{f"best_{m}": best.get(m) if best else None for m in METRICS if m != metric},
            "train_time_s": records[-1].get("train_time_s") if records else None,
            "trial_time_s": records[-1].get("time_total_s") if records else None,
            "train_samples_per_s": records[-1].get("train_samples_per_s") if records else None,
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0 for r in records), default=None),
            "peak_reserved_mb": max((r.get("peak_reserved_mb") or 0 for r in records), default=None) or None,
            "trainable_params": records[-1].get("trainable_params") if records else None,
            "total_params": records[-1].get("total_params") if records else None,
            "checkpoint": _relative(checkpoint.path, run) if checkpoint else None,
            "error": _relative(posixpath.join(result.path, "error.txt"), run) if result.error else None,
        }
        rows.append({k: _clean(v) for k, v in row.items()})
    rows.sort(key=lambda r: (r["stage"] != "search", str(r["model"]), str(r["trial_id"])))
    return rows


def _kept_epoch(result, checkpoint) -> int | None:
    """The epoch whose adapter Tune kept as the trial's best checkpoint."""
    for kept, metrics in result.best_checkpoints or ():
        if checkpoint is not None and kept.path == checkpoint.path:
            return metrics.get("training_iteration")
    return None


def _best_record(records: list[dict], metric: str, mode: str, kept_epoch: int | None) -> dict | None:
    """A trial's best epoch: the one whose checkpoint Tune kept, so that where epochs tie on the metric the best
    epoch's other metrics, the checkpoint and an exported bundle are all the same epoch; else the first best."""
    kept = next((r for r in records if r.get("training_iteration") == kept_epoch), None)
    return kept or best_of(records, lambda r: r[metric], mode)


def trial_id_of(result) -> str:
    """A Result's trial id, from its folder name `<model>_<trial id>` (the study's trial_dirname_creator): there
    even for a trial that failed before it reported anything."""
    return Path(result.path).name.rsplit("_", 1)[-1]


def _relative(path: str, run: RunDir) -> str:
    """A path Ray Tune gave (inside the run directory's filesystem: a local path, or bucket/prefix/... in a remote
    store) relative to the run directory; as given when outside it."""
    if run.remote:
        root = run.path.rstrip("/") + "/"
        return path[len(root):] if path.startswith(root) else path
    try:
        return str(Path(path).resolve().relative_to(run.local.resolve()))
    except ValueError:
        return str(path)


def summarize(cfg: StudyConfig, rows: list[dict[str, Any]], run_dir: Path, **extra: Any) -> dict[str, Any]:
    """Per model, its best search trial (what confirmation, where on, replaces: confirm.apply); the overall best;
    the trials that failed (of either stage)."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    key = f"best_{metric}"
    models: dict[str, Any] = {}
    for name in cfg.models:
        mine = [r for r in rows if r["model"] == name and r["stage"] == "search"]
        models[name] = {
            **best_fields(best_of(mine, lambda r: r[key], mode), metric),
            "trials": len(mine),
            "completed": sum(r["status"] == "COMPLETED" for r in mine),
            "stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in mine),
            "failed": sum(r["status"] == "FAILED" for r in mine),
        }
    overall = best_of(models, lambda name: models[name]["best_metric"], mode)
    return {
        "study": cfg.name,
        "run_dir": str(run_dir),
        "metric": metric,
        "mode": mode,
        "best_scope": BEST_SCOPE,
        "models": models,
        "best": ({"model": overall, "trial_id": models[overall]["best_trial"], metric: models[overall]["best_metric"],
                  "config": models[overall]["best_config"]} if overall else None),
        # Trials that failed for good (after tune.max_failures retries), each with its traceback file.
        "failed_trials": [{k: r[k] for k in ("trial_id", "model", "error")} for r in rows if r["status"] == "FAILED"],
        **extra,
    }


def best_config_yaml(cfg: StudyConfig, summary: dict[str, Any]) -> str | None:
    """The study's winner as `retrain_yaml`: `tune-app run best_config.yaml` retrains it once."""
    best = summary["best"]
    if best is None:
        return None
    metric = summary["metric"]
    if confirmed := best.get("confirmed"):
        how = (f"confirmed: mean {confirmed['mean']:.4f} over seeds {', '.join(map(str, confirmed['seeds']))}; "
               f"this is its best seed, {best['seed']}")
    else:
        how = "best epoch of any trial"
    return retrain_yaml(cfg, best["model"], best["config"], (
        f"# Best of study run {summary['run_dir']}: model {best['model']}, trial {best['trial_id']}, "
        f"{metric} = {best[metric]:.4f} ({how}).\n"), seed=best.get("seed"))


def comparison(cfg: StudyConfig, summary: dict[str, Any], results: list, labels, num_labels: int) -> dict[str, Any]:
    """Each model's best score with a bootstrap 95% interval over the validation rows, from the predictions its
    best checkpoint saved; which models are clearly worse than the best (stats.bootstrap_comparison)."""
    import numpy as np

    from tune_app.study.stats import RESAMPLES, bootstrap_comparison

    by_id = {trial_id_of(r): r for r in results}
    predictions = {}
    for name, m in summary["models"].items():
        result = by_id.get(m["best_trial"])
        checkpoint = result.get_best_checkpoint(cfg.tune.metric, cfg.tune.mode) if result else None
        if checkpoint is None:
            continue
        try:
            with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{VAL_PREDICTIONS}") as f:
                predictions[name] = np.load(f)
        except (OSError, ValueError):  # a checkpoint from before predictions were saved: no interval
            continue
    scores = bootstrap_comparison(labels, predictions, cfg.tune.metric, cfg.tune.mode, num_labels)
    return {"metric": cfg.tune.metric, "resamples": RESAMPLES, "confidence": 0.95, "models": scores} if scores else {}


def write_results(cfg: StudyConfig, run: RunDir, grid, prepared, resources, extra: dict[str, Any] | None = None,
                  confirmation: tuple[dict, list] | None = None) -> dict[str, Any]:
    """trials.csv, summary.json and best_config.yaml of a study: `grid`, its search's finished results;
    `confirmation`, (confirm.candidates' picks, the confirmation stage's finished results) once that has run. They
    are written to `run.local` (its staging folder when remote: the caller publishes them)."""
    from tune_app.study import confirm

    run_dir = run.local
    run_dir.mkdir(parents=True, exist_ok=True)
    picked, confirm_grid = confirmation or ({}, [])
    results = [*grid, *confirm_grid]
    rows = trial_rows(cfg, results, run)
    with open(run_dir / TRIALS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(
        cfg, rows, run_dir,
        tokenizations=len(prepared.tokenized),
        data={"train_rows": len(prepared.splits.train_texts), "validation_rows": len(prepared.splits.val_texts),
              "label_names": prepared.splits.label_names, "class_weights": prepared.splits.class_weights},
        resources=resources,
    )
    if confirmation is not None:
        summary["confirmation"] = confirm.summarize(cfg, picked, [r for r in rows if r["stage"] == "confirm"])
        confirm.apply(summary, summary["confirmation"], rows)
    summary["comparison"] = comparison(cfg, summary, results, prepared.splits.val_labels, prepared.splits.num_labels)
    summary.update(extra or {})  # the caller's facts: run_dir as the user sees it, complete, ...
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    if (text := best_config_yaml(cfg, summary)) is not None:
        (run_dir / BEST_CONFIG).write_text(text)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: best F1 / precision / recall / accuracy per model, the bootstrap interval of the
    study's metric (and whether the model is clearly worse than the best), with tune.confirm the confirmed mean
    and its interval; trials run, stopped early and failed."""
    metric = summary["metric"]
    intervals = (summary.get("comparison") or {}).get("models") or {}
    confirming = bool(summary.get("confirmation"))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    span = lambda ci: f"{fmt(ci[0])}-{fmt(ci[1])}" if ci else "-"  # noqa: E731
    header = ("model", "best f1", "precision", "recall", "accuracy", f"{metric} 95% (bootstrap)",
              *(("confirmed mean", "its 95%") if confirming else ()), "trials", "stopped early", "failed")
    lines = [header]
    for name, m in summary["models"].items():
        met, scored, confirmed = m["metrics"] or {}, intervals.get(name), m.get("confirmed") or {}
        interval = span(scored["ci95"]) + (" clearly worse" if scored["clearly_worse"] else "") if scored else "-"
        lines.append((name, fmt(met.get("f1")), fmt(met.get("precision")), fmt(met.get("recall")),
                      fmt(met.get("accuracy")), interval,
                      *((fmt(confirmed.get("mean")), span(confirmed.get("ci95"))) if confirming else ()),
                      str(m["trials"]), str(m["stopped_early"]), str(m["failed"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
