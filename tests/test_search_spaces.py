"""Every shipped search space validates (Hub names checked for form only, offline) and opens with the command
that runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tune_app.spec import config

SPACES = sorted((REPO / "search_spaces").glob("**/*.yaml"))


def test_the_documented_spaces_ship():
    names = {p.relative_to(REPO / "search_spaces").as_posix() for p in SPACES}
    assert {"disaster_tweets.yaml", "minilm_quickstart.yaml"} <= names


@pytest.mark.parametrize("path", SPACES, ids=[p.relative_to(REPO).as_posix() for p in SPACES])
def test_space_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths inside a YAML are read from where the user runs it: the repo root
    cfg = config.load(path)
    assert cfg.models and all(cfg.model_samples(m) >= 1 for m in cfg.models)


@pytest.mark.parametrize("path", SPACES, ids=[p.relative_to(REPO).as_posix() for p in SPACES])
def test_space_opens_with_its_command(path):
    """The leading comment block holds `tune-app run <this file>` (or `python -m tune_app run <this file>`)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    relative = path.relative_to(REPO).as_posix()
    command = re.compile(rf"(tune-app|python -m tune_app) run {re.escape(relative)}(\s|$)")
    assert any(command.search(line) for line in header), f"{relative}: no `tune-app run {relative}` in {header}"


def test_quickstart_validates_on_the_shared_data(tweets_csv, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config.load(REPO / "search_spaces" / "minilm_quickstart.yaml", [f"data.source={tweets_csv}"])
    assert cfg.data.source == str(tweets_csv)
    assert Path(config.resolve_checkpoint(cfg.models["minilm"].checkpoint), "config.json").is_file()


def test_the_blog_space_is_the_published_experiment():
    cfg = config.load(REPO / "search_spaces" / "disaster_tweets.yaml")
    assert cfg.data.source == "mehdiiraqui/twitter_disaster" and cfg.data.split_seed == 42
    assert [m.checkpoint for m in cfg.models.values()] == ["roberta-large", "mistralai/Mistral-7B-v0.1",
                                                           "meta-llama/Llama-2-7b-hf"]
    assert cfg.space == {"lora_rank": {"choice": [4, 8, 16, 32]}, "lora_alpha": {"choice": [16, 32, 64]},
                         "lora_dropout": {"uniform": [0.0, 0.1]}, "learning_rate": {"uniform": [1.0e-5, 2.0e-4]}}
    assert cfg.tune.num_samples == 30 and cfg.tune.metric == "f1"
