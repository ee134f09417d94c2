"""Builds and runs one Ray Tune study from a validated StudyConfig.

    data (once, on the driver) -> tokenize once per distinct tokenizer -> ray.put
    -> Tuner(with_parameters(train_trial, ctx), PerModelSearch(TPE per model), PerModelASHA) -> fit
    -> results (summary.json, trials.csv, best_config.yaml)
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.config import StudyConfig, resolve_checkpoint
from tune_app.data import Splits, TokenizedData, load_splits, tokenize, tokenizer_key

log = logging.getLogger("tune_app")

WANDB_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR")
FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TUNE_APP_TEST_OOM_ABOVE")


def new_run_dir(cfg: StudyConfig) -> Path:
    """<output_dir>/<name>-<timestamp>, never an existing directory."""
    root = Path(cfg.output_dir).expanduser().resolve()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / f"{cfg.name}-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = root / f"{cfg.name}-{stamp}-{n}"
    return candidate


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

    from tune_app.families import family_for

    splits = load_splits(cfg.data)
    tokenized: dict[str, TokenizedData] = {}
    model_keys: dict[str, str] = {}
    for name, model in cfg.models.items():
        tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(model.checkpoint), revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
        if model.target_modules is None:  # a Hub checkpoint of an unknown family fails here, before Ray starts
            family_for(AutoConfig.from_pretrained(resolve_checkpoint(model.checkpoint), revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code).model_type)
        key = tokenizer_key(tokenizer, cfg.data.max_length)
        if key not in tokenized:
            tokenized[key] = tokenize(tokenizer, splits, cfg.data.max_length)
            log.info("tokenized %d + %d rows for %s (tokenizer %s)", len(splits.train_texts),
                     len(splits.val_texts), name, key)
        model_keys[name] = key
    return PreparedData(splits, tokenized, model_keys)


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); otherwise start a local Ray with this machine's CPUs/GPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in WANDB_ENV + FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Adapter checkpoints are small: Tune's warning about frequent experiment snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False, runtime_env={"env_vars": env})


def trial_resources(cfg: StudyConfig, gpus_available: float) -> dict[str, dict[str, float]]:
    """Ray resources of one trial, per model: its cpus, and its GPU share when the cluster has GPUs."""
    from tune_app.resources import gpu_share

    return {name: {"cpu": m.cpu, "gpu": gpu_share(m, gpus_available)} for name, m in cfg.models.items()}


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
        precision=cfg.train.precision, compile=cfg.train.compile, max_length=cfg.data.max_length,
    )


def wandb_callback(cfg: StudyConfig, run_dir: Path):
    """One W&B run per trial (group = study run, job_type = model); None when W&B is disabled (nothing imported)."""
    if cfg.wandb.mode == "disabled":
        return None
    from tune_app.wandb_logging import TrialWandbCallback

    return TrialWandbCallback(cfg.wandb, run_name=run_dir.name, run_dir=run_dir)


def build_tuner(cfg: StudyConfig, run_dir: Path, ctx, resources: dict[str, dict[str, float]]):
    from ray import tune

    from tune_app.progress import ProgressPrinter
    from tune_app.search import MODEL_KEY, PerModelASHA, PerModelSearch
    from tune_app.trial import train_trial

    samples = {name: cfg.model_samples(name) for name in cfg.models}
    searcher = PerModelSearch({name: cfg.model_space(name) for name in cfg.models}, samples,
                              metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed,
                              n_startup_trials=cfg.tune.n_startup_trials)
    scheduler = PerModelASHA(list(cfg.models), metric=cfg.tune.metric, mode=cfg.tune.mode, max_t=cfg.train.epochs,
                             grace_period=cfg.tune.asha.grace_period,
                             reduction_factor=cfg.tune.asha.reduction_factor, enabled=cfg.tune.asha.enabled)
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx),
                                    resources=lambda config: resources[config[MODEL_KEY]])
    callbacks = [ProgressPrinter(cfg.tune.metric, cfg.tune.mode, sum(samples.values()))]
    if (wb := wandb_callback(cfg, run_dir)) is not None:
        callbacks.append(wb)
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=sum(samples.values()),
            search_alg=searcher, scheduler=scheduler,
            max_concurrent_trials=cfg.tune.max_concurrent,
            trial_dirname_creator=lambda trial: f"{trial.config[MODEL_KEY]}_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent), verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.tune.keep_checkpoints, checkpoint_score_attribute=cfg.tune.metric,
                checkpoint_score_order=cfg.tune.mode),
        ),
    )


def run_study(cfg: StudyConfig, *, address: str | None = None) -> dict[str, Any]:
    """Run a whole study; returns the summary written to <run_dir>/summary.json."""
    import ray

    from tune_app import results

    run_dir = new_run_dir(cfg)
    prepared = prepare_data(cfg)
    connect_ray(address)
    data_refs = {key: ray.put(data) for key, data in prepared.tokenized.items()}
    resources = trial_resources(cfg, ray.cluster_resources().get("GPU", 0.0))
    ctx = build_context(cfg, prepared, data_refs)
    print(f"study {cfg.name}: {len(cfg.models)} model(s), {sum(cfg.model_samples(m) for m in cfg.models)} trials, "
          f"{len(prepared.splits.train_texts)} train / {len(prepared.splits.val_texts)} validation rows, "
          f"{len(prepared.tokenized)} tokenization(s); run directory {run_dir}", flush=True)
    tuner = build_tuner(cfg, run_dir, ctx, resources)
    grid = tuner.fit()
    return results.write_results(cfg, run_dir, grid, prepared, resources)
