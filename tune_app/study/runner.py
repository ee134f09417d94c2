"""Builds, runs and resumes one Ray Tune study from a validated StudyConfig.

    data (once, on the driver) -> tokenize once per distinct tokenizer -> ray.put
    -> Tuner(with_parameters(train_trial, ctx), PerModelSearch(TPE per model), PerModelASHA) -> fit
    -> with tune.confirm: Tuner(the best configurations x other seeds) -> fit   (tune_app.study.confirm)
    -> results (summary.json, trials.csv, best_config.yaml)

The run directory (`tune_app.spec.rundir`, made by `tune_app.study.storage`) holds `study.yaml` (written first,
so that `tune-app resume` can rebuild the trainable), Ray Tune's experiment state and one folder per trial, and
the confirmation stage's experiment in confirm/.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_app.errors import ConfigError
from tune_app.spec.config import StudyConfig
from tune_app.spec.paths import resolve_checkpoint
from tune_app.spec.rundir import (
    BEST_CONFIG,
    CHECKPOINT_PREFIX,
    CONFIRM_DIR,
    SCHEDULER_STATE,
    SUMMARY,
    TRIALS,
    WANDB_DIR,
    RunDir,
    resume_command,
)
from tune_app.spec.space import MODEL_KEY
from tune_app.study import packing
from tune_app.study.cluster import (
    GpuMemory,
    check_storage_reachable,
    check_trials_fit,
    connect_ray,
    planned_gpu_memory,
    warn_if_lost_in_job,
)
from tune_app.study.prepare import PreparedData, prepare_data
from tune_app.study.storage import load_run_config, new_run_dir, save_study

# --------------------------------------------------------------------------------------------- the study


def trial_resources(cfg: StudyConfig, gpus_available: float, prepared: PreparedData | None = None,
                    cpus_available: float | None = None, gpu_memory: int | None = None) -> dict[str, dict[str, float]]:
    """Ray resources of one trial, per model: its cpus, and its GPU share when the cluster has GPUs
    (`gpu: auto`: packed by memory estimate and cores into `gpu_memory` bytes per GPU, see resources.py)."""
    from tune_app.study.resources import trial_resources as plan

    longest = {name: int(prepared.tokenized[key].train.lengths.max()) for name, key in prepared.model_keys.items()
               } if prepared else None
    return plan(cfg, gpus_available, cpus_available=cpus_available, longest=longest,
                num_labels=prepared.splits.num_labels if prepared else 2, gpu_memory=gpu_memory)


def build_context(cfg: StudyConfig, prepared: PreparedData, data_refs: dict[str, Any]):
    from tune_app.train.model import ModelSpec
    from tune_app.train.trainable import TrialContext

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
    packs: dict[str, packing.PackPlan] = field(default_factory=dict)
    """Model -> how its trials are packed (tune.pack); models not listed train one trial per process."""
    pack_actors: list = field(default_factory=list)
    gpu_memory: GpuMemory | None = None
    """What `gpu: auto` planned each GPU's memory as (None: no model asked for it, or the cluster has no GPU)."""


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

    from tune_app.study.board import start_board
    from tune_app.train.trainable import train_trial

    prepared = prepared or prepare_data(cfg)
    connect_ray(address)
    tune_logger = logging.getLogger("ray.tune.tune")  # run and resume: tune_app's resume hint, not Ray's
    if not any(isinstance(f, _NoTunerRestoreHint) for f in tune_logger.filters):
        tune_logger.addFilter(_NoTunerRestoreHint())
    data_refs = {key: ray.put(data) for key, data in prepared.tokenized.items()}
    cluster = ray.cluster_resources()
    auto = cluster.get("GPU", 0.0) > 0 and any(m.gpu == "auto" for m in cfg.models.values())
    gpu_memory = planned_gpu_memory() if auto else None  # the GPU nodes' own, not the driver's
    resources = trial_resources(cfg, cluster.get("GPU", 0.0), prepared, cluster.get("CPU"),
                                gpu_memory=gpu_memory.bytes if gpu_memory else None)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    plans = packing.plan(cfg, resources, max((n.get("CPU", 0) for n in nodes), default=0))
    resources = packing.apply(resources, plans)
    check_trials_fit(resources)
    check_storage_reachable(cfg.output_dir, resources)  # every node writes checkpoints there: refused before trials
    ctx = build_context(cfg, prepared, data_refs)
    ctx.progress = start_board()  # what trials' heartbeats tell, and the progress printer reads
    actors = packing.start(ctx, plans, resources)  # before the context goes to the object store with the trainable
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx),
                                    resources=lambda config: resources[config[MODEL_KEY]])
    return Session(prepared, resources, trainable, plans, actors, gpu_memory)


def wandb_callback(cfg: StudyConfig, run_dir: Path):
    """One W&B run per trial (group = study run, job_type = model); None when W&B is disabled (nothing imported)."""
    if cfg.wandb.mode == "disabled":
        return None
    from tune_app.study.wandb_logging import TrialWandbCallback

    return TrialWandbCallback(cfg.wandb, run_name=run_dir.name, run_dir=run_dir)


def build_tuner(cfg: StudyConfig, run: RunDir, trainable, callbacks: tuple = (), warm=None):
    """The Tuner of a study's search; `callbacks`: further Tune callbacks (the benchmark's trial clock); `warm`:
    the earlier trials of tune.warm_start (warmstart.load)."""
    from tune_app.study.search import PerModelASHA, PerModelSearch

    samples = {name: cfg.model_samples(name) for name in cfg.models}
    if not run.remote:  # where its SQLite file goes (save_study made it already, unless a benchmark calls this)
        run.local.mkdir(parents=True, exist_ok=True)
    searcher = PerModelSearch({name: cfg.model_space(name) for name in cfg.models}, samples,
                              metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed, epochs=cfg.train.epochs,
                              n_startup_trials=cfg.tune.n_startup_trials, storage=run.optuna_storage(cfg.tune.storage),
                              study_prefix=run.study_name(""), warm=warm)
    for model, said in searcher.warm_said.items():
        print(f"warm start: {model}: {said}", flush=True)
    scheduler = PerModelASHA(list(cfg.models), metric=cfg.tune.metric, mode=cfg.tune.mode, max_t=cfg.train.epochs,
                             grace_period=cfg.tune.asha.grace_period,
                             reduction_factor=cfg.tune.asha.reduction_factor, enabled=cfg.tune.asha.enabled,
                             state_uri=f"{run.uri}/{SCHEDULER_STATE}")
    return _tuner(cfg, run, trainable, searcher, scheduler, trials=cfg.planned_trials, name=run.name,
                  storage_path=run.storage_path, callbacks=callbacks)


def confirmation_tuner(cfg: StudyConfig, run: RunDir, trainable, configs: list[dict[str, Any]]):
    """The Tuner of the confirmation stage: `configs` in order, every epoch run, in RUN_DIR/confirm."""
    from tune_app.study.confirm import FixedTrials

    return _tuner(cfg, run, trainable, FixedTrials(configs, metric=cfg.tune.metric, mode=cfg.tune.mode), None,
                  trials=len(configs), name=CONFIRM_DIR, storage_path=run.uri)


def _tuner(cfg: StudyConfig, run: RunDir, trainable, searcher, scheduler, *, trials: int, name: str,
           storage_path: str, callbacks: tuple = ()):
    from ray import tune

    from tune_app.study.progress import ProgressPrinter

    callbacks = [ProgressPrinter(cfg.tune.metric, cfg.tune.mode, trials, epochs=cfg.train.epochs), *callbacks]
    if (wb := wandb_callback(cfg, run.local)) is not None:  # W&B offline runs need a local folder
        callbacks.append(wb)
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=trials,
            search_alg=searcher, scheduler=scheduler,
            max_concurrent_trials=cfg.tune.max_concurrent,
            reuse_actors=cfg.tune.reuse_actors,
            trial_dirname_creator=lambda trial: f"{trial.config[MODEL_KEY]}_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=0, callbacks=callbacks,
            # A trial that raised is retried max_failures times (an OOM is first retried inside the trial with
            # a smaller micro-batch); after that it counts as FAILED and the study goes on.
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.tune.keep_checkpoints, checkpoint_score_attribute=cfg.tune.metric,
                checkpoint_score_order=cfg.tune.mode),
        ),
    )


def _describe(cfg: StudyConfig, session: Session, run: RunDir) -> None:
    splits = session.prepared.splits
    positive = f" (positive class, scored by F1: {splits.label_names[1]!r})" if splits.num_labels == 2 else ""
    print(f"study {cfg.name}: {len(cfg.models)} model(s), {cfg.planned_trials} trials, "
          f"{len(splits.train_texts)} train / {len(splits.val_texts)} validation rows, labels "
          f"{splits.label_names}{positive}, "
          f"{len(session.prepared.tokenized)} tokenization(s); run directory {run.uri}\n"
          f"{_resources_line(session)}\n{_storage_line(cfg, run)}\n{_packing_line(cfg, session)}\n"
          f"{_confirm_line(cfg)}\n"
          f"(if it stops midway, continue with: {resume_command(run.uri)})", flush=True)


def _resources_line(session: Session) -> str:
    """What each trial holds, per model, and what GPU memory `gpu: auto` planned for."""
    held = "; ".join(f"{name} {need['cpu']:g} CPU" + (f" + {need['gpu']:g} GPU" if need["gpu"] else "")
                     for name, need in session.resources.items())
    planned = f"; gpu: auto planned for {session.gpu_memory.describe()}" if session.gpu_memory else ""
    return f"resources per trial: {held}{planned}"


def _packing_line(cfg: StudyConfig, session: Session) -> str:
    """How trials are packed, per model (tune.pack)."""
    if not session.packs:
        why = {"off": "", "auto": ", which packs only trials that share a GPU: none do here"}.get(
            cfg.tune.pack, ": no GPU or node here holds two trials of a model")
        return f"packing: none (tune.pack {cfg.tune.pack}{why}): each trial trains in its own process"
    packed = "; ".join(f"{name}: {plan.describe()}" for name, plan in session.packs.items())
    alone = [name for name in cfg.models if name not in session.packs]
    return f"packing: {packed}" + (f"; {', '.join(alone)}: one trial per process" if alone else "")


def _storage_line(cfg: StudyConfig, run: RunDir) -> str:
    storage = run.optuna_storage(cfg.tune.storage)
    if storage is None:
        return ("optuna: each model's study in memory (a remote run directory cannot hold SQLite; tune.storage "
                "keeps them in a database)")
    return f"optuna: each model's study in {run.shown_storage(storage)} as {run.study_name('<model>')}"


def _confirm_line(cfg: StudyConfig) -> str:
    from tune_app.study.confirm import seeds

    confirm = cfg.tune.confirm
    if not confirm.enabled:
        return "confirmation: off (tune.confirm.top 0): the winner is the search's best trial"
    return (f"confirmation: then each model's {confirm.top} best configuration(s) train again with seeds "
            f"{', '.join(map(str, seeds(cfg)))} (up to "
            f"{confirm.top * confirm.seeds * len(cfg.models)} trials); the winner is the best mean")


def run_study(cfg: StudyConfig, *, address: str | None = None) -> dict[str, Any]:
    """Run a whole study; returns the summary written to <run_dir>/summary.json."""
    from tune_app.study import warmstart
    from tune_app.study.studies import check_storage

    check_storage(cfg.tune.storage)  # a database that cannot be opened stops the study here, before Ray
    warm = warmstart.load(cfg.tune.warm_start, list(cfg.models))  # so does a warm start with nothing to start from
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
    grid = build_tuner(cfg, run, session.trainable, warm=warm).fit()
    return finish_study(cfg, run, grid, session)


# --------------------------------------------------------------------------------------------- resume


def check_resumable(run: RunDir) -> None:
    """ValueError when Ray Tune saved no state in the run directory (stopped before the first trial)."""
    from ray import tune

    if not tune.Tuner.can_restore(run.uri):
        raise ValueError(f"{run.uri}: the study stopped before Ray Tune saved any state, so there is nothing to "
                         f"resume; start it again with: tune-app run {shlex.quote(run.uri + '/study.yaml')}")


def resume_study(run: RunDir, *, address: str | None = None) -> dict[str, Any]:
    """Continue an interrupted study: finished trials are kept (failed ones stay failed), unfinished ones go on
    from their last checkpoint, and the searcher continues from its saved state; then the confirmation stage
    starts, or continues likewise."""
    from ray import tune

    cfg = load_run_config(run)
    session = start_session(cfg, address)
    print(f"resuming study {cfg.name} in {run.uri}", flush=True)
    tuner = tune.Tuner.restore(run.uri, trainable=session.trainable, resume_unfinished=True, resume_errored=False)
    return finish_study(cfg, run, tuner.fit(), session)


# --------------------------------------------------------------------------------------------- results


FINISHED_STATUSES = ("TERMINATED", "ERROR")
"""Tune statuses of a trial that will not run again: completed, stopped by ASHA, or failed for good."""


def finished_results(experiment: str, grid) -> list:
    """The results of `grid` whose trials will not run again, by the experiment state Tune saved last in
    `experiment` (a URI). Tune saves it before stopping what still runs at exit, so a trial cut short by Ctrl-C is
    RUNNING there (the ResultGrid already says TERMINATED), and a trial that finished before a resume is TERMINATED
    there (its in-memory result lost the `done` flag)."""
    from ray.tune import ExperimentAnalysis

    from tune_app.study.results import trial_id_of

    statuses = {trial.trial_id: trial.status for trial in ExperimentAnalysis(experiment).trials}
    return [r for r in grid if statuses.get(trial_id_of(r)) in FINISHED_STATUSES]


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
            if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX) \
                    and posixpath.normpath(entry.path) not in keep:
                result.filesystem.delete_dir(entry.path)
                removed += 1
    return removed


def confirm_stage(cfg: StudyConfig, run: RunDir, session: Session, search: list) -> tuple[dict, list, int]:
    """Run the confirmation stage after a complete search (`search`: its finished results), or continue it where
    a resume finds it: (the picked search trials per model, the stage's finished results, its planned trials)."""
    from ray import tune

    from tune_app.study import confirm, results

    picked = confirm.candidates(cfg, results.trial_rows(cfg, search, run))
    configs = confirm.confirmation_trials(cfg, picked, {results.trial_id_of(r): r.config for r in search})
    experiment = f"{run.uri}/{CONFIRM_DIR}"
    if not configs:  # no search trial reported a score: nothing to confirm
        return picked, [], 0
    if tune.Tuner.can_restore(experiment):
        print(f"continuing the confirmation stage in {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=session.trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        shown = "; ".join(f"{model} {', '.join(r['trial_id'] for r in rows)}" for model, rows in picked.items())
        print(f"confirmation: {len(configs)} trials: {shown}, each with seeds "
              f"{', '.join(map(str, confirm.seeds(cfg)))}", flush=True)
        tuner = confirmation_tuner(cfg, run, session.trainable, configs)
    return picked, finished_results(experiment, tuner.fit()), len(configs)


def finish_study(cfg: StudyConfig, run: RunDir, grid, session: Session) -> dict[str, Any]:
    """Write the results of every finished trial (completed, stopped early, failed), once each; after a complete
    search with tune.confirm, the confirmation stage runs (or continues) first.

    A fit that ended before every planned trial finished (Ctrl-C) is `complete: false`: its summary lists what
    finished and `tune-app resume` continues the rest (the confirmation stage too).
    """
    from tune_app.study import results

    finished = finished_results(run.uri, grid)
    planned, complete = cfg.planned_trials, len(finished) >= cfg.planned_trials
    confirmation, confirmed = None, []
    if complete and cfg.tune.confirm.enabled:
        picked, confirmed, more = confirm_stage(cfg, run, session, finished)
        planned, complete = planned + more, len(confirmed) >= more
        confirmation = (picked, confirmed) if complete else None
    if complete:
        prune_checkpoints(cfg, finished + confirmed)
    from tune_app.study.studies import parameter_importances, stored_studies
    from tune_app.study.warmstart import warm_started

    storage = run.optuna_storage(cfg.tune.storage)
    studies = stored_studies(storage, {m: run.study_name(m) for m in cfg.models})
    extra = {"run_dir": run.uri, "complete": complete, "planned_trials": planned,
             "finished_trials": len(finished) + len(confirmed), "optuna_storage": run.shown_storage(storage),
             "importances": parameter_importances(studies)}
    if cfg.tune.warm_start:
        extra["warm_start"] = warm_started(cfg.tune.warm_start, studies)
    if not complete:
        extra["resume_command"] = resume_command(run.uri)
    summary = results.write_results(cfg, run, finished, session.prepared, session.resources, extra=extra,
                                    confirmation=confirmation)
    run.publish(SUMMARY, TRIALS, BEST_CONFIG, WANDB_DIR)  # W&B offline runs need a local dir
    return summary
