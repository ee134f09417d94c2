"""Builds, runs and resumes one Ray Tune study from a validated StudyConfig.

    data (once, on the driver) -> tokenize once per distinct tokenizer -> ray.put
    -> Tuner(with_parameters(train_trial, ctx), PerModelSearch(TPE per model), PerModelASHA) -> fit
    -> results (summary.json, trials.csv, best_config.yaml)

A run directory is `<output_dir>/<name>-<timestamp>`, where output_dir is a local folder or any URI pyarrow
filesystems understand (file://, s3://, gs://, ...). It holds `study.yaml` (the merged study, written first, so
that `tune-app resume` can rebuild the trainable), Ray Tune's experiment state and one folder per trial.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.config import ConfigError, StudyConfig, absolute_paths, first_line, resolve_checkpoint
from tune_app.data import Splits, TokenizedData, load_splits, tokenize, tokenizer_key

log = logging.getLogger("tune_app")

CHECKPOINT_PREFIX = "checkpoint_"
"""Ray Tune's name for a trial's checkpoint folders (checkpoint_000000, ...)."""
WANDB_DIR = "wandb"
"""Where W&B writes a study's offline runs inside the run directory (wandb.init(dir=RUN_DIR) makes RUN_DIR/wandb)."""
WANDB_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR")
FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TUNE_APP_TEST_OOM_ABOVE")


# --------------------------------------------------------------------------------------------- run directory


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

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ArrowNotImplementedError, OSError ...
        raise ConfigError([f"{what}: cannot open {location!r} as a pyarrow filesystem ({e}); use a local path or "
                           f"a URI such as file:///abs/path, s3://bucket/prefix, gs://bucket/prefix"]) from None


def _run_dir_at(location: str, what: str) -> RunDir:
    import pyarrow.fs

    fs, path = open_filesystem(location, what)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):  # a path or a file:// URI: one local folder, no staging
        return RunDir(uri=path, fs=fs, path=path, local=Path(path))
    staging = Path(tempfile.gettempdir()) / "tune_app" / posixpath.basename(path.rstrip("/"))
    return RunDir(uri=location.rstrip("/"), fs=fs, path=path.rstrip("/"), local=staging)


def new_run_dir(cfg: StudyConfig) -> RunDir:
    """<output_dir>/<name>-<timestamp>, never an existing directory."""
    root = cfg.output_dir if "://" in cfg.output_dir else str(Path(cfg.output_dir).expanduser().resolve())
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = f"{cfg.name}-{stamp}", 1
    try:
        while (run := _run_dir_at(f"{root.rstrip('/')}/{name}", "output_dir")).has():
            n += 1
            name = f"{cfg.name}-{stamp}-{n}"
    except OSError as e:  # a bucket that does not exist, missing credentials, no permission ...
        raise ConfigError([f"output_dir: cannot reach {cfg.output_dir!r} ({e})"]) from None
    return run


def open_results(location: str | Path) -> RunDir:
    """A run directory to export from or report on, local or remote (`download` brings a remote one's results
    here); ValueError naming the problem when there is nothing at `location`."""
    try:
        run = _run_dir_at(str(location), "RUN_DIR")
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
    from tune_app.results import STUDY

    try:
        run = _run_dir_at(location, "RUN_DIR")
    except ConfigError as e:
        raise ValueError(e.errors[0]) from None
    if not run.has():
        raise ValueError(f"{location}: no such run directory")
    if not run.has(STUDY):
        raise ValueError(f"{location}: not a tune-app run directory (no {STUDY} inside); pass the folder "
                         f"`tune-app run` printed as 'run directory'")
    return run


def portable_raw(cfg: StudyConfig, run: RunDir) -> dict:
    """The merged study with local paths made absolute and output_dir pinned, so it reruns from anywhere."""
    raw = absolute_paths(cfg.raw)
    raw["output_dir"] = run.storage_path
    return raw


def save_study(cfg: StudyConfig, run: RunDir) -> None:
    """Write <run_dir>/study.yaml before anything runs: what `tune-app resume` rebuilds the study from."""
    from tune_app.config import dump
    from tune_app.results import STUDY, resume_command

    run.local.mkdir(parents=True, exist_ok=True)
    (run.local / STUDY).write_text(f"# The merged study of run {run.uri}.\n# Continue it if interrupted:  "
                                   f"{resume_command(run.uri)}\n" + dump(portable_raw(cfg, run)))
    run.publish(STUDY)


# --------------------------------------------------------------------------------------------- data and Ray


@dataclass
class PreparedData:
    splits: Splits
    tokenized: dict[str, TokenizedData]
    """Tokenizer key -> both splits tokenized with it."""
    model_keys: dict[str, str]
    """Model name -> tokenizer key."""


def prepare_data(cfg: StudyConfig) -> PreparedData:
    """Load and split the data once; tokenize it once per distinct tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from tune_app.families import family_for, unmatched_targets

    splits = load_splits(cfg.data)
    tokenized: dict[str, TokenizedData] = {}
    model_keys: dict[str, str] = {}
    for name, model in cfg.models.items():
        path = resolve_checkpoint(model.checkpoint)
        load = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **load)
            hf_config = AutoConfig.from_pretrained(path, **load)
        except (OSError, ValueError) as e:  # not in the HF cache and no Hub (offline), a private repo, a bad folder
            raise ConfigError([f"models.{name}.checkpoint: cannot load {model.checkpoint!r}: {first_line(e)} (a Hub "
                               f"model this machine cannot fetch: download it once where the Hub is reachable, "
                               f"hf download {model.checkpoint}, or set the checkpoint to a local folder)"]) from e
        if model.target_modules is None:  # a Hub checkpoint of an unknown family fails here, before Ray starts
            family_for(hf_config.model_type)
        else:  # names that match no layer would fail every trial
            missing, linear = unmatched_targets(hf_config, model.target_modules,
                                                trust_remote_code=model.trust_remote_code)
            if missing:
                raise ConfigError([f"models.{name}.target_modules: {missing} match no layer of {model.checkpoint!r} "
                                   f"that LoRA can adapt; its linear layers are named: {', '.join(linear)}"])
        key = tokenizer_key(tokenizer, cfg.data.max_length)
        if key not in tokenized:
            tokenized[key] = tokenize(tokenizer, splits, cfg.data.max_length)
            log.info("tokenized %d + %d rows for %s (tokenizer %s)", len(splits.train_texts),
                     len(splits.val_texts), name, key)
        model_keys[name] = key
    return PreparedData(splits, tokenized, model_keys)


def _job_env_vars() -> dict[str, str]:
    """Env vars of the runtime env of the `ray job submit` job this driver runs in ({} outside a job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    return dict((job.get("runtime_env") or {}).get("env_vars") or {})


def trial_env_vars() -> dict[str, str]:
    """What trials need from the driver's environment (W&B mode, HF cache and offline switches).

    Keys the job's own runtime env already sets are left out: they reach the trials anyway, and Ray refuses
    a ray.init runtime env that repeats a key of the job's ("Failed to merge the Job's runtime env").
    """
    job_env = _job_env_vars()
    env = {k: os.environ[k] for k in WANDB_ENV + FORWARDED_ENV if k in os.environ and k not in job_env}
    # Quiet defaults the user's own environment overrides: no tokenizer thread pools inside trials, and W&B's
    # per-run banner ("Tracking run ...", "View this run ...") off, one per trial otherwise.
    # TUNE_FUNCTION_THREAD_TIMEOUT_S: with tune.reuse_actors a worker waits this long for its previous trial to
    # wind down (ASHA stop, base handed back) before the next; Ray's 2 s default turns a slow wind-down of a large
    # model into an ERROR of the NEXT trial.
    for key, default in (("TOKENIZERS_PARALLELISM", "false"), ("WANDB_SILENT", "true"),
                         ("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")):
        if key not in job_env:
            env[key] = os.environ.get(key, default)
    return env


def check_trials_fit(resources: dict[str, dict[str, float]]) -> None:
    """A trial that no live node can hold would wait forever on a Ray this process started here (Ray only logs a
    warning every minute): ConfigError naming the model's key. On a cluster, nodes may join (an autoscaler's):
    a warning, up front."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    most = {kind: max((r.get(kind, 0) for r in nodes), default=0) for kind in ("CPU", "GPU")}
    errors = []
    for name, need in resources.items():
        if any(r.get("CPU", 0) >= need["cpu"] and r.get("GPU", 0) >= need["gpu"] for r in nodes):
            continue
        key = "cpu" if need["cpu"] > most["CPU"] else "gpu"
        gpu = f" and {need['gpu']:g} GPU" if need["gpu"] else ""
        if _started_local:
            errors.append(f"models.{name}.{key}: one trial needs {need['cpu']:g} CPU{gpu}, but this machine offers Ray "
                          f"{most['CPU']:g} CPU and {most['GPU']:g} GPU; lower models.{name}.{key}, or run the study "
                          f"on a cluster that has such nodes (ray job submit, or tune-app run --address)")
        else:
            print(f"warning: no node of this Ray cluster has {need['cpu']:g} CPU{gpu} for one trial of {name}; its "
                  f"trials wait until such a node joins (an autoscaler adds it), or lower models.{name}.cpu/gpu",
                  flush=True)
    if errors:
        raise ConfigError(errors)


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, which `ray job submit` sets for its driver); otherwise
    start a local Ray with this machine's CPUs/GPUs and no dashboard."""
    import ray

    global _connected_here, _started_local
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": trial_env_vars()}
    _connected_here = True
    # Adapter checkpoints are small: Tune's warning about frequent experiment snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False, runtime_env=runtime_env)
        _started_local = True


_connected_here = False
"""Whether this process called ray.init (rather than finding Ray already initialised by its caller)."""
_started_local = False
"""Whether that ray.init had no cluster address: a new Ray on this machine, or the one a `ray start --head` runs
here; no autoscaler adds nodes to either."""


def disconnect_ray() -> None:
    """Leave Ray once the study is over, if this process joined it: the driver stops listening to worker logs
    before the cluster reaps the trial workers, so their shutdown noise (SIGTERM tracebacks) never reaches the
    user's terminal. A caller's own Ray (a notebook, the test session) is left alone."""
    global _connected_here, _started_local
    if _connected_here:
        import ray

        ray.shutdown()
        _connected_here = _started_local = False


def warn_if_lost_in_job(cfg: StudyConfig) -> None:
    """A job's working dir is a temporary copy on the head node: a relative output_dir would end up there."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ and "://" not in cfg.output_dir \
            and not os.path.isabs(os.path.expanduser(cfg.output_dir)):
        print(f"warning: output_dir {cfg.output_dir!r} is relative, so inside this Ray job it lands in the job's "
              f"temporary working-dir copy ({os.getcwd()}); pass output_dir=/abs/path or a URI (s3://...) to keep "
              f"the results", flush=True)


def trial_resources(cfg: StudyConfig, gpus_available: float, prepared: PreparedData | None = None,
                    cpus_available: float | None = None) -> dict[str, dict[str, float]]:
    """Ray resources of one trial, per model: its cpus, and its GPU share when the cluster has GPUs
    (`gpu: auto`: packed by memory estimate and cores, see resources.py)."""
    from tune_app.resources import trial_resources as plan

    longest = {name: int(prepared.tokenized[key].train.lengths.max()) for name, key in prepared.model_keys.items()
               } if prepared else None
    return plan(cfg, gpus_available, cpus_available=cpus_available, longest=longest,
                num_labels=prepared.splits.num_labels if prepared else 2)


def build_context(cfg: StudyConfig, prepared: PreparedData, data_refs: dict[str, Any]):
    from tune_app.trial import ModelSpec, TrialContext

    specs = {
        name: ModelSpec(checkpoint=resolve_checkpoint(m.checkpoint), data_key=prepared.model_keys[name],
                        dtype=m.dtype, trust_remote_code=m.trust_remote_code, revision=m.revision,
                        target_modules=tuple(m.target_modules) if m.target_modules else None)
        for name, m in cfg.models.items()
    }
    return TrialContext(
        models=specs, data_refs=data_refs, label_names=prepared.splits.label_names,
        class_weights=prepared.splits.class_weights, epochs=cfg.train.epochs,
        eval_batch_size=cfg.train.eval_batch_size, weighted_loss=cfg.train.weighted_loss, seed=cfg.train.seed,
        precision=cfg.train.precision, compile=cfg.train.compile, cuda_graphs=cfg.train.cuda_graphs,
        max_length=cfg.data.max_length,
    )


@dataclass
class Session:
    """Everything a fit needs on the driver: the data (tokenized, in the object store) and the trainable."""

    prepared: PreparedData
    resources: dict[str, dict[str, float]]
    trainable: Any


class _NoTunerRestoreHint(logging.Filter):
    """Ray Tune's own Ctrl-C hint ("Resume experiment with: Tuner.restore(...)") is Python for Ray users; a tune_app
    study prints its own, `tune-app resume RUN_DIR`, and one hint is clearer than two."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with:" not in record.getMessage()


def start_session(cfg: StudyConfig, address: str | None, prepared: PreparedData | None = None) -> Session:
    """Data (`prepare_data` unless given) -> Ray -> object refs -> the trainable. Run start and resume both build
    the trainable this way."""
    import ray
    from ray import tune

    from tune_app.search import MODEL_KEY
    from tune_app.trial import train_trial

    prepared = prepared or prepare_data(cfg)
    connect_ray(address)
    tune_logger = logging.getLogger("ray.tune.tune")  # run and resume: tune_app's resume hint, not Ray's
    if not any(isinstance(f, _NoTunerRestoreHint) for f in tune_logger.filters):
        tune_logger.addFilter(_NoTunerRestoreHint())
    data_refs = {key: ray.put(data) for key, data in prepared.tokenized.items()}
    cluster = ray.cluster_resources()
    resources = trial_resources(cfg, cluster.get("GPU", 0.0), prepared, cluster.get("CPU"))
    check_trials_fit(resources)
    ctx = build_context(cfg, prepared, data_refs)
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx),
                                    resources=lambda config: resources[config[MODEL_KEY]])
    return Session(prepared, resources, trainable)


def wandb_callback(cfg: StudyConfig, run_dir: Path):
    """One W&B run per trial (group = study run, job_type = model); None when W&B is disabled (nothing imported)."""
    if cfg.wandb.mode == "disabled":
        return None
    from tune_app.wandb_logging import TrialWandbCallback

    return TrialWandbCallback(cfg.wandb, run_name=run_dir.name, run_dir=run_dir)


def build_tuner(cfg: StudyConfig, run: RunDir, trainable, callbacks: tuple = ()):
    """The Tuner of a study; `callbacks`: further Tune callbacks (the benchmark's trial clock)."""
    from ray import tune

    from tune_app.progress import ProgressPrinter
    from tune_app.results import SCHEDULER_STATE
    from tune_app.search import MODEL_KEY, PerModelASHA, PerModelSearch

    samples = {name: cfg.model_samples(name) for name in cfg.models}
    searcher = PerModelSearch({name: cfg.model_space(name) for name in cfg.models}, samples,
                              metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed,
                              n_startup_trials=cfg.tune.n_startup_trials)
    scheduler = PerModelASHA(list(cfg.models), metric=cfg.tune.metric, mode=cfg.tune.mode, max_t=cfg.train.epochs,
                             grace_period=cfg.tune.asha.grace_period,
                             reduction_factor=cfg.tune.asha.reduction_factor, enabled=cfg.tune.asha.enabled,
                             state_uri=f"{run.uri}/{SCHEDULER_STATE}")
    callbacks = [ProgressPrinter(cfg.tune.metric, cfg.tune.mode, cfg.planned_trials), *callbacks]
    if (wb := wandb_callback(cfg, run.local)) is not None:  # W&B offline runs need a local folder
        callbacks.append(wb)
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.planned_trials,
            search_alg=searcher, scheduler=scheduler,
            max_concurrent_trials=cfg.tune.max_concurrent,
            reuse_actors=cfg.tune.reuse_actors,
            trial_dirname_creator=lambda trial: f"{trial.config[MODEL_KEY]}_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=run.name, storage_path=run.storage_path, verbose=0, callbacks=callbacks,
            # A trial that raised is retried max_failures times (an OOM is first retried inside the trial with
            # a smaller micro-batch); after that it counts as FAILED and the study goes on.
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.tune.keep_checkpoints, checkpoint_score_attribute=cfg.tune.metric,
                checkpoint_score_order=cfg.tune.mode),
        ),
    )


def _describe(cfg: StudyConfig, session: Session, run: RunDir) -> None:
    from tune_app.results import resume_command

    splits = session.prepared.splits
    positive = f" (positive class, scored by F1: {splits.label_names[1]!r})" if splits.num_labels == 2 else ""
    print(f"study {cfg.name}: {len(cfg.models)} model(s), {cfg.planned_trials} trials, "
          f"{len(splits.train_texts)} train / {len(splits.val_texts)} validation rows, labels "
          f"{splits.label_names}{positive}, "
          f"{len(session.prepared.tokenized)} tokenization(s); run directory {run.uri}\n"
          f"(if it stops midway, continue with: {resume_command(run.uri)})", flush=True)


def run_study(cfg: StudyConfig, *, address: str | None = None) -> dict[str, Any]:
    """Run a whole study; returns the summary written to <run_dir>/summary.json."""
    prepared = prepare_data(cfg)  # a checkpoint that cannot load stops the study here: nothing written yet
    session = start_session(cfg, address, prepared)  # so does a trial no node can hold
    run = new_run_dir(cfg)
    warn_if_lost_in_job(cfg)
    try:
        save_study(cfg, run)
    except OSError as e:  # a place this process may not write in (validate's check cannot see every such case)
        raise ConfigError([f"output_dir: cannot write the run directory {run.uri} ({e}); name a folder this user "
                           f"can write in"]) from None
    _describe(cfg, session, run)
    grid = build_tuner(cfg, run, session.trainable).fit()
    return finish_study(cfg, run, grid, session)


# --------------------------------------------------------------------------------------------- resume


def finished_summary(run: RunDir) -> dict[str, Any] | None:
    """The summary of a study that ran to its end, or None while it is unfinished."""
    from tune_app.results import SUMMARY

    if not run.has(SUMMARY):
        return None
    summary = json.loads(run.read_text(SUMMARY))
    return summary if summary.get("complete", True) else None


def load_run_config(run: RunDir) -> StudyConfig:
    """The study a run directory was started with (its study.yaml)."""
    from tune_app import config as config_mod
    from tune_app.results import STUDY

    run.local.mkdir(parents=True, exist_ok=True)
    if run.remote:
        (run.local / STUDY).write_text(run.read_text(STUDY))
    return config_mod.load(run.local / STUDY, check_wandb=True, check_outputs=True)


def check_resumable(run: RunDir) -> None:
    """ValueError when Ray Tune saved no state in the run directory (stopped before the first trial)."""
    from ray import tune

    if not tune.Tuner.can_restore(run.uri):
        raise ValueError(f"{run.uri}: the study stopped before Ray Tune saved any state, so there is nothing to "
                         f"resume; start it again with: tune-app run {shlex.quote(run.uri + '/study.yaml')}")


def resume_study(run: RunDir, *, address: str | None = None) -> dict[str, Any]:
    """Continue an interrupted study: finished trials are kept (failed ones stay failed), unfinished ones go on
    from their last checkpoint, and the searcher continues from its saved state."""
    from ray import tune

    cfg = load_run_config(run)
    session = start_session(cfg, address)
    print(f"resuming study {cfg.name} in {run.uri}", flush=True)
    tuner = tune.Tuner.restore(run.uri, trainable=session.trainable, resume_unfinished=True, resume_errored=False)
    return finish_study(cfg, run, tuner.fit(), session)


# --------------------------------------------------------------------------------------------- results


FINISHED_STATUSES = ("TERMINATED", "ERROR")
"""Tune statuses of a trial that will not run again: completed, stopped by ASHA, or failed for good."""


def saved_statuses(run: RunDir) -> dict[str, str]:
    """Trial id -> status in the experiment state Tune saved last. Tune saves it before stopping what still runs
    at exit, so a trial cut short by Ctrl-C is RUNNING there (the ResultGrid already says TERMINATED), and a
    trial that finished before a resume is TERMINATED there (its in-memory result lost the `done` flag)."""
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(run.uri).trials}


def prune_checkpoints(cfg: StudyConfig, results: list) -> int:
    """Keep only the best `keep_checkpoints` adapters of each trial; returns how many checkpoints were deleted.

    While a study runs, Tune also keeps each trial's latest checkpoint (what a resume continues from); once
    every trial has finished, that one is only disk usage unless it is also among the best.
    """
    import pyarrow.fs

    metric, mode, removed = cfg.tune.metric, cfg.tune.mode, 0
    for result in results:
        scored = [(c, m) for c, m in result.best_checkpoints if m.get(metric) is not None]
        # Stable sort: among equal scores the first wins, as in Result.get_best_checkpoint.
        ranked = sorted(scored, key=lambda cm: cm[1][metric], reverse=(mode == "max"))
        keep = {posixpath.normpath(c.path) for c, _ in ranked[:cfg.tune.keep_checkpoints]}
        # Every checkpoint folder on disk: Tune's best list leaves out the latest one it keeps for resume.
        entries = result.filesystem.get_file_info(pyarrow.fs.FileSelector(result.path, allow_not_found=True))
        for entry in entries:
            if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith("checkpoint_") \
                    and posixpath.normpath(entry.path) not in keep:
                result.filesystem.delete_dir(entry.path)
                removed += 1
    return removed


def finish_study(cfg: StudyConfig, run: RunDir, grid, session: Session) -> dict[str, Any]:
    """Write the results of every finished trial (completed, stopped early, failed), once each.

    A fit that ended before every planned trial finished (Ctrl-C) is `complete: false`: its summary lists what
    finished and `tune-app resume` continues the rest.
    """
    from tune_app import results

    statuses = saved_statuses(run)
    finished = [r for r in grid if statuses.get(results.trial_id_of(r)) in FINISHED_STATUSES]
    complete = len(finished) >= cfg.planned_trials
    if complete:
        prune_checkpoints(cfg, finished)
    extra = {"run_dir": run.uri, "complete": complete, "planned_trials": cfg.planned_trials,
             "finished_trials": len(finished)}
    if not complete:
        extra["resume_command"] = results.resume_command(run.uri)
    summary = results.write_results(cfg, run.local, finished, session.prepared, session.resources, extra=extra)
    run.publish(results.SUMMARY, results.TRIALS, results.BEST_CONFIG, WANDB_DIR)  # W&B offline runs need a local dir
    return summary
