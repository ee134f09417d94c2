"""Each model's Optuna study where it is stored (tune.storage, or the run's optuna.db): opening the storage before
anything runs, reading the studies back at the end, and what they say (parameter importances). Imports Optuna, not
Ray: `validate` opens the storage too.
"""

from __future__ import annotations

from typing import Any

from tune_app.errors import ConfigError, UsageError
from tune_app.spec.rundir import OPTUNA_DB, STUDY, RunDir, open_results

STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
"""URL schemes of the databases Optuna's RDB storage reaches (SQLAlchemy dialects, `+driver` aside)."""


def is_storage_url(text: str) -> bool:
    """Whether `text` names an Optuna database (sqlite:///..., postgresql://...), not a run directory."""
    return "://" in text and text.split("://", 1)[0].split("+", 1)[0] in STORAGE_SCHEMES


MIN_TRIALS_FOR_IMPORTANCE = 5
"""Completed trials a model needs before its parameter importances mean anything (Optuna computes them from 2)."""


def check_storage(storage: str | None) -> None:
    """ConfigError, before Ray starts, when tune.storage cannot be opened: no driver for its database, or no
    database there."""
    if not storage:
        return
    import optuna

    try:
        optuna.storages.get_storage(storage)
    except ImportError:
        raise ConfigError([f"tune.storage: no Python driver for {RunDir.shown_storage(storage)}; for PostgreSQL "
                           f"install it with: pip install 'tune-app[postgres]'"]) from None
    except Exception as e:  # noqa: BLE001 - unreachable, refused, a file that is not a database ...
        raise ConfigError([f"tune.storage: cannot open {RunDir.shown_storage(storage)} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); check the URL and that the database is "
                           f"running and reachable from this machine"]) from None


def stored_studies(storage: str | None, names: dict[str, str]) -> dict[str, Any]:
    """Model -> its Optuna study in `storage` (`names`: model -> study name); {} for studies kept in memory."""
    if storage is None:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {model: optuna.load_study(study_name=name, storage=storage) for model, name in names.items()}


def parameter_importances(studies: dict[str, Any]) -> dict[str, Any]:
    """Per model, Optuna's parameter importances (its default evaluator, PED-ANOVA, over completed trials), most
    important first; or why there are none yet."""
    import optuna

    out: dict[str, Any] = {}
    for model, study in studies.items():
        completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        searched = {name for t in study.get_trials(deepcopy=False) for name, d in t.distributions.items()
                    if not d.single()}
        if not searched:
            out[model] = {"importances": None, "why": "nothing searched"}
        elif completed < MIN_TRIALS_FOR_IMPORTANCE:
            out[model] = {"importances": None, "why": f"{completed} completed trial(s); importances need "
                                                      f"{MIN_TRIALS_FOR_IMPORTANCE}"}
        else:
            importances = optuna.importance.get_param_importances(study)
            out[model] = {"importances": {k: float(v) for k, v in importances.items()}, "completed": completed}
    return out


def storage_of(target: str) -> str:
    """The Optuna storage `tune-app dashboard TARGET` shows: TARGET itself when it is a storage URL; for a run
    directory, its optuna.db, else the tune.storage its study.yaml names. UsageError naming the fix otherwise."""
    import yaml

    if is_storage_url(target):
        return target
    try:
        run = open_results(target)
    except ValueError as e:
        raise UsageError(f"{e}; or pass an Optuna storage URL (sqlite:///..., postgresql://...)") from None
    if not run.remote and (run.local / OPTUNA_DB).is_file():
        return f"sqlite:///{(run.local / OPTUNA_DB).resolve()}"
    try:
        named = (yaml.safe_load(run.read_text(STUDY)) or {}).get("tune", {}).get("storage")
    except (OSError, yaml.YAMLError, AttributeError):
        named = None
    if named:
        return named
    raise UsageError(f"{target}: holds no {OPTUNA_DB} and its {STUDY} names no tune.storage: this run kept its "
                     f"Optuna studies in memory (a remote run directory, or a tune-app before stored studies); "
                     f"nothing to show")


def serve_dashboard(storage: str, port: int, echo=print) -> None:
    """optuna-dashboard over `storage` on 127.0.0.1:`port` (loopback only: reach it from elsewhere through an SSH
    tunnel), until Ctrl-C."""
    from optuna_dashboard import run_server

    check_storage(storage)
    echo(f"optuna-dashboard for {RunDir.shown_storage(storage)} on http://127.0.0.1:{port}/dashboard "
         f"(Ctrl-C stops it)")
    run_server(storage, host="127.0.0.1", port=port)
