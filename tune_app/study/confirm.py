"""Confirmation (tune.confirm): after the search, each model's `top` best configurations train again with `seeds`
other seeds (train.seed + 1, + 2, ...), and a model's winner is the configuration with the best mean over them.

The search's best score is the luckiest of many noisy draws (a validation split of 1,523 rows puts about +/-0.02 on
an F1 near 0.8, and 30 trials per model pick the draw that flatters most); fresh seeds are not selected on, so
their mean is an honest estimate. Confirmation trials are ordinary trials of a second Tune experiment in
RUN_DIR/confirm: fault tolerant, resumed and packed as the search's are, every epoch run (no ASHA). The exported
trial of a confirmed model is its winning configuration's best seed.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.search import Searcher

from tune_app.spec.config import StudyConfig
from tune_app.spec.metrics import best_of
from tune_app.spec.rundir import best_fields, configuration
from tune_app.spec.space import CONFIRMS_KEY, HYPERPARAMETERS, SEED_KEY
from tune_app.study.stats import mean_interval


def seeds(cfg: StudyConfig) -> list[int]:
    """The confirmation seeds: train.seed + 1, + 2, ... (the search trained with train.seed)."""
    return [cfg.train.seed + k for k in range(1, cfg.tune.confirm.seeds + 1)]


def candidates(cfg: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Model -> its best search trials (rows of results.trial_rows), best first: at most tune.confirm.top, one per
    distinct configuration (TPE can propose a configuration twice when the space is small)."""
    key, mode = f"best_{cfg.tune.metric}", cfg.tune.mode
    out: dict[str, list[dict[str, Any]]] = {}
    for model in cfg.models:
        scored = [r for r in rows if r["model"] == model and r[key] is not None]
        sign = -1 if mode == "max" else 1
        scored.sort(key=lambda r: (sign * r[key], str(r["trial_id"])))
        picked, seen = [], set()
        for row in scored:
            signature = tuple((h, repr(row[h])) for h in HYPERPARAMETERS)
            if signature not in seen and len(picked) < cfg.tune.confirm.top:
                seen.add(signature)
                picked.append(row)
        out[model] = picked
    return out


def confirmation_trials(cfg: StudyConfig, picked: dict[str, list[dict[str, Any]]],
                        configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The trial configs of the confirmation stage: each picked search trial's config (`configs`: trial id -> the
    config Tune ran it with) with each confirmation seed, seed by seed (every configuration's first seed before
    any second one, so an interrupted stage has spread its work)."""
    return [{**configs[row["trial_id"]], SEED_KEY: seed, CONFIRMS_KEY: row["trial_id"]}
            for seed in seeds(cfg) for rows in picked.values() for row in rows]


class FixedTrials(Searcher):
    """Proposes a fixed list of trial configs, in order, then FINISHED; saved and restored with the experiment, so
    a resumed stage proposes only what it had not."""

    def __init__(self, configs: list[dict[str, Any]], *, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.configs, self.next = list(configs), 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return dict(self.configs[self.next - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def summarize(cfg: StudyConfig, picked: dict[str, list[dict[str, Any]]],
              confirm_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model, each confirmed configuration: its search trial and score, its seeds' trials and best-epoch scores,
    their mean, standard deviation and 95% t interval, and its best seed's trial; and the winner (best mean)."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    key = f"best_{metric}"
    models: dict[str, Any] = {}
    for model, rows in picked.items():
        confirmed = []
        for row in rows:
            runs = sorted((r for r in confirm_rows if r["confirms"] == row["trial_id"]), key=lambda r: r["seed"])
            scored = [r for r in runs if r[key] is not None]
            best_run = best_of(scored, lambda r: r[key], mode)
            confirmed.append({
                "search_trial": row["trial_id"], f"search_{metric}": row[key], "config": configuration(row),
                "seeds": [r["seed"] for r in runs], "trials": [r["trial_id"] for r in runs],
                "values": [r[key] for r in runs], "failed": sum(r["status"] == "FAILED" for r in runs),
                **(mean_interval([r[key] for r in scored]) if scored else {"n": 0, "mean": None}),
                "best_trial": best_run["trial_id"] if best_run else None,
                "best_seed": best_run["seed"] if best_run else None,
            })
        winner = best_of(confirmed, lambda c: c["mean"], mode)
        models[model] = {"configurations": confirmed, "winner": winner["search_trial"] if winner else None}
    return {"top": cfg.tune.confirm.top, "seeds": seeds(cfg), "metric": metric, "models": models}


def winner_of(confirmation: dict[str, Any], model: str) -> dict[str, Any] | None:
    """A model's winning confirmed configuration (an entry of summarize's `configurations`), None without one."""
    entry = confirmation["models"].get(model) or {}
    return next((c for c in entry.get("configurations", ()) if c["search_trial"] == entry.get("winner")), None)


def apply(summary: dict[str, Any], confirmation: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Make each confirmed model's best its winning configuration's best seed, and the study's best the model
    whose winner has the best mean; the search's own picks stay under `search_best`."""
    metric, mode = summary["metric"], summary["mode"]
    by_id = {r["trial_id"]: r for r in rows}
    summary["search_best"] = summary["best"]
    winners = {}
    for model, entry in summary["models"].items():
        winner = winner_of(confirmation, model)
        if winner is None or winner["best_trial"] is None:
            continue
        winners[model] = winner
        entry["search_best"] = {k: entry[k] for k in ("best_trial", "best_metric", "best_config")}
        run = by_id[winner["best_trial"]]
        entry.update(
            best_fields(run, metric), best_seed=run["seed"],
            confirmed={k: winner[k] for k in ("search_trial", "n", "mean", "std", "ci95", "values", "seeds")})
    model = best_of(winners, lambda m: winners[m]["mean"], mode)
    if model is not None:
        entry = summary["models"][model]
        summary["best"] = {"model": model, "trial_id": entry["best_trial"], metric: entry["best_metric"],
                           "config": entry["best_config"], "seed": entry["best_seed"],
                           "confirmed": entry["confirmed"]}
