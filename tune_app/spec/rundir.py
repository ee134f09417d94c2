"""A run directory: the files a study leaves in `<output_dir>/<name>-<timestamp>`, and access to it wherever it
is (a local folder, or any store pyarrow filesystems reach: file://, s3://, gs://, ...).

The driver writes it (tune_app.study), export and report read it (tune_app.bundle): this module is the contract
between them. Nothing here imports Ray or torch.

    study.yaml          the merged study as run (written first: what `resume` and the report read)
    summary.json        per model: best metric, best config, best trial and epoch; the overall best
    trials.csv          one row per trial
    best_config.yaml    the winner as a study YAML that retrains it
    asha_rungs.pkl      ASHA's rungs (resume continues them)
    optuna.db           each model's Optuna study (SQLite; unless tune.storage names another storage)
    <model>_<trial>/    Ray Tune's trial folder: result.json, checkpoint_*/ (adapter, trainer_state.pt, metrics.json,
                        val_predictions.npy)
    confirm/            tune.confirm's experiment: the best configurations again with other seeds, one
                        <model>_<trial>/ each
    wandb/              W&B's offline runs
"""

from __future__ import annotations

import posixpath
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.errors import ConfigError
from tune_app.spec.config import StudyConfig, dump
from tune_app.spec.metrics import METRICS
from tune_app.spec.paths import absolute_paths, is_uri
from tune_app.spec.space import HYPERPARAMETERS

SUMMARY = "summary.json"


TRIALS = "trials.csv"


BEST_CONFIG = "best_config.yaml"


STUDY = "study.yaml"
"""The merged study a run was started with (written first; `tune-app resume` rebuilds the study from it)."""
CONFIRM_DIR = "confirm"
"""The confirmation stage's Tune experiment, inside the run directory (tune.confirm)."""
OPTUNA_DB = "optuna.db"
"""Each model's Optuna study, in SQLite (without tune.storage): study `<run name>/<model>`."""


SCHEDULER_STATE = "asha_rungs.pkl"
"""ASHA's rungs, saved after every decision: Tune saves the searcher for a resume, but not the scheduler."""

CHECKPOINT_PREFIX = "checkpoint_"
"""Ray Tune's name for a trial's checkpoint folders (checkpoint_000000, ...)."""


WANDB_DIR = "wandb"
"""Where W&B writes a study's offline runs inside the run directory (wandb.init(dir=RUN_DIR) makes RUN_DIR/wandb)."""

STATE_FILE = "trainer_state.pt"
"""In each checkpoint: optimizer, schedule, loss scaler, epoch, micro-batch and clock (what a resume restores)."""
CHECKPOINT_METRICS = "metrics.json"
"""In each checkpoint: the epoch's metrics, the trial's hyperparameters and its model (what export reads)."""
VAL_PREDICTIONS = "val_predictions.npy"
"""In each checkpoint: the epoch's predicted class of every validation row, in row order (what the study's
bootstrap intervals resample)."""


@dataclass(frozen=True)
class RunDir:
    """One study run's directory: a local folder, or a folder in any store pyarrow.fs reaches."""

    uri: str
    """What users and Ray see: the local path, or the run directory's URI (s3://bucket/runs/name-stamp)."""
    fs: Any
    """pyarrow.fs.FileSystem holding the run directory."""
    path: str
    """The run directory inside `fs`."""
    local: Path
    """Where our own files are written: the run directory itself when local, else a staging folder that
    `publish` uploads."""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def storage_path(self) -> str:
        """The parent, as Ray's RunConfig(storage_path=...) wants it."""
        return self.uri.rstrip("/").rsplit("/", 1)[0]

    @property
    def remote(self) -> bool:
        import pyarrow.fs

        return not isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def optuna_storage(self, storage: str | None) -> str | None:
        """Where this run's Optuna studies are: tune.storage, else its SQLite file (OPTUNA_DB); None (in memory)
        for a remote run directory without tune.storage, where SQLite cannot live."""
        if storage:
            return storage
        return None if self.remote else f"sqlite:///{self.local.resolve() / OPTUNA_DB}"

    @staticmethod
    def shown_storage(storage: str | None) -> str | None:
        """A storage URL as printed and written to summary.json: any password masked."""
        if storage is None or "@" not in storage:
            return storage
        from sqlalchemy.engine import make_url

        try:
            return make_url(storage).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: show its scheme only
            return storage.split("://", 1)[0] + "://***"

    def study_name(self, model: str) -> str:
        """A model's Optuna study in the storage: the run's name and the model, unique in a shared database."""
        return f"{self.name}/{model}"

    def has(self, name: str = "") -> bool:
        import pyarrow.fs

        path = posixpath.join(self.path, name) if name else self.path
        return self.fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(posixpath.join(self.path, name)) as f:
            return f.readall().decode("utf-8")

    def download(self, *, histories: bool = True) -> None:
        """A fresh copy of a remote run's results in `local`: the files at its top (summary, trials, study) and,
        with `histories`, every trial's history (for the report). Checkpoints and W&B's offline runs stay remote
        (`fetch` the one checkpoint an export needs). No-op for a local run directory."""
        if not self.remote:
            return
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)  # our staging folder: never a stale file in the copy
        for name in self._files(""):
            parts = name.split("/")
            if len(parts) == 1 or (histories and parts[0] != WANDB_DIR
                                   and not any(part.startswith(CHECKPOINT_PREFIX) for part in parts)):
                self._download(name)

    def fetch(self, name: str) -> None:
        """Download one file or folder of a remote run (`name` relative to it) into `local`; no-op when local."""
        if self.remote:
            for file in self._files(name):
                self._download(file)

    def _files(self, name: str) -> list[str]:
        """The files at or under `name` in the run directory, relative to it."""
        import pyarrow.fs

        path = posixpath.join(self.path, name) if name else self.path
        info = self.fs.get_file_info(path)
        infos = [info] if info.type == pyarrow.fs.FileType.File else \
            self.fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        return [posixpath.relpath(i.path, self.path) for i in infos if i.type == pyarrow.fs.FileType.File]

    def _download(self, name: str) -> None:
        import pyarrow.fs

        (self.local / name).parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(posixpath.join(self.path, name), str(self.local / name), source_filesystem=self.fs)

    def publish(self, *names: str) -> None:
        """Upload our files and folders from the local staging folder (no-op for a local run directory)."""
        if not self.remote:
            return
        import pyarrow.fs

        made = set()
        for name in names:
            top = self.local / name
            if not top.exists():
                continue
            for file in ([top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file())):
                target = posixpath.join(self.path, file.relative_to(self.local).as_posix())
                if (folder := posixpath.dirname(target)) not in made:  # object stores take it as a no-op marker
                    self.fs.create_dir(folder, recursive=True)
                    made.add(folder)
                pyarrow.fs.copy_files(str(file), target, destination_filesystem=self.fs)


def open_filesystem(location: str, what: str):
    """(pyarrow filesystem, path inside it) of a local path or URI; a ConfigError naming `what` otherwise."""
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ArrowNotImplementedError, OSError ...
        raise ConfigError([f"{what}: cannot open {location!r} as a pyarrow filesystem ({e}); use a local path or "
                           f"a URI such as file:///abs/path, s3://bucket/prefix, gs://bucket/prefix"]) from None


def run_dir_at(location: str, what: str) -> RunDir:
    """The run directory at a local path or URI (whether or not it exists yet): a local one is used in place, a
    remote one gets a staging folder under $TMPDIR/tune_app/<name>; ConfigError naming `what` for a bad URI."""
    import pyarrow.fs

    fs, path = open_filesystem(location, what)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):  # a path or a file:// URI: one local folder, no staging
        return RunDir(uri=path, fs=fs, path=path, local=Path(path))
    staging = Path(tempfile.gettempdir()) / "tune_app" / posixpath.basename(path.rstrip("/"))
    return RunDir(uri=location.rstrip("/"), fs=fs, path=path.rstrip("/"), local=staging)


def open_results(location: str | Path) -> RunDir:
    """A run directory to export from or report on, local or remote (`download` brings a remote one's results
    here); ValueError naming the problem when there is nothing at `location`."""
    try:
        run = run_dir_at(str(location), "RUN_DIR")
        found = run.has()
    except ConfigError as e:
        raise ValueError(e.errors[0]) from None
    except OSError as e:  # a bucket that does not exist, missing credentials, no permission ...
        raise ValueError(f"{location}: cannot reach it ({e})") from None
    if not found:
        raise ValueError(f"{location}: no such run directory (pass the directory `tune-app run` printed)")
    return run


def open_run_dir(location: str) -> RunDir:
    """An existing run directory (for resume); ValueError naming the problem when it is not one."""
    try:
        run = run_dir_at(location, "RUN_DIR")
    except ConfigError as e:
        raise ValueError(e.errors[0]) from None
    if not run.has():
        raise ValueError(f"{location}: no such run directory")
    if not run.has(STUDY):
        raise ValueError(f"{location}: not a tune-app run directory (no {STUDY} inside); pass the folder "
                         f"`tune-app run` printed as 'run directory'")
    return run



def resume_command(run_dir: str | Path) -> str:
    """The command that continues an interrupted study in `run_dir` (a local path or a URI), quoted for a shell."""
    return f"tune-app resume {shlex.quote(str(run_dir))}"


def unfinished(summary: dict[str, Any]) -> str | None:
    """'N of M trials' for a study stopped before its end (resumable), None for one that ran to its end."""
    if summary.get("complete", True):
        return None
    return f"{summary.get('finished_trials', '?')} of {summary.get('planned_trials', '?')} trials"


def failure_line(run_dir: Path, error_file: str) -> str:
    """The last line of a failed trial's error.txt (the exception and its message), for a one-line summary."""
    try:
        lines = [line.strip() for line in (Path(run_dir) / error_file).read_text(errors="replace").splitlines()]
    except OSError:
        return f"(see {error_file})"
    last = next((line for line in reversed(lines) if line), "")
    return last if len(last) <= 300 else last[:297] + "..."


def configuration(row: dict[str, Any]) -> dict[str, Any]:
    """A trials.csv row's hyperparameters, those it set (a study YAML's `space` of fixed values)."""
    return {h: row[h] for h in HYPERPARAMETERS if row[h] is not None}


def best_fields(row: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    """What summary.json says of a model's best trial (`row` of trials.csv; None: no trial reported a result)."""
    if row is None:
        return dict.fromkeys(("best_metric", "best_trial", "best_epoch", "best_config", "metrics", "checkpoint"))
    return {"best_metric": row[f"best_{metric}"], "best_trial": row["trial_id"], "best_epoch": row["best_epoch"],
            "best_config": configuration(row), "metrics": {m: row[f"best_{m}"] for m in METRICS},
            "checkpoint": row["checkpoint"]}


def retrain_yaml(cfg: StudyConfig, model: str, params: dict[str, Any], header: str, seed: int | None = None) -> str:
    """A complete study YAML that trains one trial again, once: `model` alone, its hyperparameters fixed (and its
    seed, when it was not train.seed: a confirmation trial), local paths absolute (it is run from wherever the user
    is), no confirmation stage."""
    raw = absolute_paths(cfg.raw)
    model_raw = raw["models"][model]
    model_raw = {"checkpoint": model_raw} if isinstance(model_raw, str) else dict(model_raw)
    model_raw.pop("space", None)
    model_raw.pop("num_samples", None)
    raw["name"] = f"{cfg.name}-best"
    raw["models"] = {model: model_raw}
    raw["space"] = dict(params)
    raw.setdefault("tune", {})["num_samples"] = 1
    raw["tune"].pop("confirm", None)
    if seed is not None:
        raw.setdefault("train", {})["seed"] = seed
    return header + f"# Retrain it:  tune-app run {BEST_CONFIG}\n" + dump(raw)
