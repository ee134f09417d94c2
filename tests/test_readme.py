"""README.md stays true: its YAML reference is the one the code generates, its commands name real files."""

from __future__ import annotations

import re

from tests.conftest import REPO
from tune_app.spec.config import reference_markdown


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_reference_matches_the_config_dataclasses():
    block = re.search(r"<!-- keys:start -->\n(.*?)\n<!-- keys:end -->", _readme(), re.S)
    assert block, "README.md lost its <!-- keys:start --> ... <!-- keys:end --> block"
    assert block.group(1).strip() == reference_markdown().strip(), (
        "README.md's YAML reference is stale: replace the block with the output of `tune-app keys`")


def test_readme_names_shipped_files_that_exist():
    for path in set(re.findall(r"search_spaces/[\w.-]+\.yaml", _readme())):
        assert (REPO / path).is_file(), f"README.md names {path}, which does not exist"


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q" in _readme() and "python -m pytest -q" in ci
