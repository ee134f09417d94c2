"""Search-space syntax: the one place that knows how a YAML value becomes a fixed value or a distribution.

In a study YAML every hyperparameter is either a scalar (fixed) or a one-key mapping::

    lora_rank: {choice: [4, 8, 16, 32]}        # one of the listed values
    lora_dropout: {uniform: [0.0, 0.1]}        # float, low <= x <= high
    learning_rate: {loguniform: [1.0e-5, 5.0e-4]}  # float, log scale, low > 0
    warmup_steps: {int: [0, 100]}               # integer, both ends included

This module imports neither Ray nor torch: `validate` and `show` use it (`study.search.to_tune` turns a searched
value into Ray Tune's domain).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

MODEL_KEY = "model"
"""The key of a trial's config that names the model it trains (beside its hyperparameters)."""
SEED_KEY = "seed"
"""The key of a trial's config that sets its training seed (confirmation trials); without it, train.seed."""
CONFIRMS_KEY = "confirms"
"""The key of a confirmation trial's config that names the search trial whose configuration it trains again."""
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")

TARGET_MODULE_PRESETS = ("attention_qv", "attention", "all_linear")
"""Named LoRA target presets, resolved per model family (see `families.py`)."""


@dataclass(frozen=True)
class Hyperparameter:
    """One tunable knob of a trial."""

    default: Any
    """Value used when neither `train` nor `space` sets it."""
    check: Callable[[Any], str | None]
    """Returns why a single value is not allowed, or None."""
    doc: str
    """One line for `show` and the README."""

    @property
    def integer(self) -> bool:
        """Takes integers only (a check made by `_number(integer=True)`)."""
        return getattr(self.check, "integer", False)


def _number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, integer: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        kind = "an integer" if integer else "a number"
        if isinstance(value, str) and _float_text(value):
            # Text YAML would read as a number was written in quotes; unquoted, YAML reads 1e-5 (no dot) as text.
            if not isinstance(yaml.safe_load(value), str):
                return f"must be {kind}, got the text {value!r} (quoted, a number is text: write it without quotes)"
            if "e" in value.lower():  # an exponent (inf and nan have none)
                return f"must be {kind}, got the text {value!r} (YAML reads 1e-5 as text: write 1.0e-5)"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {kind}, got {value!r}"
        if integer and not float(value).is_integer():
            return f"must be {kind}, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value!r}"
        if low is not None and (value <= low if low_open else value < low):
            return f"must be {'>' if low_open else '>='} {low}, got {value!r}"
        if high is not None and (value >= high if high_open else value > high):
            return f"must be {'<' if high_open else '<='} {high}, got {value!r}"
        return None

    check.integer = integer
    return check


def _float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            return f"must be one of {list(allowed)}, got {value!r}"
        return None

    return check


HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "lora_rank": Hyperparameter(8, _number(1, integer=True), "LoRA rank r"),
    "lora_alpha": Hyperparameter(16, _number(0, low_open=True), "LoRA scaling alpha (scale = alpha / r)"),
    "lora_alpha_ratio": Hyperparameter(
        None, _number(0, low_open=True), "if set, lora_alpha = ratio x lora_rank (overrides lora_alpha)"),
    "lora_dropout": Hyperparameter(0.05, _number(0, 1, high_open=True), "dropout on the LoRA branch"),
    "lora_bias": Hyperparameter("none", _one_of("none", "all", "lora_only"), "which biases train"),
    "use_rslora": Hyperparameter(False, _one_of(False, True), "rank-stabilised LoRA (scale = alpha / sqrt(r))"),
    "target_modules": Hyperparameter(
        "attention_qv", _one_of(*TARGET_MODULE_PRESETS),
        "LoRA targets preset: attention_qv | attention | all_linear (per model family)"),
    "learning_rate": Hyperparameter(1e-4, _number(0, low_open=True), "AdamW peak learning rate"),
    "weight_decay": Hyperparameter(0.0, _number(0), "AdamW weight decay"),
    "warmup_ratio": Hyperparameter(0.0, _number(0, 1, high_open=True), "fraction of steps with linear warm-up"),
    "batch_size": Hyperparameter(8, _number(1, integer=True), "effective training batch size"),
    "max_grad_norm": Hyperparameter(1.0, _number(0), "gradient clipping norm (0 = off)"),
    "lr_scheduler": Hyperparameter("linear", _one_of("linear", "cosine", "constant"), "learning-rate schedule"),
}


def is_distribution(value: Any) -> bool:
    """A one-key mapping whose key names a distribution."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def check_value(name: str, value: Any) -> list[str]:
    """Problems with one `space` entry (fixed value or distribution), as messages without the path."""
    hp = HYPERPARAMETERS[name]
    if value is None and hp.default is None:  # an optional knob left unset (null), as by default
        return []
    if isinstance(value, dict):
        if not is_distribution(value):
            return [f"a distribution is a mapping with one key of {list(DISTRIBUTIONS)}, got {value!r}"]
        kind, args = next(iter(value.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                return [f"choice needs a non-empty list, got {args!r}"]
            return [f"choice value {v!r}: {why}" for v in args if (why := hp.check(v))]
        if not isinstance(args, list) or len(args) != 2:
            return [f"{kind} needs a list [low, high], got {args!r}"]
        if hp.integer and kind != "int":
            return [f"{name} takes integers, and {kind} draws fractions: use {{int: [low, high]}} (both ends "
                    f"included) or {{choice: [...]}}"]
        low, high = args
        bad = [f"{kind} bound {v!r}: {why}" for v in (low, high) if (why := hp.check(v))]
        if bad:
            return bad
        if kind == "int":
            if not all(isinstance(v, int) for v in (low, high)):
                return [f"int needs integer bounds, got [{low!r}, {high!r}]"]
            if low > high:
                return [f"int needs low <= high (both included), got (low={low}, high={high})"]
        elif low >= high:
            return [f"{kind} needs low < high, got (low={low}, high={high})"]
        if kind == "loguniform" and low <= 0:
            return [f"loguniform needs low > 0, got (low={low}, high={high})"]
        return []
    why = hp.check(value)
    return [why] if why else []


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Defaults of every hyperparameter, overridden by each layer in turn (later wins)."""
    merged = {name: hp.default for name, hp in HYPERPARAMETERS.items()}
    for layer in layers:
        merged.update(layer)
    return merged


def searched(space: dict[str, Any]) -> dict[str, Any]:
    """Only the entries that are distributions."""
    return {k: v for k, v in space.items() if is_distribution(v)}


def describe(value: Any) -> str:
    """Human-readable form of a fixed value or a distribution (for `show` and reports)."""
    if not is_distribution(value):
        return repr(value)
    kind, args = next(iter(value.items()))
    if kind == "choice":
        return "choice " + ", ".join(repr(v) for v in args)
    return f"{kind} [{args[0]}, {args[1]}]"


def alpha_from_ratio(params: dict[str, Any]) -> bool:
    """Whether lora_alpha_ratio is set, so that lora_alpha is ratio x lora_rank and any lora_alpha given is unused."""
    return params.get("lora_alpha_ratio") is not None


def with_resolved_alpha(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with lora_alpha as training uses it (ratio x rank where a ratio is set): what a trial records."""
    if not alpha_from_ratio(params):
        return params
    return {**params, "lora_alpha": resolve_alpha(params)}


def resolve_alpha(params: dict[str, Any]) -> float:
    """lora_alpha, or lora_alpha_ratio x lora_rank when a ratio is given."""
    if alpha_from_ratio(params):
        return float(params["lora_alpha_ratio"]) * int(params["lora_rank"])
    return float(params["lora_alpha"])
