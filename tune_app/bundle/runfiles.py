"""Reading a finished run's own files for export and report, checked once: summary.json, trials.csv, study.yaml.

A file the run wrote that is now damaged (cut short, hand-edited, emptied) is bad input: the error names the file,
what is wrong with it and what to do, before anything is loaded or written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tune_app.errors import ConfigError, UsageError
from tune_app.spec.rundir import STUDY, SUMMARY, TRIALS

TRIAL_COLUMNS = ("trial_id", "model", "status", "checkpoint")
"""The trials.csv columns export and report read."""


def _fix(run_dir: str | Path) -> str:
    return (f"the run writes it when the study finishes: restore it from a copy, or run the study again with "
            f"tune-app run {str(run_dir).rstrip('/')}/{STUDY}")


def summary_problem(summary: Any) -> str | None:
    """What is wrong with a parsed summary.json for export and report, or None."""
    if not isinstance(summary, dict):
        return f"holds a JSON {type(summary).__name__}, not the summary object"
    if not isinstance(summary.get("metric"), str):
        return "has no 'metric' (the name of the study's metric)"
    models = summary.get("models")
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        return "'models' is not an object of per-model summaries"
    best = summary.get("best")
    if best is not None and not (isinstance(best, dict) and {"model", "trial_id"} <= best.keys()):
        return "'best' is neither null nor an object with 'model' and 'trial_id'"
    data = summary.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("label_names", []), list):
        return "'data' is not an object with a 'label_names' list"
    failed = summary.get("failed_trials", [])
    if not isinstance(failed, list) or not all(isinstance(f, dict) for f in failed):
        return "'failed_trials' is not a list of objects"
    return None


def parse_summary(text: str, where: str, run_dir: str | Path, error: type[Exception] = UsageError) -> dict[str, Any]:
    """summary.json's text -> its object; `error` naming `where` when it is not a run summary."""
    try:
        summary = json.loads(text)
    except ValueError as e:
        raise error(f"{where}: not valid JSON ({e}); {_fix(run_dir)}") from None
    if why := summary_problem(summary):
        raise error(f"{where}: {why}; {_fix(run_dir)}")
    return summary


def read_summary(run_dir: Path, shown: str | Path | None = None, error: type[Exception] = UsageError
                 ) -> dict[str, Any]:
    """RUN_DIR/summary.json, checked (`shown`: the run directory as messages name it)."""
    path = run_dir / SUMMARY
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({e}); {_fix(shown or run_dir)}") from None
    return parse_summary(text, str(path), shown or run_dir, error)


def trials_problem(columns: list[str] | None, rows: int) -> str | None:
    """What is wrong with trials.csv's header, or None (a run without trials writes the header trial_id alone)."""
    if not columns:
        return "is empty (no header row)"
    missing = [c for c in TRIAL_COLUMNS if c not in columns] if rows else []
    if missing:
        return f"lacks the column(s) {', '.join(missing)} (has: {', '.join(map(str, columns))[:200]})"
    return None


def read_trials(run_dir: Path, shown: str | Path | None = None, error: type[Exception] = UsageError
                ) -> list[dict[str, str]]:
    """RUN_DIR/trials.csv as rows, checked; [] when the run has none."""
    path = run_dir / TRIALS
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise error(f"{path}: cannot read it ({e}); {_fix(shown or run_dir)}") from None
    if why := trials_problem(list(columns) if columns else None, len(rows)):
        raise error(f"{path}: {why}; {_fix(shown or run_dir)}")
    if any(None in row for row in rows):  # a row with more cells than the header
        raise error(f"{path}: a row has more cells than the header (the file is damaged); {_fix(shown or run_dir)}")
    return rows


def study_error(path: str | Path, error: ConfigError, what: str) -> UsageError:
    """A run's study.yaml that no longer loads, named, with its problems and the fix."""
    problems = "\n".join(f"  - {e}" for e in error.errors)
    return UsageError(f"{path}: the study this run was started with does not load, so it cannot {what}:\n"
                      f"{problems}\nfix {STUDY} (the run wrote it: a hand edit, or a data file or base model that has "
                      f"moved since, breaks it)")
