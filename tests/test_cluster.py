"""Running where users run it: a real `ray start --head` with token authentication (dashboard on loopback) and a
tiny study submitted with `ray job submit`; and cluster.yaml checked against the schema shipped inside ray.

This file never requests the in-process `ray_session` fixture: the head started here is a separate Ray (own
ports, own temp dir, own HOME for the token) whose job driver runs in a subprocess, so it also works when the
session's local Ray is already up in this pytest process. It is stopped by killing exactly its own processes:
`ray stop` would kill every Ray on the machine, the session fixture's included."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port
from tune_app.spec.rundir import BEST_CONFIG, STUDY, SUMMARY, TRIALS

RAY = Path(sys.executable).parent / "ray"


def test_cluster_yaml_matches_the_schema_inside_ray():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)

    # What the README promises about it: GPU workers that scale from zero, token auth, dashboard on loopback,
    # and a setup that installs this project with its `cluster` extra.
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] <= cluster["max_workers"] for t in workers)
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert all("RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"]) for _ in workers)
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    assert any("[cluster]" in command for command in cluster["setup_commands"])


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This machine's environment without any Ray address or auth settings, with HOME pointed at `home` (so the
    token lives in <home>/.ray/auth_token and the developer's ~/.ray is never read or written)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


@contextlib.contextmanager
def ray_head(home: Path):
    """`ray start --head --block` with token auth, in its own process group; yields the dashboard URL."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    command = [str(RAY), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
    head = subprocess.Popen(command, env=clean_env(home, RAY_AUTH_MODE="token"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers (401 without a token is an answer too)
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray head did not start:\n{head.stdout.read()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        stop_head(head, temp_dir)


def stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM then SIGKILL the head's process group, then any process of this cluster that left the group
    (workers start their own sessions): exactly those whose command line names this cluster's temp dir."""
    import psutil

    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, sig)
        try:
            head.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def job_dir(tmp_path: Path) -> Path:
    """What --working-dir uploads: just the package and the study YAML (no runs/, no .git)."""
    work = tmp_path / "job"
    shutil.copytree(REPO / "tune_app", work / "tune_app", ignore=shutil.ignore_patterns("__pycache__"))
    study = {
        "name": "job",
        "data": {"source": "set-by-override.csv", "text": "text", "label": "target", "limit": 200, "max_length": 64},
        "models": {"tiny": {"checkpoint": "set-by-override"}},
        "train": {"epochs": 1, "batch_size": 8},
        "tune": {"num_samples": 1},
        "output_dir": "runs",
        "wandb": {"mode": "disabled"},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(study))
    return work


@pytest.mark.slow
def test_ray_job_submit_with_token_auth(tmp_path, tiny_models, tweets_csv):
    if not RAY.is_file():
        pytest.skip("the `ray` command is not installed beside this Python (pip install 'tune-app[cluster]')")
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    home.mkdir()
    stranger.mkdir()
    token = subprocess.run([str(RAY), "get-auth-token", "--generate"], env=clean_env(home), capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip()
    assert token and (home / ".ray" / "auth_token").read_text().strip() == token

    work, out = job_dir(tmp_path), tmp_path / "out"
    submission = f"tune-app-{uuid.uuid4().hex[:8]}"
    entrypoint = [sys.executable, "-m", "tune_app", "run", "tiny.yaml", f"output_dir=file://{out}",
                  f"data.source={tweets_csv}", f"models.tiny.checkpoint={tiny_models('bert')}"]
    # The job's runtime env carries what trials need; HF_HUB_OFFLINE is also one of the variables tune_app
    # forwards itself (Ray refuses a driver runtime env that repeats a job's key), and the OOM injection proves
    # the variables reach the trial processes: batch 8 must end in micro-batches of 2.
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TUNE_APP_TEST_OOM_ABOVE": "2"}}

    def submit(env, *extra):
        return subprocess.run([str(RAY), "job", "submit", "--address", url, "--working-dir", str(work),
                               "--runtime-env-json", json.dumps(runtime_env), *extra, "--", *entrypoint],
                              env=env, capture_output=True, text=True, timeout=420)

    with ray_head(home) as url:
        refused = submit(clean_env(stranger))  # no token anywhere: the job server must say no
        assert refused.returncode != 0, refused.stdout
        assert "Unauthorized" in refused.stdout + refused.stderr, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert not out.exists()

        accepted = submit(clean_env(home, RAY_AUTH_MODE="token"), "--submission-id", submission)
        assert accepted.returncode == 0 and "succeeded" in accepted.stdout, \
            accepted.stdout[-4000:] + accepted.stderr[-4000:]
        logs = subprocess.run([str(RAY), "job", "logs", "--address", url, submission],
                              env=clean_env(home, RAY_AUTH_MODE="token"), capture_output=True, text=True,
                              timeout=60, check=True).stdout

    runs = list(out.glob("job-*"))
    assert len(runs) == 1, list(out.iterdir()) if out.exists() else "no output_dir"
    run_dir = runs[0]
    for name in (STUDY, SUMMARY, TRIALS, BEST_CONFIG):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["complete"] is True and summary["run_dir"] == str(run_dir)
    assert summary["models"]["tiny"]["completed"] == 1

    # The job's log ends with the same summary table a local run prints.
    tail = logs.strip().splitlines()[-30:]  # the export after the table logs the OOM injection's halvings too
    assert any(line.startswith("model  best f1") for line in tail), "\n".join(tail)
    assert f"run directory: {run_dir}" in tail, "\n".join(tail)

    (trial_dir,) = run_dir.glob("tiny_*")
    last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
    assert last["micro_batch_size"] == 2 and summary["models"]["tiny"]["best_config"]["batch_size"] == 8


def test_driver_in_a_job_leaves_the_jobs_env_vars_to_the_job(monkeypatch, capsys):
    """Inside `ray job submit`, Ray refuses a ray.init runtime env that repeats a key of the job's runtime env:
    the driver forwards only what the job does not set; a relative output_dir gets a warning."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from tune_app.spec.config import StudyConfig
    from tune_app.study.cluster import trial_env_vars, warn_if_lost_in_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert {"HF_HUB_OFFLINE", "WANDB_MODE"} <= set(trial_env_vars())
    assert trial_env_vars()["TUNE_FUNCTION_THREAD_TIMEOUT_S"] == "60"  # a reused worker waits for the last trial
    warn_if_lost_in_job(StudyConfig(name="x", output_dir="runs"))
    assert capsys.readouterr().out == ""

    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}))
    forwarded = trial_env_vars()
    assert "HF_HUB_OFFLINE" not in forwarded and forwarded["WANDB_MODE"] == "offline"
    warn_if_lost_in_job(StudyConfig(name="x", output_dir="runs"))
    assert "output_dir 'runs' is relative" in capsys.readouterr().out
    warn_if_lost_in_job(StudyConfig(name="x", output_dir="s3://bucket/runs"))
    assert capsys.readouterr().out == ""


TWO_NODES = '''
import json, shutil, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
late = sys.argv[3] == "late"
nodes = {"head": cluster.head_node.node_id}
late_node = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_later():
    """`ray start` of a worker once the study's packs are planned and started without it (its pack registry is up);
    in a thread: Cluster.add_node must run in the main thread."""
    deadline = time.monotonic() + 300
    while not (ray.is_initialized() and any(name.endswith("-registry") for name in ray.util.list_named_actors())):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    ports = [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")]
    temp = tempfile.mkdtemp(prefix="rayl", dir="/tmp")
    start = [str(Path(sys.executable).parent / "ray"), "start", f"--address={cluster.address}", "--block",
             "--num-cpus=2", "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", *ports]
    late_node.append((subprocess.Popen(start), temp))


if late:
    threading.Thread(target=join_later, daemon=True).start()
else:
    nodes["worker"] = cluster.add_node(num_cpus=2).node_id
    cluster.wait_for_nodes()
try:
    from tune_app.cli import main
    code = main(["run", sys.argv[1], "--address", cluster.address])
    Path(sys.argv[2]).write_text(json.dumps({"code": code, **nodes}))
finally:
    ray.shutdown()
    for node, temp in late_node:  # `ray start --block` ends its node's processes on SIGTERM
        node.terminate()
        node.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    cluster.shutdown()
'''
"""A head without CPUs (as cluster.yaml's) and a worker node with 2, both on this machine (Ray's Cluster helper),
there from the start or (argv[3] == 'late') joining once the study has started; runs the study given as argv[1]
from this process as its driver; argv[2] gets the exit code and the nodes' ids."""


@pytest.mark.slow
@pytest.mark.parametrize("worker", ["there", "late"])
def test_a_packed_study_on_a_two_node_cluster_packs_on_the_worker(tmp_path, tiny_models, tweets_csv, worker):
    """tune.pack on a cluster whose head holds no CPUs: both trials Ray placed on the worker train in the worker's
    one pack, also when the worker joins after the study started (as an autoscaler's does): the study's pack
    registry starts its pack for the first trial that lands there."""
    study = {
        # file://: the study cannot ask a node that is not there yet whether it sees a local folder.
        "name": "two", "output_dir": f"file://{tmp_path / 'runs'}", "wandb": {"mode": "disabled"},
        "data": {"source": str(tweets_csv), "text": "text", "label": "target", "limit": 160, "max_length": 32},
        "models": {"m": {"checkpoint": tiny_models("bert"), "cpu": 1}},
        "space": {"lora_rank": {"choice": [2, 4]}, "learning_rate": {"loguniform": [1.0e-4, 5.0e-2]}},
        "train": {"epochs": 1, "batch_size": 16},
        "tune": {"num_samples": 2, "max_concurrent": 2, "pack": 2},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    (tmp_path / "two_nodes.py").write_text(TWO_NODES)
    out = tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "two_nodes.py"), str(tmp_path / "study.yaml"), str(out),
                             worker], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        log, _ = proc.communicate(timeout=420)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the cluster's own processes are in this group too
    assert proc.returncode == 0 and out.is_file(), log[-4000:]
    nodes = json.loads(out.read_text())
    assert nodes["code"] == 0, log[-4000:]
    # The plan is made from the nodes there at the start: with none that can hold a trial, it is made for 2.
    assert "packing: m: up to 2 trials per node in one process over one base" in log, log[-4000:]
    assert "trains alone" not in log, log[-4000:]
    # Late, the worker's pack came from the study's pack registry, for the first trial Ray placed there.
    assert ("on a node that joined after the study started" in log) == (worker == "late"), log[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = [json.loads(path.read_text().splitlines()[-1]) for path in run_dir.glob("m_*/result.json")]
    assert len(results) == 2
    packs = {r["pack"] for r in results}
    pack = packs.pop()
    assert len(packs) == 0 and nodes["head"][:12] not in pack  # the worker's pack; the head has no CPU
    assert worker == "late" or nodes["worker"][:12] in pack
    assert max(r["packed_trials"] for r in results) == 2
