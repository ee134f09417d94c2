"""What this machine must offer a study before it starts: W&B's package and, online, the user's own credentials.

Nothing is imported from wandb and no server is asked; no key is ever written or printed.
"""

from __future__ import annotations

import importlib.util
import os


def cores_problems(models: dict) -> list[str]:
    """A study run on this machine alone (no cluster address): trials asking for more cores than it has would wait
    forever. One problem per model, before Ray starts (Ray's own view, which follows cgroup limits, is checked again
    once it runs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [f"models.{name}.cpu: one trial needs {model.cpu} cores, but this machine has {cores}; lower "
            f"models.{name}.cpu, or run the study on a cluster that has such nodes (ray job submit, or tune-app run "
            f"--address)" for name, model in models.items() if model.cpu > cores]


def wandb_problems(mode: str) -> list[str]:
    """W&B logging needs the wandb package on the driver's machine, and online mode the user's own API key
    (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes). Nothing is imported and no server is asked."""
    if mode == "disabled":
        return []
    if importlib.util.find_spec("wandb") is None:
        return [f"wandb.mode: {mode}, but the wandb package is not installed: pip install wandb, or set "
                f"wandb.mode=disabled"]
    if mode != "online" or os.environ.get("WANDB_API_KEY") or _wandb_login_saved():
        return []
    return ["wandb.mode: online, but this machine has no W&B API key: run `wandb login` (or set WANDB_API_KEY), "
            "or use wandb.mode=offline and upload later with `wandb sync`"]


def _wandb_login_saved() -> bool:
    """Whether `wandb login` saved a key: an entry for the W&B host in the netrc file ($NETRC or ~/.netrc)."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
