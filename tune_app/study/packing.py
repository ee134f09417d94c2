"""Adapter packing on the cluster (tune.pack): which models' trials share one base per device, and the packs.

For a packed model the driver starts one pack actor per GPU of every node (per node on a cluster without GPUs),
named after the study, the model, the node and the device, holding no Ray resources of its own: the trials placed
on that device hold them (their GPU share and cores, as unpacked trials do), and the pack uses them in their stead.
Each trial stays an ordinary Ray Tune trial, proposed by TPE and stopped by ASHA; it joins the pack on the device
Ray gave it (`tune_app.train.trainable.train_in_pack`) and reports what the pack sends it.

Packs are started by the driver, never by a trial: an actor dies with the process that made it. A node that joins
later (an autoscaler's worker, one replacing a lost node) gets its packs from the study's pack registry, an actor
of the driver's on the driver's node, when the first packed trial Ray places there asks for one. A Ray that the
driver started on its own machine gains no nodes: it gets no registry (a process less while the study starts).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from tune_app.spec.config import StudyConfig
from tune_app.study.cluster import can_hold, nodes_may_join


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
    1/N) or, on a cluster without GPUs, as many as a node's cores hold (N while no node can hold a trial yet)."""
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
            # No node can hold a trial yet (they join later, as an autoscaler's): N, as asked.
            per_node = int(cpus_per_node // max(need["cpu"], 1)) if cpus_per_node >= need["cpu"] else setting
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


REGISTRY_SUFFIX = "registry"
"""The pack registry's actor name is the study's pack prefix and this: `tune_app-pack-<study>-registry`."""


def start(ctx, plans: dict[str, PackPlan], resources: dict[str, dict[str, float]]) -> list[Any]:
    """One pack actor per packed model and device of every alive node that can hold one of its trials, and, where
    nodes may join later, the study's pack registry, which starts their packs; sets ctx.packs (model -> the packs'
    name prefix) and ctx.pack_registry (None without one). Returns the actor handles (the driver keeps them)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not plans:
        return []
    study = f"tune_app-pack-{uuid.uuid4().hex[:8]}"
    for model in plans:
        ctx.packs[model] = f"{study}-{model}"
    handles = []
    if nodes_may_join():
        ctx.pack_registry = f"{study}-{REGISTRY_SUFFIX}"
        # On the driver's node, as the driver's: the packs it starts live as long as it does, which is the study.
        handles.append(ray.remote(PackRegistry).options(
            name=ctx.pack_registry, num_cpus=0, max_concurrency=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(ctx, plans, resources))
    for model, p in plans.items():
        for node in (n for n in ray.nodes() if n.get("Alive")):
            handles += _start_packs(ctx, model, p, resources[model], node)
    return handles


def _devices(node: dict, p: PackPlan) -> list[str]:
    """The devices of a node that hold a pack: its GPUs by Ray id, or the node itself ('cpu')."""
    return [str(i) for i in range(int(node.get("Resources", {}).get("GPU", 0)))] if p.on_gpu else ["cpu"]


def _start_packs(ctx, model: str, p: PackPlan, need: dict[str, float], node: dict,
                 devices: list[str] | None = None) -> list[Any]:
    """The packs of `model` on `node` (on `devices`, default all of them), unless no trial of it can run there (a
    head with CPU: 0, a node without GPUs)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tune_app.train.pack import PackServer, pack_name

    offered = node.get("Resources", {})
    if not can_hold(offered, {model: need}):
        return []
    all_devices = _devices(node, p)
    threads = max(1, int(min(offered.get("CPU", 1), need["cpu"] * p.per_device) // len(all_devices)))
    server = ray.remote(PackServer)
    handles = []
    for device in devices or all_devices:
        name = pack_name(ctx.packs[model], node["NodeID"], device)
        handles.append(server.options(
            name=name, num_cpus=0, num_gpus=0, max_concurrency=256,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(ctx, model, device, threads, name))
    return handles


class PackRegistry:
    """The body of a study's pack registry actor: starts the pack of a node that joined after the study started
    (an autoscaler's worker, a node replacing a lost one) when the first packed trial Ray places there asks for it.
    Calls are taken one at a time, so a pack is started once."""

    def __init__(self, ctx, plans: dict[str, PackPlan], resources: dict[str, dict[str, float]]):
        self.ctx, self.plans, self.resources = ctx, plans, resources
        self.started: dict[str, Any] = {}
        """Pack name -> the handle of the pack this registry started last under that name (it keeps it alive)."""

    def ensure(self, model: str, node_id: str, device: str) -> str | None:
        """The name of `model`'s pack on that node's device, started now if there is none; None where there can be
        none (the node is gone, or cannot hold the model's trials)."""
        import ray

        from tune_app.train.pack import pack_name

        name = pack_name(self.ctx.packs[model], node_id, device)
        try:
            ray.get_actor(name)  # alive (one that died is no longer found by its name)
            return name
        except ValueError:
            pass
        node = next((n for n in ray.nodes() if n.get("Alive") and n["NodeID"] == node_id), None)
        if node is None or device not in _devices(node, self.plans[model]):
            return None
        started = _start_packs(self.ctx, model, self.plans[model], self.resources[model], node, [device])
        if not started:
            return None
        self.started[name] = started[0]
        print(f"[tune_app] started pack {name} on a node that joined after the study started", flush=True)
        return name
