"""The Ray connection: join a cluster (or start a local Ray), pass the driver's environment on to the trials, check
that every trial fits a node, and leave Ray again at the end.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.errors import ConfigError
from tune_app.spec.config import StudyConfig
from tune_app.spec.paths import is_uri

WANDB_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR")


FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TUNE_APP_TEST_OOM_ABOVE")


@dataclass
class _Connection:
    """What this process did about Ray, so that it leaves only what it joined."""

    joined: bool = False
    """Whether this process called ray.init (rather than finding Ray already initialised by its caller)."""
    local: bool = False
    """Whether that ray.init had no cluster address: a new Ray on this machine, or the one a `ray start --head` runs
    here; no autoscaler adds nodes to either."""


_connection = _Connection()


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
        if any(can_hold(r, {name: need}) for r in nodes):
            continue
        key = "cpu" if need["cpu"] > most["CPU"] else "gpu"
        gpu = f" and {need['gpu']:g} GPU" if need["gpu"] else ""
        if _connection.local:
            errors.append(f"models.{name}.{key}: one trial needs {need['cpu']:g} CPU{gpu}, but this machine offers Ray "
                          f"{most['CPU']:g} CPU and {most['GPU']:g} GPU; lower models.{name}.{key}, or run the study "
                          f"on a cluster that has such nodes (ray job submit, or tune-app run --address)")
        else:
            print(f"warning: no node of this Ray cluster has {need['cpu']:g} CPU{gpu} for one trial of {name}; its "
                  f"trials wait until such a node joins (an autoscaler adds it), or lower models.{name}.cpu/gpu",
                  flush=True)
    if errors:
        raise ConfigError(errors)


PROBE_TIMEOUT_S = 120
"""How long a question asked of every node (does it see output_dir, how large are its GPUs) waits for the answers:
a node may first set up the job's runtime env."""


def _on_each_node(function, node_ids: list[str], *args) -> tuple[dict[str, Any], set[str]]:
    """`function(*args)` run on each node, as a task holding no resources pinned there: (node -> its answer, the
    nodes that died meanwhile). A node that gives no answer within PROBE_TIMEOUT_S is in neither; its task is
    cancelled."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(function)
    pending = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(*args):
               node_id for node_id in node_ids}
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S) if pending else ([], [])
    answers, died = {}, set()
    for ref in done:
        try:
            answers[pending[ref]] = ray.get(ref)
        except ray.exceptions.RayError:  # the node died meanwhile (or its worker did)
            died.add(pending[ref])
    for ref in late:
        ray.cancel(ref, force=True)
    return answers, died


def can_hold(offered: dict[str, float], resources: dict[str, dict[str, float]]) -> bool:
    """Whether a node offering `offered` (its Ray resources) can run one trial of some model in `resources`."""
    return any(offered.get("CPU", 0) >= need["cpu"] and offered.get("GPU", 0) >= need["gpu"]
               for need in resources.values())


def check_storage_reachable(output_dir: str, resources: dict[str, dict[str, float]]) -> None:
    """On a cluster, each trial's checkpoints are written by the node that runs it, into output_dir: a local
    output_dir must be a folder that every node able to run a trial sees (a shared filesystem mounted at the same
    path), or trials train an epoch and then fail at their first checkpoint. A marker file written here is looked
    for from each of those nodes; ConfigError naming the nodes that do not see it, and the fix. Where no node can
    run a trial yet (they wait for an autoscaler's nodes), nothing can be asked: refused too, unless written as a
    file:// URI (the user's word that the folder is shared). No-op for a URI and where the trials run on this
    machine alone. The marker goes again, and so does any folder this check made. `resources`: each model's trial
    resources."""
    import ray

    if is_uri(output_dir):
        return
    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    holding = [node_id for node_id, n in nodes.items() if can_hold(n.get("Resources", {}), resources)]
    if holding == [ray.get_runtime_context().get_node_id()] and len(nodes) == 1:
        return  # one machine: what the driver sees, its trials see
    root = Path(output_dir).expanduser().resolve()
    if not holding:
        raise ConfigError([f"output_dir: {str(root)!r} is a local folder, but no node of this cluster can run a "
                           f"trial yet (its trials wait for nodes to join, as an autoscaler's), so none can be asked "
                           f"whether it sees the folder; give output_dir as a URI every node reaches "
                           f"(s3://bucket/prefix, gs://bucket/prefix), or, for one shared filesystem mounted there "
                           f"on every node, as file://{root}"])
    made = [folder for folder in (root, *root.parents) if not folder.exists()]
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".tune_app-reach-{uuid.uuid4().hex}"
    marker.write_text("written by a tune_app driver to learn which Ray nodes see this folder; removed at once\n")
    try:
        seen, died = _on_each_node(os.path.exists, holding, str(marker))
    finally:
        marker.unlink(missing_ok=True)
    blind = [node_id for node_id in holding if node_id not in died and not seen.get(node_id)]
    if not blind:
        return
    for folder in made:  # deepest first: only what this check created, and only while empty
        try:
            folder.rmdir()
        except OSError:
            break
    shown = "; ".join(f"{nodes[node_id].get('NodeManagerAddress', '?')} (node {node_id[:8]}"
                      f"{'' if node_id in seen else f', no answer within {PROBE_TIMEOUT_S} s'})" for node_id in blind)
    raise ConfigError([f"output_dir: {str(root)!r} is a folder that {len(blind)} of this cluster's {len(holding)} "
                       f"node(s) able to run trials cannot see ({shown}), and each trial writes its checkpoints "
                       f"from the node that runs it; give output_dir as a URI every node reaches "
                       f"(s3://bucket/prefix, gs://bucket/prefix), or mount one shared filesystem (NFS, EFS, ...) at "
                       f"{root} on every node"])


@dataclass(frozen=True)
class GpuMemory:
    """The GPU memory `gpu: auto` plans trials for, and where that figure comes from."""

    bytes: int
    basis: str

    def describe(self) -> str:
        return f"{self.bytes / 1e9:.1f} GB per GPU ({self.basis})"


def planned_gpu_memory() -> GpuMemory:
    """TUNE_APP_GPU_MEMORY_GB; else the smallest GPU of the cluster's alive GPU nodes, as nvidia-smi reads it on
    each (a task holding no resources, pinned to the node: it opens no CUDA context there; nvidia-smi lists every
    GPU of the machine, also those Ray was told not to use, and a whole card under MIG); else what this machine
    says (resources.gpu_memory_bytes: its nvidia-smi, torch, then the 80 GB default), said to be a guess. Trials
    land on any GPU node: the smallest GPU is what each must fit."""
    import ray

    from tune_app.study.resources import GPU_MEMORY_ENV, gpu_memory_bytes, nvidia_smi_memory

    if os.environ.get(GPU_MEMORY_ENV):
        return GpuMemory(gpu_memory_bytes(), f"{GPU_MEMORY_ENV}={os.environ[GPU_MEMORY_ENV]}")
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    answers, _ = _on_each_node(nvidia_smi_memory, nodes)
    found = [memory for memory in answers.values() if memory is not None]
    if found:
        told = f"{len(found)} of {len(nodes)}" if len(found) < len(nodes) else f"{len(nodes)}"
        return GpuMemory(min(found), f"the smallest GPU on the cluster's GPU nodes, read by nvidia-smi on {told}")
    return GpuMemory(gpu_memory_bytes(), f"a guess: no GPU node told its GPUs' memory (no nvidia-smi there, or no "
                                         f"answer); set {GPU_MEMORY_ENV} to the memory of the GPUs trials run on")


def connect_ray(address: str | None = None, *, setup_hook=None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, which `ray job submit` sets for its driver); otherwise
    start a local Ray with this machine's CPUs/GPUs and no dashboard. `setup_hook`: a callable every worker runs
    as it starts (Ray's worker_process_setup_hook; the benchmark's GPU memory cap)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env: dict = {"env_vars": trial_env_vars()}
    if setup_hook is not None:
        runtime_env["worker_process_setup_hook"] = setup_hook
    _connection.joined = True
    # Adapter checkpoints are small: Tune's warning about frequent experiment snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False, runtime_env=runtime_env)
        _connection.local = True


def nodes_may_join() -> bool:
    """Whether nodes may join this study's Ray after it started: not where this process started a Ray of its own
    on this machine (`connect_ray` without an address; a node someone joins to it by hand trains its trials
    unpacked); on a cluster, or a Ray its caller initialised, they may."""
    return not _connection.local


def disconnect_ray() -> None:
    """Leave Ray once the study is over, if this process joined it: the driver stops listening to worker logs
    before the cluster reaps the trial workers, so their shutdown noise (SIGTERM tracebacks) never reaches the
    user's terminal. A caller's own Ray (a notebook, the test session) is left alone."""
    if _connection.joined:
        import ray

        ray.shutdown()
        _connection.joined = _connection.local = False


def warn_if_lost_in_job(cfg: StudyConfig) -> None:
    """A job's working dir is a temporary copy on the head node: a relative output_dir would end up there."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ and not is_uri(cfg.output_dir) \
            and not os.path.isabs(os.path.expanduser(cfg.output_dir)):
        print(f"warning: output_dir {cfg.output_dir!r} is relative, so inside this Ray job it lands in the job's "
              f"temporary working-dir copy ({os.getcwd()}); pass output_dir=/abs/path or a URI (s3://...) to keep "
              f"the results", flush=True)
