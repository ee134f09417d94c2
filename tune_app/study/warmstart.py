"""Warm start (tune.warm_start): each model's TPE begins with what an earlier study of that model learned.

`tune.warm_start` names an earlier run directory (its optuna.db) or an Optuna storage URL (every study of the
model in it: `<run name>/<model>`). Each earlier trial that ended (completed or pruned) and fits this study's
space is added to the model's new study, so TPE models it from the first proposal; the earlier study's best
configurations are proposed first. A trial with a value outside this space (another range or choice) is left out,
as Optuna cannot hold it under this space's distribution; a parameter the earlier study did not search is sampled
as TPE samples a parameter a trial lacks. What was taken and what was left out is said when the study starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_app.errors import ConfigError
from tune_app.spec.rundir import OPTUNA_DB
from tune_app.study.studies import is_storage_url

ENQUEUED = 3
"""Best earlier configurations of a model proposed first."""


@dataclass
class WarmStart:
    """Per model, the earlier trials a new study starts from (Optuna FrozenTrials), and where they came from."""

    source: str
    trials: dict[str, list[Any]] = field(default_factory=dict)


def load(warm_start: str | None, models: list[str], run_name: str | None = None) -> WarmStart | None:
    """The earlier trials of each model in `warm_start` (a run directory or a storage URL); ConfigError naming the
    problem and the fix when there is nothing to start from there. `run_name`: this run's own studies, skipped."""
    if not warm_start:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if is_storage_url(warm_start):
        storage, prefix = warm_start, None
    else:
        folder = Path(warm_start.removeprefix("file://")).expanduser()
        if not (folder / OPTUNA_DB).is_file():
            raise ConfigError([f"tune.warm_start: {warm_start} holds no {OPTUNA_DB}; name the run directory of an "
                               f"earlier study (made by a tune-app that stores its studies), or an Optuna storage "
                               f"URL"])
        storage, prefix = f"sqlite:///{folder.resolve() / OPTUNA_DB}", folder.resolve().name
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as e:  # noqa: BLE001 - a storage that cannot be read: say so before anything runs
        raise ConfigError([f"tune.warm_start: cannot read the Optuna storage {warm_start} ({type(e).__name__}: "
                           f"{e}); check the URL and that its database is reachable"]) from None
    warm = WarmStart(source=warm_start)
    for model in models:
        mine = [n for n in names if n.rsplit("/", 1)[-1] == model and (prefix is None or n == f"{prefix}/{model}")
                and not (run_name and n == f"{run_name}/{model}")]
        warm.trials[model] = [t for n in mine
                              for t in optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)
                              if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if not any(warm.trials.values()):
        raise ConfigError([f"tune.warm_start: {warm_start} has no finished trial of model(s) "
                           f"{', '.join(models)} (studies there: {', '.join(names) or 'none'}); warm-start from a run "
                           f"of the same model names"])
    return warm


def fits(value: Any, distribution: Any) -> bool:
    """Whether an earlier trial's value is one this study's distribution can hold."""
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return value in distribution.choices
    if isinstance(distribution, (d.FloatDistribution, d.IntDistribution)):
        return isinstance(value, (int, float)) and distribution.low <= value <= distribution.high
    return False


def seed_study(study, distributions: dict[str, Any], earlier: list[Any], source: str, mode: str
               ) -> tuple[list[dict[str, Any]], str]:
    """Add the earlier trials that fit `distributions` to `study`; returns the best ones' parameters (to propose
    first) and a line saying what was taken and what was left out."""
    import optuna

    taken, left = [], {}
    for trial in earlier:
        outside = [name for name, value in trial.params.items()
                   if name not in distributions or not fits(value, distributions[name])]
        if outside:
            for name in outside:
                left[name] = left.get(name, 0) + 1
            continue
        study.add_trial(optuna.trial.create_trial(
            params=dict(trial.params), distributions={n: distributions[n] for n in trial.params},
            value=trial.value,
            intermediate_values=dict(trial.intermediate_values), state=trial.state,
            user_attrs={**trial.user_attrs, "warm_start_from": source}))
        taken.append(trial)
    completed = [t for t in taken if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    completed.sort(key=lambda t: -t.value if mode == "max" else t.value)
    first, seen = [], set()
    for trial in completed:
        key = tuple(sorted((k, repr(v)) for k, v in trial.params.items()))
        if key not in seen and len(first) < ENQUEUED:
            seen.add(key)
            first.append(dict(trial.params))
    new = [n for n in distributions if not any(n in t.params for t in taken)]
    said = (f"{len(taken)} of {len(earlier)} earlier trial(s) from {source}"
            + (f"; left out {len(earlier) - len(taken)} with values this space does not hold ("
               + ", ".join(f"{n}: {c}" for n, c in sorted(left.items())) + ")" if left else "")
            + (f"; not searched before: {', '.join(new)} (sampled)" if new and taken else "")
            + f"; its best {len(first)} configuration(s) first")
    return first, said


def warm_started(source: str, studies: dict[str, Any]) -> dict[str, Any]:
    """What summary.json says of a warm start: per model, how many earlier trials its study holds and which of this
    run's trials were the earlier best configurations proposed first."""
    models = {}
    for model, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        models[model] = {
            "earlier_trials": sum("warm_start_from" in t.user_attrs for t in trials),
            "proposed_first": [t.user_attrs["tune_trial_id"] for t in trials
                               if "warm_start" in t.user_attrs and "warm_start_from" not in t.user_attrs],
        }
    return {"source": source, "models": models}
