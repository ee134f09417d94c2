"""Study configuration: small dataclasses, a YAML loader with `dotted.key=value` overrides, and a
validator that gathers every problem before raising once.

Nothing here imports Ray or torch, so `tune-app validate` and `tune-app show` stay fast and offline.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tune_app.errors import ConfigError
from tune_app.spec import space as space_mod
from tune_app.spec.metrics import METRICS
from tune_app.spec.paths import cannot_make_folder, is_hub_name, is_local_checkpoint, is_uri, resolve_checkpoint


def _f(default: Any, types: tuple, doc: str, *, check=None, required: bool = False):
    """A config field: its default, allowed YAML types, one doc line, and an optional value check."""
    meta = {"types": types, "doc": doc, "check": check, "required": required}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return None if v > 0 else f"must be > 0, got {v!r}"


def _at_least_one(v):
    return None if v >= 1 else f"must be >= 1, got {v!r}"


def _non_negative(v):
    return None if v >= 0 else f"must be >= 0, got {v!r}"


SEED_MAX = 2**32 - 1
"""The largest seed numpy's and Optuna's samplers take (seeds are 0 to 2**32 - 1)."""


def _seed(v):
    return None if 0 <= v <= SEED_MAX else f"must be between 0 and {SEED_MAX}, got {v!r}"


def _one_of(*allowed):
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}, got {v!r}"


WEIGHT_DTYPES = ("auto", "bf16", "fp16", "fp32")
"""models.<m>.dtype: the frozen base weights' dtype (auto: train.precision.weights_dtype decides)."""


def _switch(v):
    return None if v in (True, False, "auto") else f"must be true, false or 'auto', got {v!r}"


def _fraction(v):
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v!r}"


def _pack(v):
    if v is False or v in ("off", "auto") or (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
        return None  # YAML reads a bare `off` as false
    return f"must be off, auto or a number of trials per pack (2 or more), got {v!r}"


def _storage(v):
    if re.match(r"^[a-z][a-z0-9+]*://", v):
        return None
    return f"must be an Optuna storage URL such as sqlite:///studies.db or postgresql://user@host/db, got {v!r}"


def _gpu(v):
    if v == "auto":
        return None
    if isinstance(v, str):
        return f"must be a number (fraction of one GPU, or whole GPUs) or 'auto', got {v!r}"
    if v < 0 or (v > 1 and not float(v).is_integer()):
        return f"must be 0, a fraction in (0, 1], a whole number of GPUs, or 'auto', got {v!r}"
    return None


@dataclass
class AshaConfig:
    enabled: bool = _f(True, (bool,), "stop weak trials early with ASHA")
    grace_period: int = _f(1, (int,), "epochs every trial runs before it can be stopped", check=_at_least_one)
    reduction_factor: int = _f(3, (int,), "keep 1/rf of trials at each rung (rungs at grace x rf^k epochs)",
                               check=lambda v: None if v >= 2 else f"must be >= 2, got {v!r}")


@dataclass
class ConfirmConfig:
    top: int = _f(0, (int,), "after the search, train each model's `top` best configurations again with other "
                  "seeds; the winner is the best mean (0: no confirmation)", check=_non_negative)
    seeds: int = _f(3, (int,), "seeds per confirmed configuration: train.seed + 1, + 2, ... (at least 2, for a "
                    "mean and an interval)", check=lambda v: None if v >= 2 else f"must be >= 2, got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.top > 0


@dataclass
class DataConfig:
    source: str = _f(None, (str,), "a Hub dataset name, or a local .csv/.json/.jsonl/.parquet path", required=True)
    text: str = _f("text", (str,), "text column")
    label: str = _f("label", (str,), "label column")
    validation: str | None = _f(None, (str,), "local file, or a split of the Hub data.source (e.g. test); "
                                "null: split off val_size")
    val_size: float = _f(0.2, (float,), "held-out fraction when there is no validation split", check=_fraction)
    split_seed: int = _f(42, (int,), "seed of the train/validation split and of `limit`'s shuffle", check=_seed)
    stratify: bool = _f(True, (bool,), "split off val_size stratified by label: each class in both splits, in its "
                        "share (false: a plain seeded shuffle, as the reference blog split)")
    limit: int | None = _f(None, (int,), "use only N rows (seeded shuffle first): smoke runs", check=_at_least_one)
    max_length: int = _f(512, (int,), "truncate texts to this many tokens", check=_at_least_one)
    positive_label: str | int | None = _f(None, (str, int), "two classes: the label that F1, precision and recall "
                                          "score (class id 1); null: the second of the sorted labels")


@dataclass
class ModelConfig:
    checkpoint: str = _f(None, (str,), "Hub name, local folder, or package:<python package shipping a model>",
                         required=True)
    gpu: float | str = _f(1, (float, str), "GPU share per trial: fraction, whole GPUs, or auto", check=_gpu)
    cpu: int = _f(1, (int,), "CPU cores per trial (torch threads on CPU)", check=_at_least_one)
    num_samples: int | None = _f(None, (int,), "trials for this model (default: tune.num_samples)",
                                 check=_at_least_one)
    space: dict = _f({}, (dict,), "search-space overrides for this model only")
    target_modules: list | None = _f(None, (list,), "explicit LoRA target module names (overrides the family preset)")
    dtype: str = _f("auto", (str,), "weights dtype: auto | bf16 | fp16 | fp32",
                    check=_one_of(*WEIGHT_DTYPES))
    trust_remote_code: bool = _f(False, (bool,), "allow model code from the Hub (only for checkpoints you trust)")
    revision: str | None = _f(None, (str,), "Hub revision (branch, tag or commit)")


@dataclass
class TrainConfig:
    epochs: int = _f(3, (int,), "epochs per trial (ASHA's max_t)", check=_at_least_one)
    batch_size: int = _f(8, (int,), "default effective batch size (space.batch_size overrides)", check=_at_least_one)
    eval_batch_size: int = _f(64, (int,), "rows of the widest validation batch on a GPU (at least 4 x batch_size; "
                              "8 on a CPU); shorter rows go more to a batch, up to as many tokens",
                              check=_at_least_one)
    weighted_loss: bool = _f(True, (bool,), "cross-entropy weighted by inverse class frequency of the train split")
    seed: int = _f(0, (int,), "seed of model init, data order and dropout", check=_seed)
    precision: str = _f("auto", (str,), "auto (bf16 autocast on GPUs that support it, else fp16) | bf16 | fp16 "
                        "(with loss scaling) | fp32", check=_one_of("auto", "bf16", "fp16", "fp32"))
    compile: str | bool = _f("auto", (bool, str), "torch.compile: auto (eager until compiling pays off, see "
                             "benchmarks/) | true (per block) | false", check=_switch)
    cuda_graphs: str | bool = _f("auto", (bool, str), "replay each padding bucket's forward+backward as one CUDA "
                                 "graph: auto or true (on GPUs, not with compile or fp16; a model that cannot be "
                                 "captured trains eagerly) | false", check=_switch)


@dataclass
class TuneSettings:
    num_samples: int = _f(10, (int,), "trials per model", check=_at_least_one)
    metric: str = _f("f1", (str,), f"metric to optimise: {' | '.join(METRICS)}", check=_one_of(*METRICS))
    mode: str = _f("max", (str,), "max | min", check=_one_of("max", "min"))
    seed: int = _f(0, (int,), "TPE sampler seed: same seed, same proposals", check=_seed)
    n_startup_trials: int | None = _f(None, (int,), "random trials before TPE models the results "
                                      "(default: min(10, num_samples // 3), at least 1)", check=_at_least_one)
    max_concurrent: int | None = _f(None, (int,), "cap on trials running at once (default: as resources allow)",
                                    check=_at_least_one)
    max_failures: int = _f(1, (int,), "retries of a trial that raised", check=_non_negative)
    keep_checkpoints: int = _f(1, (int,), "adapter checkpoints kept per trial (the best)", check=_at_least_one)
    reuse_actors: bool = _f(True, (bool,), "run the next trial in a finished trial's worker process (same resources): "
                            "no process start or imports per trial")
    pack: str | int = _f("off", (str, int, bool), "adapter packing: trials of a model that share a GPU train in one "
                         "process over one copy of its base: off | auto (where trials share a GPU) | N (N trials per "
                         "GPU; on CPU-only clusters, up to N per node)", check=_pack)
    asha: AshaConfig = _f(None, (dict,), "ASHA early stopping")
    confirm: ConfirmConfig = _f(None, (dict,), "confirmation: the best configurations retrained with other seeds")
    storage: str | None = _f(None, (str,), "Optuna storage URL of each model's study (sqlite:///path.db, "
                             "postgresql://user@host/db, ...); null: optuna.db in the run directory (a remote "
                             "run directory: in memory)", check=_storage)
    warm_start: str | None = _f(None, (str,), "an earlier run directory (its optuna.db) or an Optuna storage URL: "
                                "each model's TPE starts from that model's earlier trials, its best configurations "
                                "proposed first")


@dataclass
class WandbConfig:
    mode: str = _f("offline", (str,), "offline | online | disabled", check=_one_of("offline", "online", "disabled"))
    project: str = _f("tune-app", (str,), "W&B project")
    entity: str | None = _f(None, (str,), "W&B entity (team or user)")


@dataclass
class StudyConfig:
    name: str = _f(None, (str,), "study name: run directories are <output_dir>/<name>-<timestamp>", required=True)
    data: DataConfig = _f(None, (dict,), "data set and split")
    models: dict = _f(None, (dict,), "models to tune, by name; each with its own trials", required=True)
    space: dict = _f({}, (dict,), "hyperparameters: scalars are fixed, {choice|uniform|loguniform|int: ...} searched")
    train: TrainConfig = _f(None, (dict,), "training settings shared by all trials")
    tune: TuneSettings = _f(None, (dict,), "search and early stopping")
    output_dir: str = _f("runs", (str,), "where run directories are made (local path or URI)")
    wandb: WandbConfig = _f(None, (dict,), "Weights & Biases logging")

    raw: dict = field(default_factory=dict, repr=False, compare=False)
    """The merged YAML this config was built from (for best_config.yaml and `show`)."""

    def model_space(self, model: str) -> dict[str, Any]:
        """Every hyperparameter for one model: defaults < train.batch_size < space < models.<name>.space. A model
        with its own target_modules list has no preset (None): the list replaces it, so nothing searches it."""
        params = space_mod.merge({"batch_size": self.train.batch_size}, self.space, self.models[model].space)
        if self.models[model].target_modules:
            params["target_modules"] = None
        return params

    def model_samples(self, model: str) -> int:
        n = self.models[model].num_samples
        return n if n is not None else self.tune.num_samples

    @property
    def planned_trials(self) -> int:
        """Trials of the whole study: every model's num_samples."""
        return sum(self.model_samples(m) for m in self.models)


_NESTED = {"data": DataConfig, "train": TrainConfig, "tune": TuneSettings, "wandb": WandbConfig,
           "asha": AshaConfig, "confirm": ConfirmConfig}


def _type_ok(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and (int in types or float in types):
        return True
    return isinstance(value, types)


def _type_name(types: tuple) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    return " or ".join(names[t] for t in types)


def _build(cls, raw: Any, path: str, errors: list[str]):
    """Build dataclass `cls` from a mapping, appending every problem to `errors`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path or '<top level>'}: must be a mapping, got {raw!r}")
        raw = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "raw"}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            errors.append(f"{where}: unknown key; allowed keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        nested = _NESTED.get(name)
        if name in raw and raw[name] is not None:
            value = raw[name]
            if nested and f.metadata["types"] == (dict,):
                values[name] = _build(nested, value, where, errors)
                continue
            if not _type_ok(value, f.metadata["types"]):
                errors.append(f"{where}: must be {_type_name(f.metadata['types'])}, got {value!r}")
                continue
            check = f.metadata["check"]
            if check and (why := check(value)):
                errors.append(f"{where}: {why}")
                continue
            values[name] = float(value) if f.metadata["types"] == (float,) else value
        elif nested and f.metadata["types"] == (dict,):
            values[name] = _build(nested, {}, where, errors)
        elif f.metadata["required"]:
            errors.append(f"{where}: required; {f.metadata['doc']}")
    try:
        return cls(**values)
    except TypeError:  # a required field missing: already reported
        return None


def _check_space(space: Any, path: str, errors: list[str]) -> dict:
    if not isinstance(space, dict):
        errors.append(f"{path}: must be a mapping of hyperparameter: value, got {space!r}")
        return {}
    for name, value in space.items():
        if name not in space_mod.HYPERPARAMETERS:
            errors.append(f"{path}.{name}: unknown hyperparameter; known: "
                          f"{', '.join(space_mod.HYPERPARAMETERS)}")
            continue
        for why in space_mod.check_value(name, value):
            errors.append(f"{path}.{name}: {why}")
    return space


def _check_checkpoint(checkpoint: str, path: str, errors: list[str], target_modules: list | None = None) -> None:
    try:
        resolved = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        errors.append(f"{path}: {e}")
        return
    if is_local_checkpoint(checkpoint):
        if not Path(resolved).is_dir():
            errors.append(f"{path}: local model folder {checkpoint!r} does not exist")
        elif not (Path(resolved) / "config.json").is_file():
            errors.append(f"{path}: {checkpoint!r} is not a model folder (no config.json inside)")
        else:
            if missing := missing_model_files(Path(resolved)):
                errors.append(f"{path}: model folder {resolved!r} has a config.json but no "
                              f"{' and no '.join(missing)}; every trial would fail loading it: save the whole model "
                              f"there (model.save_pretrained and tokenizer.save_pretrained)")
            if target_modules is None:  # the model family must be known (Hub checkpoints: checked before Ray)
                from tune_app.spec.families import local_family_problem

                if why := local_family_problem(resolved, path.rsplit(".", 1)[0]):
                    errors.append(f"{path}: {why}")
    elif not is_hub_name(resolved):
        errors.append(f"{path}: {checkpoint!r} is neither an existing local folder nor a Hub name like "
                      f"'org/model'")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""A local model folder holds one of these (or another *.safetensors file): the weights transformers loads."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
"""A local model folder holds one of these (or another *.model sentencepiece file): what its tokenizer loads."""


def missing_model_files(folder: Path) -> list[str]:
    """What a local model folder with a config.json lacks of what a trial loads: weights, a tokenizer."""
    missing = []
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        missing.append(f"weights ({', '.join(WEIGHT_FILES[::2])} or their .index.json)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.model")):
        missing.append(f"tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return missing


def parse_overrides(overrides: list[str], errors: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` strings -> (path, YAML-typed value)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"override {item!r}: expected dotted.key=value (for example tune.num_samples=4)")
            continue
        if not text.strip():  # `key=$UNSET`: the shell dropped the value; null would silently restore the default
            errors.append(f"override {item!r}: empty value; write {key}=null to unset it, or give a value")
            continue
        try:
            value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            why = getattr(e, "problem", None) if isinstance(e, yaml.constructor.ConstructorError) else None
            errors.append(f"override {item!r}: value is not valid YAML ({why or e.__class__.__name__})")
            continue
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str], errors: list[str]) -> dict:
    merged = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides, errors):
        node = merged
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                errors.append(f"override {'.'.join(keys)}: {'.'.join(keys[:i + 1])} is {child!r}, not a mapping")
                break
            node = child
        else:
            node[keys[-1]] = value
    return merged


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error (YAML keeps the last silently,
    which drops a whole `space:` or model entry written above it)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written beside it override it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); keep "
                    f"one: the second would silently replace the first", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike, errors: list[str]) -> dict:
    p = Path(path)
    if p.is_dir():
        errors.append(f"{path}: is a folder; pass a study YAML file (see search_spaces/)")
        return {}
    if not p.is_file():
        errors.append(f"{path}: no such file")
        return {}
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except (OSError, UnicodeDecodeError) as e:
        errors.append(f"{path}: cannot read ({e})")
        return {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        errors.append(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}")
        return {}
    if raw is None:
        errors.append(f"{path}: is empty; a study YAML needs at least name, data.source and models (see "
                      f"search_spaces/)")
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: a study YAML must be a mapping at the top level, got {type(raw).__name__}")
        return {}
    return raw


def from_dict(raw: dict, errors: list[str]) -> StudyConfig | None:
    """Build and check a StudyConfig; problems go to `errors`."""
    cfg = _build(StudyConfig, raw, "", errors)
    models_raw = raw.get("models")
    models: dict[str, ModelConfig] = {}
    if isinstance(models_raw, dict):
        if not models_raw:
            errors.append("models: needs at least one model, e.g. models: {roberta: {checkpoint: roberta-large}}")
        for name, spec in models_raw.items():
            if not isinstance(name, str) or not re.match(r"^[\w.-]+$", name):
                errors.append(f"models.{name}: model names use letters, digits, '.', '_' and '-' only")
            if isinstance(spec, str):  # shorthand: `name: checkpoint`
                spec = {"checkpoint": spec}
            model = _build(ModelConfig, spec, f"models.{name}", errors)
            if model is None:
                continue
            _check_space(model.space, f"models.{name}.space", errors)
            if model.checkpoint is not None:
                _check_checkpoint(model.checkpoint, f"models.{name}.checkpoint", errors, model.target_modules)
            if model.target_modules is not None and (
                    not model.target_modules or not all(isinstance(m, str) for m in model.target_modules)):
                errors.append(f"models.{name}.target_modules: must be a non-empty list of module names, "
                              f"got {model.target_modules!r}")
            models[name] = model
    # A non-mapping `models` is already reported by _build (once is enough).
    if cfg is None:
        return None
    cfg.models = models
    if isinstance(cfg.name, str) and (why := _name_problem(cfg.name)):
        shown = repr(cfg.name) if len(cfg.name) <= 60 else f"{cfg.name[:40]!r}... ({len(cfg.name)} characters)"
        errors.append(f"name: {shown} names the run directories (<output_dir>/<name>-<timestamp>): {why}")
    if cfg.data is not None and cfg.data.text == cfg.data.label:
        errors.append(f"data.label: {cfg.data.label!r} is also data.text: the label would leak into the model's "
                      f"input; name the label column in data.label and the text column in data.text")
    _check_space(cfg.space, "space", errors)
    _check_alpha_ratio(cfg, errors)
    if cfg.train.cuda_graphs is True and (cfg.train.compile is True or cfg.train.precision == "fp16"):
        clash = "train.compile: true" if cfg.train.compile is True else "train.precision: fp16 (its loss scaling)"
        errors.append(f"train.cuda_graphs: true cannot go with {clash}; set train.cuda_graphs to auto or false")
    if cfg.tune.metric == "eval_loss" and cfg.tune.mode != "min":
        errors.append("tune.mode: eval_loss is minimised; set tune.mode=min")
    if cfg.tune.asha.grace_period > cfg.train.epochs:
        errors.append(f"tune.asha.grace_period: must be <= train.epochs ({cfg.train.epochs}), "
                      f"got {cfg.tune.asha.grace_period}")
    if cfg.tune.pack is False:  # `pack: off` unquoted
        cfg.tune.pack = "off"
    cfg.raw = raw
    return cfg


NAME_MAX = 200
"""Longest study name: the run directory adds -<timestamp>, and file systems allow 255 bytes per name."""


def _name_problem(name: str) -> str | None:
    """Why a study name cannot be one folder name (the run directory's), or None."""
    if not name.strip() or any(sep in name for sep in "/\\"):
        return "make it one folder name, not empty and without '/' or '\\'"
    if name in (".", ".."):
        return "'.' and '..' are not folder names; choose a name with letters or digits"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds control characters (a newline, tab or NUL); use printable characters only"
    if len(name.encode("utf-8")) > NAME_MAX:
        return f"{len(name.encode('utf-8'))} bytes is too long for a folder name; use at most {NAME_MAX}"
    return None


def _check_alpha_ratio(cfg: StudyConfig, errors: list[str]) -> None:
    """A searched lora_alpha beside a lora_alpha_ratio: the ratio sets alpha, so TPE would search a knob that does
    nothing."""
    if not isinstance(cfg.space, dict) or not all(isinstance(m.space, dict) for m in cfg.models.values()):
        return  # already reported
    for name, model in cfg.models.items():
        params = cfg.model_space(name)
        if not space_mod.alpha_from_ratio(params) or not space_mod.is_distribution(params["lora_alpha"]):
            continue
        alpha, ratio = (f"models.{name}.space.{key}" if key in model.space else f"space.{key}"
                        for key in ("lora_alpha", "lora_alpha_ratio"))
        message = (f"{alpha}: searched, but {ratio} is set and replaces it (lora_alpha = ratio x lora_rank), so "
                   f"this search would change nothing: search {ratio} instead, or set {ratio}=null to search "
                   f"lora_alpha")
        if message not in errors:
            errors.append(message)


def notes(cfg: StudyConfig) -> list[str]:
    """Settings that are allowed but seldom meant, one line each (validate, show and run print them)."""
    found = []
    startup = cfg.tune.n_startup_trials
    for name in cfg.models:
        n = cfg.model_samples(name)
        if startup is not None and startup >= n >= 2 and space_mod.searched(cfg.model_space(name)):
            found.append(f"tune.n_startup_trials={startup} >= the {n} trial(s) of model {name}: each is a random "
                         f"draw and TPE never proposes one (a random search); set it below {n} for a Bayesian "
                         f"search")
    return found


RUN_DEFAULTS = {("data", "stratify"): False}
"""Keys whose default changed after runs were made: a run's study.yaml that lacks one was run with this value
(before data.stratify, every split was a plain seeded shuffle). New runs write these keys out (save_study)."""


def load(path: str | os.PathLike, overrides: list[str] = (), *, check_data: bool = True,
         check_wandb: bool = False, check_outputs: bool = False, of_run: bool = False) -> StudyConfig:
    """Read, merge overrides, validate everything (data files too; with check_wandb, what W&B logging needs on
    this machine; with check_outputs, that output_dir can be written here: only for what runs a study, not for
    reading a finished run's study.yaml elsewhere) and raise one ConfigError listing all problems. `of_run`: the
    file is a run's study.yaml, whose missing RUN_DEFAULTS keys mean what that run ran with."""
    errors: list[str] = []
    raw = read_yaml(path, errors)
    readable = not errors
    if readable and of_run and isinstance(raw, dict):
        for (section, key), value in RUN_DEFAULTS.items():
            if isinstance(raw.get(section), dict):
                raw[section].setdefault(key, value)
    if readable:
        raw = apply_overrides(raw, list(overrides), errors)
    # Checked even when empty (`{}`), so that its missing required keys are reported with any override errors.
    cfg = from_dict(raw, errors) if readable else None
    if cfg is not None and check_data and not any(e.startswith("data.") for e in errors):
        from tune_app.spec import data

        errors.extend(data.check_source(cfg.data))
    if cfg is not None and check_wandb:
        from tune_app.spec.machine import wandb_problems

        errors.extend(wandb_problems(cfg.wandb.mode))
    if cfg is not None and check_outputs and isinstance(cfg.output_dir, str) and not is_uri(cfg.output_dir) \
            and (why := cannot_make_folder(cfg.output_dir)):
        errors.append(f"output_dir: {why}; run directories are made inside output_dir: name a folder (new or "
                      f"existing) this user can write in")
    if errors:
        raise ConfigError(errors)
    return cfg


def dump(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=110)


REQUIRED = object()


def reference_rows() -> list[tuple[str, Any, str]]:
    """Every YAML key with its default and doc line, from the dataclasses above (the README's reference)."""
    rows: list[tuple[str, Any, str]] = []

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if f.name == "raw":
                continue
            nested = _NESTED.get(f.name)
            if nested and f.metadata["types"] == (dict,):
                walk(nested, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, REQUIRED if f.metadata["required"] else default, f.metadata["doc"]))
            if f.name == "models" and cls is StudyConfig:
                walk(ModelConfig, "models.<name>.")

    walk(StudyConfig, "")
    rows.extend((f"space.{name}", hp.default, hp.doc) for name, hp in space_mod.HYPERPARAMETERS.items())
    return rows


def reference_markdown() -> str:
    """The YAML reference as a markdown table (`tune-app keys`; README.md holds a copy, checked by a test)."""
    def cell(value: Any) -> str:
        if value is REQUIRED:
            return "required"
        return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"

    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {cell(default)} | {doc.replace('|', '/')} |" for key, default, doc in reference_rows()]
    return "\n".join(lines)
