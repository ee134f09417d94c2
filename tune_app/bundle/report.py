"""The study report: `report.md` plus PNG plots in the run directory, from the files a run leaves there.

    summary.json            which trial is best per model, data and label facts, bootstrap intervals, confirmation
    trials.csv              one row per trial (hyperparameters, status, epochs, best/final metric, time, memory)
    <model>_<trial_id>/result.json (or progress.csv)   each trial's per-epoch history (Ray Tune writes it)

The first table is the one the reference blog shows (best F1, precision, recall, accuracy, wall time), with a
bootstrap 95% interval on each model's score and whether it is clearly worse than the best, and the cost next to
it: peak memory and trainable parameters of the best trial, then the trial time each model used. With
tune.confirm, a table of the confirmed configurations (mean, spread and interval over seeds) follows.
Plots are made with matplotlib's Agg backend (no display needed) and embedded in report.md.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.bundle.runfiles import read_summary
from tune_app.errors import ReportError
from tune_app.spec.metrics import SCORES, better
from tune_app.spec.rundir import (
    CONFIRM_DIR,
    STUDY,
    SUMMARY,
    TRIALS,
    failure_line,
    open_results,
    resume_command,
    unfinished,
)
from tune_app.spec.space import HYPERPARAMETERS, is_distribution

REPORT = "report.md"
PLOTS = {
    "best_so_far": "plot_best_so_far.png",
    "cost_front": "plot_metric_vs_cost.png",
    "hyperparameters": "plot_metric_vs_hyperparameters.png",
    "rungs": "plot_asha_rungs.png",
    "history": "plot_learning_curves.png",
}
"""Plot name -> file written in the run directory."""


@dataclass
class RunData:
    """Everything the report reads from one run directory."""

    run_dir: Path
    summary: dict[str, Any]
    trials: Any
    """trials.csv's search trials as a pandas DataFrame (one row per trial)."""
    confirm_trials: Any
    """trials.csv's confirmation trials (tune.confirm; empty without), likewise."""
    history: dict[str, Any]
    """trial_id -> that trial's per-epoch results (DataFrame sorted by training_iteration; may be empty)."""

    @property
    def metric(self) -> str:
        return self.summary["metric"]

    @property
    def mode(self) -> str:
        return self.summary.get("mode", "max")

    @property
    def models(self) -> list[str]:
        return list(self.summary.get("models", {}))

    @functools.cached_property
    def config(self):
        """The run's study.yaml through the config loader (so defaults the YAML left out count), or None; read
        once per report, however many plots ask."""
        import yaml

        from tune_app.spec.config import from_dict

        try:
            raw = yaml.safe_load((self.run_dir / STUDY).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None
        return from_dict(raw, []) if isinstance(raw, dict) else None  # problems are irrelevant to a report


# --------------------------------------------------------------------------------------------- loading


def _read_history(trial_dir: Path) -> Any:
    """A trial's reported results, one row per epoch: result.json (JSON lines) or else progress.csv."""
    import pandas as pd

    records = []
    result = trial_dir / "result.json"
    if result.is_file():
        for line in result.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line cut short by an interrupted run
                    continue
        frame = pd.DataFrame.from_records(records)
    elif (trial_dir / "progress.csv").is_file():
        frame = pd.read_csv(trial_dir / "progress.csv")
    else:
        frame = pd.DataFrame()
    if "training_iteration" in frame:
        frame = frame.sort_values("training_iteration").reset_index(drop=True)
    return frame


def _trial_dirs(run_dir: Path, trial_ids: list[str]) -> dict[str, Path]:
    """trial_id -> its folder (`<model>_<trial_id>`, as the study names them)."""
    found = {}
    folders = [p for p in run_dir.iterdir() if p.is_dir()]
    if (run_dir / CONFIRM_DIR).is_dir():
        folders += [p for p in (run_dir / CONFIRM_DIR).iterdir() if p.is_dir()]
    for trial_id in trial_ids:
        for folder in folders:
            if folder.name.endswith("_" + trial_id) or folder.name == trial_id:
                found[trial_id] = folder
                break
    return found


def load_run(run_dir: str | Path, shown: str | None = None) -> RunData:
    """Read summary.json, trials.csv and every trial's history; ReportError when the run has no results.
    `shown`: the run directory as messages name it (a remote run's URI; default: run_dir)."""
    import pandas as pd

    run_dir = Path(run_dir).expanduser()
    shown = shown or str(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{shown}: no such run directory (pass the directory `tune-app run` printed)")
    if not (run_dir / SUMMARY).is_file():
        started = any(run_dir.glob("experiment_state-*.json"))  # Ray Tune's state: a study began here
        how = (f"the study did not finish: continue it with `{resume_command(shown)}`, then report"
               if started else "pass the run directory `tune-app run` printed (it holds summary.json and trials.csv)")
        raise ReportError(f"{shown}: no {SUMMARY} here, so there are no study results to report on yet; {how}")
    summary = read_summary(run_dir, shown, ReportError)
    try:
        trials = pd.read_csv(run_dir / TRIALS, dtype={"trial_id": str})
    except (OSError, ValueError) as e:
        raise ReportError(f"{run_dir / TRIALS}: cannot read it ({e})") from None
    if "model" not in trials:
        trials = pd.DataFrame(columns=["trial_id", "model", "status"])
    dirs = _trial_dirs(run_dir, trials["trial_id"].astype(str).tolist())
    history = {tid: _read_history(folder) for tid, folder in dirs.items()}
    confirming = trials["stage"] == "confirm" if "stage" in trials else pd.Series(False, index=trials.index)
    return RunData(run_dir, summary, trials[~confirming].reset_index(drop=True),
                   trials[confirming].reset_index(drop=True), history)


# --------------------------------------------------------------------------------------------- facts


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def best_rows(run: RunData) -> dict[str, dict[str, Any] | None]:
    """Model -> its best trial's row of trials.csv (the trial summary.json names: with tune.confirm, a
    confirmation trial), or None."""
    import pandas as pd

    every = pd.concat([run.trials, run.confirm_trials], ignore_index=True)
    out = {}
    for model in run.models:
        best_id = run.summary["models"][model].get("best_trial")
        rows = every[every["trial_id"].astype(str) == str(best_id)]
        out[model] = rows.iloc[0].to_dict() if best_id is not None and len(rows) else None
    return out


def memory_kind(run: RunData) -> str:
    """'GPU' when any trial ran on a GPU (peak_memory_mb is then torch's peak allocation), else 'RSS'."""
    for frame in run.history.values():
        if "device" in frame and (frame["device"] == "cuda").any():
            return "GPU"
    return "RSS"


def searched_hyperparameters(run: RunData) -> list[str]:
    """Hyperparameters the study searched for at least one model (a distribution in study.yaml, even when every
    trial drew the same value), and any whose value differs between trials of a model (all of them, without
    study.yaml)."""
    cfg = run.config
    in_space = set()
    if cfg is not None and cfg.models is not None:
        in_space = {name for model in cfg.models for name, v in cfg.model_space(model).items() if is_distribution(v)}
    # Where lora_alpha_ratio is set, lora_alpha is ratio x rank: it varies with the rank without being searched.
    derived = run.trials["lora_alpha_ratio"].notna() if "lora_alpha_ratio" in run.trials else False
    names = []
    for name in HYPERPARAMETERS:
        if name not in run.trials:
            continue
        trials = run.trials[~derived] if name == "lora_alpha" and derived is not False else run.trials
        per_model = trials.groupby("model")[name].apply(lambda s: s.astype(str).nunique())
        if name in in_space or (per_model > 1).any():
            names.append(name)
    return names


def log_scaled(run: RunData, name: str) -> bool | None:
    """Whether the study searched `name` on a log scale (loguniform) for any model; None without study.yaml."""
    cfg = run.config
    if cfg is None or cfg.models is None:
        return None
    specs = [cfg.model_space(model).get(name) for model in cfg.models]
    return any(is_distribution(v) and "loguniform" in v for v in specs)


def asha_rungs(run: RunData) -> list[int]:
    """Epochs after which ASHA compares trials (grace x rf^k below the last epoch), from the run's study.yaml."""
    cfg = run.config
    if cfg is None or cfg.tune is None or cfg.train is None or not cfg.tune.asha.enabled:
        return []
    grace, factor, epochs = cfg.tune.asha.grace_period, cfg.tune.asha.reduction_factor, cfg.train.epochs
    rungs, t = [], grace
    while t < epochs:
        rungs.append(t)
        t *= factor
    return rungs


def pareto_front(points: list[tuple[float, float, Any]], mode: str) -> list[tuple[float, float, Any]]:
    """(cost, metric, key) points no other point beats on both: cheaper-or-equal and better-or-equal."""
    sign = 1 if mode == "max" else -1
    front, best = [], -math.inf
    for cost, value, key in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * value > best:
            front.append((cost, value, key))
            best = sign * value
    return front


def trial_start(frame: Any) -> float | None:
    """Unix time a trial started: its first report's timestamp minus that epoch's duration."""
    if frame is None or not len(frame) or "timestamp" not in frame:
        return None
    first = frame.iloc[0]
    return float(first["timestamp"]) - float(first.get("time_this_iter_s", 0) or 0)


# --------------------------------------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 4) -> str:
    """A metric or a time with fixed decimals; '-' when missing."""
    x = _num(value)
    return "-" if x is None else f"{x:,.{digits}f}"


def _count(value: Any) -> str:
    x = _num(value)
    return "-" if x is None else f"{int(x):,}"


def _value(value: Any) -> str:
    """A hyperparameter as a person reads it: 4 significant digits, booleans and names as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    import numpy as np

    if isinstance(value, (bool, str, np.bool_)):
        return str(bool(value)) if isinstance(value, np.bool_) else str(value)
    x = _num(value)
    return str(value) if x is None else f"{x:.4g}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(run: RunData) -> str:
    """The blog's table, one row per model, from the best trial of each (by the study metric, scope all)."""
    metric, mem = run.metric, memory_kind(run)
    intervals = (run.summary.get("comparison") or {}).get("models") or {}
    header = ["model", "best F1", "precision", "recall", "accuracy", f"{metric} 95% interval", "vs the best",
              "wall time of best trial (s)", f"peak {mem} of best trial (MB)", "trainable params", "trainable %",
              "trials (stopped early, failed)"]
    rows = []
    for model, row in best_rows(run).items():
        info = run.summary["models"][model]
        counts = f"{info.get('trials', 0)} ({info.get('stopped_early', 0)}, {info.get('failed', 0)})"
        if row is None:
            rows.append([model] + ["-"] * 10 + [counts])
            continue
        trainable, total = _num(row.get("trainable_params")), _num(row.get("total_params"))
        share = f"{100 * trainable / total:.3f}%" if trainable and total else "-"
        scores = [_fmt(row.get(f"best_{m}")) for m in SCORES]  # best-epoch metrics of the best trial
        rows.append([model, *scores, *_interval_cells(intervals.get(model)), _fmt(row.get("trial_time_s"), 1),
                     _fmt(row.get("peak_memory_mb"), 1), _count(trainable), share, counts])
    confirmed = "its confirmed configuration's best seed (below)" if run.summary.get("confirmation") else \
        "its best trial"
    note = (f"Each model by {confirmed}, by {metric} ({run.mode}), each trial judged by its best epoch; all four "
            f"metrics are from that epoch. Wall time is the trial's whole time (setup, training, evaluation). "
            + ("Peak GPU memory is torch's peak allocation in the trial." if mem == "GPU" else
               "On CPU the memory column is the trial process's peak resident set size (RSS).")
            + (f" The interval is a bootstrap over the {run.summary.get('data', {}).get('validation_rows', '?')} "
               f"validation rows ({run.summary['comparison']['resamples']:,} resamples); a model is *clearly worse* "
               f"when the 95% interval of its gap to the best model, on the same resampled rows, excludes 0, and "
               f"*not clearly worse* otherwise: these rows cannot tell it from the best." if intervals else
               f" No intervals: {metric} is not a score of the predictions (or the checkpoints predate them)."))
    return _table(header, rows) + "\n\n" + note


def _interval_cells(scored: dict[str, Any] | None) -> list[str]:
    """A model's bootstrap interval and its standing against the best model (stats.bootstrap_comparison)."""
    if not scored:
        return ["-", "-"]
    low, high = scored["ci95"]
    gap_low, gap_high = scored["gap_to_best_ci95"]
    if gap_low == gap_high == 0:
        standing = "best"
    elif scored["clearly_worse"]:
        standing = f"clearly worse (gap {_fmt(gap_low)} to {_fmt(gap_high)})"
    else:
        standing = f"not clearly worse (gap {_fmt(gap_low)} to {_fmt(gap_high)})"
    return [f"{_fmt(low)} to {_fmt(high)}", standing]


def warm_start_text(warm: dict[str, Any]) -> str:
    """tune.warm_start: where each model's search started from, and its trials that began there."""
    parts = [f"{model}: {m['earlier_trials']} earlier trial(s), the best {len(m['proposed_first'])} proposed first "
             f"({', '.join(m['proposed_first']) or 'none'})" for model, m in warm["models"].items()]
    return f"Warm start from `{warm['source']}`: " + "; ".join(parts) + ". Those trials are marked (warm start) below."


def importances_text(run: RunData) -> str:
    """Each model's parameter importances as its Optuna study computed them at the end (summary.json), or why
    there are none yet."""
    lines = []
    for model, entry in (run.summary.get("importances") or {}).items():
        if entry.get("importances"):
            ranked = ", ".join(f"{name} {value:.2f}" for name, value in entry["importances"].items())
            lines.append(f"- {model} ({entry['completed']} completed trials): {ranked}")
        else:
            lines.append(f"- {model}: none yet ({entry.get('why')})")
    storage = run.summary.get("optuna_storage")
    where = (f" The studies are in `{storage}` (`optuna.load_study`, or `optuna-dashboard {storage}`)."
             if storage else "")
    return "\n".join(lines) + ("\n\nOptuna's default evaluator (PED-ANOVA) over each model's completed trials: the "
                               "share of the metric's variation each searched hyperparameter explains." + where)


def confirmation_table(run: RunData) -> str:
    """tune.confirm: each model's best configurations trained again with other seeds; the winner by mean."""
    confirmation, metric = run.summary["confirmation"], run.metric
    header = ["model", "search trial", f"search {metric}", *(f"seed {s}" for s in confirmation["seeds"]),
              "mean", "std", "95% interval of the mean", "winner"]
    rows = []
    for model, entry in confirmation["models"].items():
        for c in entry["configurations"]:
            by_seed = dict(zip(c["seeds"], c["values"]))
            rows.append([model, c["search_trial"], _fmt(c[f"search_{metric}"]),
                         *(_fmt(by_seed.get(s)) for s in confirmation["seeds"]), _fmt(c["mean"]), _fmt(c.get("std")),
                         f"{_fmt(c['ci95'][0])} to {_fmt(c['ci95'][1])}" if c.get("ci95") else "-",
                         f"yes: trial {c['best_trial']} (seed {c['best_seed']})"
                         if c["search_trial"] == entry["winner"] else ""])
    seconds = run.confirm_trials["trial_time_s"].fillna(0).sum() if "trial_time_s" in run.confirm_trials else 0
    return _table(header, rows) + (
        f"\n\nAfter the search, the {confirmation['top']} best configuration(s) of each model trained again with "
        f"seeds {', '.join(map(str, confirmation['seeds']))} ({len(run.confirm_trials)} trials, "
        f"{_fmt(seconds, 0)} s of trial time). A model's winner is the configuration with the best mean: the "
        f"search's best score is the luckiest of its trials, the seeds' mean is not selected on. The exported "
        f"trial is the winner's best seed.")


def cost_table(run: RunData) -> str:
    """Trial time spent per model: the cost side of the comparison."""
    header = ["model", "trials", "epochs trained", "total trial time (s)", "mean per trial (s)",
              "share of all trial time", f"best {run.metric}"]
    times = run.trials["trial_time_s"].fillna(0) if "trial_time_s" in run.trials else None
    everything = float(times.sum()) if times is not None else 0.0
    rows = []
    for model in run.models:
        mine = run.trials[run.trials["model"] == model]
        total = float(times[mine.index].sum()) if times is not None else 0.0
        rows.append([model, len(mine), _count(mine["epochs"].fillna(0).sum() if "epochs" in mine else None),
                     _fmt(total, 1), _fmt(total / len(mine), 1) if len(mine) else "-",
                     f"{100 * total / everything:.1f}%" if everything > 0 else "-",
                     _fmt(run.summary["models"][model].get("best_metric"))])
    return _table(header, rows)


def front_table(run: RunData) -> str:
    points = _cost_points(run)
    front = pareto_front([(c, v, (m, t)) for c, v, m, t in points], run.mode)
    rows = [[m, t, _fmt(c, 1), _fmt(v)] for c, v, (m, t) in front]
    return _table(["model", "trial", "trial time (s)", f"best {run.metric}"], rows)


def _cost_points(run: RunData) -> list[tuple[float, float, str, str]]:
    """(trial time s, best metric, model, trial id) of every trial that reported."""
    key = f"best_{run.metric}"
    points = []
    for _, row in run.trials.iterrows():
        cost, value = _num(row.get("trial_time_s")), _num(row.get(key))
        if cost is not None and value is not None:
            points.append((cost, value, str(row["model"]), str(row["trial_id"])))
    return points


def trials_table(run: RunData, searched: list[str]) -> str:
    metric = run.metric
    header = ["model", "trial", "status", *searched, "epochs", f"final {metric}", f"best {metric}",
              "trial time (s)"]
    rows = []
    warm = {t for m in ((run.summary.get("warm_start") or {}).get("models") or {}).values()
            for t in m.get("proposed_first", ())}
    for _, row in run.trials.sort_values(["model", "trial_id"]).iterrows():
        trial = f"{row['trial_id']} (warm start)" if row["trial_id"] in warm else row["trial_id"]
        rows.append([row["model"], trial, row["status"], *(_value(row.get(h)) for h in searched),
                     _count(row.get("epochs")), _fmt(row.get(f"final_{metric}")), _fmt(row.get(f"best_{metric}")),
                     _fmt(row.get("trial_time_s"), 1)])
    return _table(header, rows)


def fixed_values(run: RunData, searched: list[str]) -> str:
    """Hyperparameters every trial of a model shared, one line per model (lora_alpha left out where
    lora_alpha_ratio derives it from the rank)."""
    lines = []
    for model in run.models:
        mine = run.trials[run.trials["model"] == model]
        if not len(mine):
            continue
        unused = {"lora_alpha"} if "lora_alpha_ratio" in mine and mine["lora_alpha_ratio"].notna().any() else set()
        fixed = [f"{h}={_value(mine[h].iloc[0])}" for h in HYPERPARAMETERS
                 if h in mine and h not in {*searched, *unused} and mine[h].notna().any()]
        lines.append(f"- {model}: " + ", ".join(fixed))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """How every plot ends: laid out, written as a 110 dpi PNG, closed (pyplot keeps figures until closed)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _colors(models: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(models)}


def _running_best(values: list[float], mode: str) -> list[float]:
    out, best = [], None
    for v in values:
        best = v if best is None or better(v, best, mode) else best
        out.append(best)
    return out


def plot_best_so_far(run: RunData, path: Path) -> None:
    """Best-so-far metric per model against trials finished (left) and against study wall time (right)."""
    plt = _pyplot()
    colors, metric = _colors(run.models), run.metric
    fig, (by_count, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    starts = [s for f in run.history.values() if (s := trial_start(f)) is not None]
    t0 = min(starts) if starts else 0.0
    for model in run.models:
        mine = run.trials[run.trials["model"] == model].copy()
        mine["start"] = [trial_start(run.history.get(str(t))) or math.inf for t in mine["trial_id"]]
        mine = mine.sort_values(["start", "trial_id"])
        values = [v for v in (_num(x) for x in mine[f"best_{metric}"]) if v is not None]
        if values:
            by_count.step(range(1, len(values) + 1), _running_best(values, run.mode), where="post", marker="o",
                          color=colors[model], label=model)
        events = []  # every epoch result of every trial of this model, in time order
        for tid in mine["trial_id"]:
            frame = run.history.get(str(tid))
            if frame is not None and len(frame) and metric in frame and "timestamp" in frame:
                events += list(zip(frame["timestamp"].astype(float), frame[metric].astype(float)))
        if events:
            events.sort()
            by_time.step([(t - t0) / 60 for t, _ in events], _running_best([v for _, v in events], run.mode),
                         where="post", marker=".", color=colors[model], label=model)
    by_count.set(title=f"Best {metric} so far vs trials run", xlabel="trials run (in start order)",
                 ylabel=f"best validation {metric}")
    by_count.xaxis.get_major_locator().set_params(integer=True)
    by_time.set(title=f"Best {metric} so far vs study wall time", xlabel="minutes since the first trial started",
                ylabel=f"best validation {metric}")
    for ax in (by_count, by_time):
        ax.grid(alpha=0.3)
        ax.legend(title="model")
    _save(fig, path)


def plot_cost_front(run: RunData, path: Path) -> None:
    """Every trial's best metric against its wall time, with the front of trials nothing else beats."""
    plt = _pyplot()
    colors = _colors(run.models)
    points = _cost_points(run)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for model in run.models:
        mine = [(c, v) for c, v, m, _ in points if m == model]
        if mine:
            ax.scatter(*zip(*mine), color=colors[model], label=model, alpha=0.8, s=40)
    front = pareto_front([(c, v, None) for c, v, _, _ in points], run.mode)
    if front:
        ax.step([c for c, _, _ in front], [v for _, v, _ in front], where="post", color="black", lw=1,
                ls="--", label="front (best for the time)")
    ax.set(title=f"Validation {run.metric} vs cost, all trials", xlabel="trial wall time (s)",
           ylabel=f"best validation {run.metric} of the trial")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_hyperparameters(run: RunData, names: list[str], path: Path) -> None:
    """The metric against each searched hyperparameter (one panel each; log axis where the study searched on a
    log scale)."""
    plt = _pyplot()
    colors, metric = _colors(run.models), run.metric
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        raw = run.trials[name]
        numbers = [_num(v) for v in raw]
        categorical = any(n is None for n, v in zip(numbers, raw) if v == v)  # strings/booleans
        if categorical:
            levels = sorted({str(v) for v in raw})
            ax.set_xticks(range(len(levels)), levels, rotation=15)
            ax.set_xlim(-0.5, len(levels) - 0.5)
        for model in run.models:
            mine = run.trials[run.trials["model"] == model]
            ys = [_num(v) for v in mine[f"best_{metric}"]]
            xs = [levels.index(str(v)) for v in mine[name]] if categorical else [_num(v) for v in mine[name]]
            pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            if pairs:
                ax.scatter(*zip(*pairs), color=colors[model], label=model, alpha=0.8, s=36)
        positive = [n for n in numbers if n is not None and n > 0]
        wide = bool(positive) and max(positive) / min(positive) >= 10  # only when the study's space is unknown
        if not categorical and positive and len(positive) == len([n for n in numbers if n is not None]) \
                and (log_scaled(run, name) if log_scaled(run, name) is not None else wide):
            ax.set_xscale("log")
            if wide:  # decade labels only: minor ones overlap across decades
                ax.xaxis.set_minor_formatter(_null_formatter())
        ax.set(title=f"{metric} vs {name}", xlabel=name + (" (log scale)" if ax.get_xscale() == "log" else ""),
               ylabel=f"best validation {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(title="model")
    fig.suptitle(f"Validation {metric} against each searched hyperparameter (one point per trial)")
    _save(fig, path)


def plot_rungs(run: RunData, path: Path) -> None:
    """How many trials of each model were still training at each epoch (ASHA stops the weak ones at rungs)."""
    plt = _pyplot()
    colors = _colors(run.models)
    max_epoch = int(max([_num(e) or 0 for e in run.trials.get("epochs", [])] or [0])) or 1
    epochs = list(range(1, max_epoch + 1))
    width = 0.8 / max(1, len(run.models))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * max_epoch + 3), 4.2))
    for i, model in enumerate(run.models):
        reached = [_num(e) or 0 for e in run.trials[run.trials["model"] == model]["epochs"]]
        counts = [sum(r >= e for r in reached) for e in epochs]
        bars = ax.bar([e + (i - (len(run.models) - 1) / 2) * width for e in epochs], counts, width,
                      color=colors[model], label=model)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(epochs)
    ax.yaxis.get_major_locator().set_params(integer=True)
    rungs = asha_rungs(run)
    ax.set(title="Trials surviving each epoch (ASHA early stopping)",
           xlabel="epoch" + (f" (ASHA rungs after epoch {', '.join(map(str, rungs))})" if rungs else ""),
           ylabel="trials that trained this epoch")
    ax.legend(title="model")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_history(run: RunData, path: Path) -> None:
    """Validation metric after each epoch, one line per trial (coloured by model)."""
    plt = _pyplot()
    colors, metric = _colors(run.models), run.metric
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    seen = set()
    for _, row in run.trials.iterrows():
        frame = run.history.get(str(row["trial_id"]))
        if frame is None or not len(frame) or metric not in frame:
            continue
        model = row["model"]
        ax.plot(frame["training_iteration"], frame[metric], marker="o", ms=3, alpha=0.7, color=colors[model],
                label=None if model in seen else model)
        seen.add(model)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(title=f"Learning curves: validation {metric} after each epoch", xlabel="epoch",
           ylabel=f"validation {metric}")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(title="model")
    _save(fig, path)


# --------------------------------------------------------------------------------------------- report


def write_report(run_dir: str | Path, echo: Callable[[str], None] = print) -> Path:
    """Write report.md and the plots into the run directory; returns report.md's path. A remote run's results
    are downloaded first and the report uploaded into it; the path returned is then the local copy."""
    try:
        where = open_results(run_dir)
    except ValueError as e:
        raise ReportError(str(e)) from None
    where.download()
    run = load_run(where.local, shown=where.uri)
    out = run.run_dir
    searched = searched_hyperparameters(run)
    s = run.summary
    best = s.get("best")
    has_trials = best is not None  # plots need a trial that reported a result
    if has_trials:
        plot_best_so_far(run, out / PLOTS["best_so_far"])
        plot_cost_front(run, out / PLOTS["cost_front"])
        plot_rungs(run, out / PLOTS["rungs"])
        plot_history(run, out / PLOTS["history"])
        if searched:
            plot_hyperparameters(run, searched, out / PLOTS["hyperparameters"])
    data = s.get("data", {})
    lines = [
        f"# Study report: {s.get('study', out.name)}",
        "",
        f"Run directory `{s.get('run_dir', out)}`. Metric: validation {run.metric} ({run.mode}); best = "
        f"{s.get('best_scope', 'best epoch of each trial')}.",
        f"Data: {data.get('train_rows', '?')} train / {data.get('validation_rows', '?')} validation rows, labels "
        f"{', '.join(f'{i} = {n}' for i, n in enumerate(data.get('label_names', [])))}; "
        f"{s.get('tokenizations', '?')} tokenization(s) shared by the trials.",
        "",
        (f"**Best overall: {best['model']}, trial {best['trial_id']}, {run.metric} = {_fmt(best[run.metric])}"
         + (f" (confirmed: mean {_fmt(best['confirmed']['mean'])} over seeds "
            f"{', '.join(map(str, best['confirmed']['seeds']))}; this trial is its best seed)" if best.get("confirmed")
            else "") + ".**" if best else "**No trial reported a result.**"),
        *(["", warm_start_text(s["warm_start"])] if s.get("warm_start") else []),
        *(["", f"**Interrupted: {partial} finished; this report covers those. Continue with "
               f"`{s.get('resume_command') or 'tune-app resume RUN_DIR'}`.**"] if (partial := unfinished(s)) else []),
        "",
        "## Models compared",
        "",
        comparison_table(run),
        "",
        *(["## Confirmation", "", confirmation_table(run), ""] if s.get("confirmation") else []),
        "## Cost",
        "",
        cost_table(run),
        "",
        f"Trials that no other trial beats on both time and {run.metric} (the front):",
        "",
        front_table(run) if has_trials else "-",
        "",
    ]
    if has_trials:
        lines += [f"![{run.metric} vs cost]({PLOTS['cost_front']})", "",
                  "## Search progress", "", f"![best so far]({PLOTS['best_so_far']})", "",
                  f"![trials per rung]({PLOTS['rungs']})", "", f"![learning curves]({PLOTS['history']})", ""]
        if searched:
            lines += ["## Hyperparameters", "", f"![{run.metric} vs hyperparameters]({PLOTS['hyperparameters']})",
                      ""]
    if s.get("importances"):
        lines += ["## Parameter importances", "", importances_text(run), ""]
    lines += ["## Trials", "", f"Searched: {', '.join(searched) or 'nothing (fixed values only)'}. "
              "Epochs = epochs trained (fewer than the maximum: stopped early by ASHA).", "",
              trials_table(run, searched), "", "Fixed in every trial:", "", fixed_values(run, searched), ""]
    if failed := s.get("failed_trials"):
        lines += ["## Failed trials", "", _table(["model", "trial", "error (last line)", "traceback"], [
            [f["model"], f["trial_id"], failure_line(out, f["error"]).replace("|", "\\|"), f"`{f['error']}`"]
            for f in failed]), ""]
    path = out / REPORT
    path.write_text("\n".join(lines), encoding="utf-8")
    if where.remote:
        where.publish(REPORT, *PLOTS.values())
        echo(f"uploaded {REPORT} and its plots to {where.uri} (local copy: {out})")
    return path
