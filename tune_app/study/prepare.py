"""Data preparation on the driver: load and split the data once, tokenize it once per distinct tokenizer, and
check before Ray starts that every model's checkpoint loads and its LoRA targets exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tune_app.errors import ConfigError, first_line
from tune_app.spec.config import StudyConfig
from tune_app.spec.data import Splits, load_splits
from tune_app.spec.paths import hub_options, resolve_checkpoint
from tune_app.train.tokens import TokenizedData, tokenize, tokenizer_key

log = logging.getLogger("tune_app")


@dataclass
class PreparedData:
    splits: Splits
    tokenized: dict[str, TokenizedData]
    """Tokenizer key -> both splits tokenized with it."""
    model_keys: dict[str, str]
    """Model name -> tokenizer key."""


def _check_positions(name: str, checkpoint: str, hf_config, data: TokenizedData, max_length: int) -> None:
    """A row longer than the model's learned positions fails every trial's forward: ConfigError before Ray."""
    from tune_app.spec.families import position_limit

    limit = position_limit(getattr(hf_config, "model_type", None), hf_config.to_dict())
    longest = max(int(data.train.lengths.max(initial=0)), int(data.val.lengths.max(initial=0)))
    if limit is not None and longest > limit:
        raise ConfigError([f"data.max_length: {max_length} lets rows of {longest} tokens through, but model {name} "
                           f"({checkpoint}) has positions for {limit} tokens; set data.max_length={limit} or less"])


def prepare_data(cfg: StudyConfig) -> PreparedData:
    """Load and split the data once; tokenize it once per distinct tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from tune_app.spec.families import family_for
    from tune_app.train.model import unmatched_targets

    splits = load_splits(cfg.data)
    tokenized: dict[str, TokenizedData] = {}
    model_keys: dict[str, str] = {}
    for name, model in cfg.models.items():
        path = resolve_checkpoint(model.checkpoint)
        load = hub_options(model)
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
        _check_positions(name, model.checkpoint, hf_config, tokenized[key], cfg.data.max_length)
    return PreparedData(splits, tokenized, model_keys)
