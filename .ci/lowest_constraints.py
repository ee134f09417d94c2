"""Print pip constraints that pin each direct dependency of pyproject.toml to its lower bound (`name==X` for
`name>=X`), so that `pip install -c` builds the oldest environment the project claims to support.

torch is left out: CI installs the build on this machine's disk first. A dependency without a `>=` lower bound,
or an optional extra that names a direct dependency with another lower bound (the extras repeat ray), is an
error: exit 1, saying which.

Usage: python .ci/lowest_constraints.py [pyproject.toml] > constraints.txt   (Python 3.11+: tomllib)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

SKIP = {"torch"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?$")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bound(requirement: str) -> tuple[str, str | None]:
    """`ray[tune]>=2.48,<3` -> ("ray", "2.48"); the bound is None without a single `>=` clause."""
    match = REQUIREMENT.match(requirement)
    if not match:
        sys.exit(f"lowest_constraints: cannot read the requirement {requirement!r}")
    name, specifiers = match.groups()
    bounds = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    return normalized(name), bounds[0] if len(bounds) == 1 else None


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "pyproject.toml")
    project = tomllib.loads(path.read_text())["project"]
    pins: dict[str, str] = {}
    errors = []
    for requirement in project["dependencies"]:
        name, bound = lower_bound(requirement)
        if name in SKIP:
            continue
        if bound is None:
            errors.append(f"{requirement!r} has no single '>=' lower bound")
        else:
            pins[name] = bound
    for extra, requirements in project.get("optional-dependencies", {}).items():
        for requirement in requirements:
            name, bound = lower_bound(requirement)
            if name in pins and bound != pins[name]:
                errors.append(f"extra {extra!r}: {requirement!r} disagrees with [project].dependencies' "
                              f"lower bound {name}>={pins[name]}")
    if errors:
        sys.exit("lowest_constraints: " + path.name + ":\n  " + "\n  ".join(errors))
    print("\n".join(f"{name}=={bound}" for name, bound in pins.items()))


if __name__ == "__main__":
    main()
