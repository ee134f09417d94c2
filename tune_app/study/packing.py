"""Adapter packing on the cluster (tune.pack): which models' trials share one base per device, and the packs.

For a packed model the driver starts one pack actor per GPU of every node (per node on a cluster without GPUs),
named after the study, the model, the node and the device, holding no Ray resources of its own: the trials placed
on that device hold them (their GPU share and cores, as unpacked trials do), and the pack uses them in their stead.
Each trial stays an ordinary Ray Tune trial, proposed by TPE and stopped by ASHA; it joins the pack on the device
Ray gave it (`tune_app.train.trainable.train_in_pack`) and reports what the pack sends it.

Packs are started by the driver, never by a trial: an actor dies with the process that made it.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from tune_app.spec.config import StudyConfig


@dataclass(frozen=True)
class PackPlan:
    """How one model's trials are packed."""

    per_device: int
    """Trials that share one pack: on a GPU, 1 / the trial's GPU share; on a CPU node, its cores / the trial's."""
    on_gpu: bool

    def describe(self) -> str:
        return f"up to {self.per_device} trials per {'GPU' if self.on_gpu else 'node'} in one process over one base"


def plan(cfg: StudyConfig, resources: dict[str, dict[str, float]], cpus_per_node: float) -> dict[str, PackPlan]:
    """Model -> its packing, for the models whose trials pack under tune.pack: `off` none; `auto` those whose trials
    share a GPU (GPU share of 1/2 or less); a number N packs every model, N trials per GPU (its GPU share becomes
    1/N) or, on a cluster without GPUs, as many as a node's cores hold."""
    setting = cfg.tune.pack
    if setting == "off":
        return {}
    plans = {}
    for name, need in resources.items():
        if need["gpu"] > 0:
            per_gpu = setting if isinstance(setting, int) else int(math.floor(1 / need["gpu"] + 1e-6))
            if per_gpu >= 2:
                plans[name] = PackPlan(per_gpu, on_gpu=True)
        elif isinstance(setting, int):
            per_node = int(cpus_per_node // max(need["cpu"], 1))
            if per_node >= 2:
                plans[name] = PackPlan(min(per_node, setting), on_gpu=False)
    return plans


def apply(resources: dict[str, dict[str, float]], plans: dict[str, PackPlan]) -> dict[str, dict[str, float]]:
    """Trial resources under the plan: a packed GPU model's trials hold 1/N of a GPU each (tune.pack: N)."""
    out = {name: dict(need) for name, need in resources.items()}
    for name, p in plans.items():
        if p.on_gpu:
            out[name]["gpu"] = math.floor(10_000 / p.per_device) / 10_000
    return out


def start(ctx, plans: dict[str, PackPlan], resources: dict[str, dict[str, float]]) -> list[Any]:
    """One pack actor per packed model and device of every alive node that can hold one of its trials; sets
    ctx.packs (model -> the packs' name prefix). Returns the actor handles (the driver keeps them)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tune_app.train.pack import PackServer, pack_name

    server = ray.remote(PackServer)
    handles = []
    study = uuid.uuid4().hex[:8]
    for model, p in plans.items():
        prefix = f"tune_app-pack-{study}-{model}"
        need = resources[model]
        for node in (n for n in ray.nodes() if n.get("Alive")):
            offered = node.get("Resources", {})
            if offered.get("CPU", 0) < need["cpu"] or (p.on_gpu and offered.get("GPU", 0) < need["gpu"]):
                continue  # no trial of this model can run here (a head with CPU: 0, a node without GPUs)
            devices = [str(i) for i in range(int(offered.get("GPU", 0)))] if p.on_gpu else ["cpu"]
            threads = max(1, int(min(offered.get("CPU", 1), need["cpu"] * p.per_device) // len(devices)))
            for device in devices:
                name = pack_name(prefix, node["NodeID"], device)
                handles.append(server.options(
                    name=name, num_cpus=0, num_gpus=0, max_concurrency=256,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                ).remote(ctx, model, device, threads, name))
        ctx.packs[model] = prefix
    return handles
