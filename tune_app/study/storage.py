"""The driver's side of a run directory: a new one for each run, the study it was started with, and what a resume
reads back from it (`tune_app.spec.rundir` holds the layout and the access).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from tune_app.errors import ConfigError
from tune_app.spec import config as config_mod
from tune_app.spec.config import StudyConfig, dump
from tune_app.spec.paths import absolute_paths, is_uri
from tune_app.spec.rundir import STUDY, SUMMARY, RunDir, resume_command, run_dir_at


def new_run_dir(cfg: StudyConfig) -> RunDir:
    """<output_dir>/<name>-<timestamp>, never an existing directory."""
    root = cfg.output_dir if is_uri(cfg.output_dir) else str(Path(cfg.output_dir).expanduser().resolve())
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = f"{cfg.name}-{stamp}", 1
    try:
        while (run := run_dir_at(f"{root.rstrip('/')}/{name}", "output_dir")).has():
            n += 1
            name = f"{cfg.name}-{stamp}-{n}"
    except OSError as e:  # a bucket that does not exist, missing credentials, no permission ...
        raise ConfigError([f"output_dir: cannot reach {cfg.output_dir!r} ({e})"]) from None
    return run


def portable_raw(cfg: StudyConfig, run: RunDir) -> dict:
    """The merged study with local paths made absolute, output_dir pinned and the keys whose default may change
    written out (config.RUN_DEFAULTS), so it reruns from anywhere, the same."""
    raw = absolute_paths(cfg.raw)
    raw["output_dir"] = _as_written(cfg.output_dir, run.storage_path)
    for section, key in config_mod.RUN_DEFAULTS:
        raw.setdefault(section, {})[key] = getattr(getattr(cfg, section), key)
    return raw


def save_study(cfg: StudyConfig, run: RunDir) -> None:
    """Write <run_dir>/study.yaml before anything runs: what `tune-app resume` rebuilds the study from."""
    run.local.mkdir(parents=True, exist_ok=True)
    (run.local / STUDY).write_text(f"# The merged study of run {run.uri}.\n# Continue it if interrupted:  "
                                   f"{resume_command(run.uri)}\n" + dump(portable_raw(cfg, run)))
    run.publish(STUDY)


def finished_summary(run: RunDir) -> dict[str, Any] | None:
    """The summary of a study that ran to its end, or None while it is unfinished."""
    if not run.has(SUMMARY):
        return None
    summary = json.loads(run.read_text(SUMMARY))
    return summary if summary.get("complete", True) else None


def load_run_config(run: RunDir) -> StudyConfig:
    """The study a run directory was started with (its study.yaml), its output_dir where the run is now (it may
    have moved since)."""
    run.local.mkdir(parents=True, exist_ok=True)
    if run.remote:
        (run.local / STUDY).write_text(run.read_text(STUDY))
    cfg = config_mod.load(run.local / STUDY, check_wandb=True, check_outputs=True, of_run=True)
    cfg.output_dir = _as_written(cfg.output_dir, run.storage_path)
    return cfg


def _as_written(output_dir: str, storage_path: str) -> str:
    """A run's parent folder spelled as the user spelled output_dir: file:// kept (their word that a local folder is
    a shared filesystem every node sees: cluster.check_storage_reachable)."""
    return f"file://{storage_path}" if output_dir.startswith("file://") and not is_uri(storage_path) else storage_path
