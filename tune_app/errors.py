"""The exception types the command line maps to exit codes, in one place that every layer may import.

Each is bad input, exit 2 with its message (cli.main); anything else that escapes a verb is a failure.
"""

from __future__ import annotations


class ConfigError(Exception):
    """Every problem found in a study configuration, each naming its dotted path."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))

    def __str__(self) -> str:
        lines = "\n".join(f"  - {e}" for e in self.errors)
        return f"Config is not well-formed, found the following errors:\n{lines}"


class DataError(Exception):
    """A data problem found after validation (for example while loading a Hub dataset)."""


class UnknownFamilyError(ValueError):
    """A checkpoint whose model_type is not in FAMILIES and no explicit target_modules."""


class UsageError(Exception):
    """Bad input found by a command (not by the config validator): exit 2 with this message."""


class ReportError(Exception):
    """The run directory cannot be reported on (no summary.json, unreadable trials.csv)."""


def first_line(error: BaseException) -> str:
    """What a message quotes of a library's error: its first line (Hub errors run to paragraphs), else its class."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
