"""A study on a real two-node Ray cluster on this machine, shaped like cluster.yaml's: a head with `CPU: 0` (it only
runs the driver) and a worker node that does not share the head's view of the filesystem. The worker is started in
namespaces of its own (`unshare`, as root): its own mounts, with an empty private folder mounted over the output root,
its own host name, and its own process tree, so that killing it ends the whole node at once, as a lost machine.

  1. with s3:// output (moto's S3 server on loopback) the study completes, its trials having run on the worker;
  2. with a local output_dir the worker cannot see, the study is refused before any trial starts;
  3. the worker is killed mid-trial and another joins: the trial is retried there, the study completes, and every
     trial is counted once.

Every process of these clusters is ended by its own id or process tree; `ray stop` would end every Ray here."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, one_model_study
from tests.test_cluster import RAY, clean_env, stop_head
from tests.test_resume import StudyProcess, trial_in_state
from tune_app import cli
from tune_app.spec.rundir import SUMMARY, TRIALS

pytestmark = pytest.mark.slow

HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4"}
"""The head's GCS declares a silent node dead after about 4 s (Ray's default: 30 s), so a lost node fails its
trials quickly."""


def _namespaces_work() -> str | None:
    """Why a node cannot get namespaces of its own here (not root, no unshare), or None."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1) to give the worker node its own mounts and processes"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare is not allowed here: {probe.stderr.strip()}"


def _node_ports() -> list[str]:
    """Ports of one node's services, all free: nodes on one machine must not collide (nor with the session's Ray)."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


STARTS = 3
"""Tries to start a node: a port picked free here can be taken by another process before the node binds it."""


class Cluster:
    """A head (`CPU: 0`) started here, and worker nodes each in namespaces of their own."""

    def __init__(self, home: Path, worker_env: dict[str, str]):
        self.home, self.worker_env = home, worker_env
        self.workers: dict[str, tuple[subprocess.Popen, Path]] = {}
        for _ in range(STARTS):
            self.temp = Path(tempfile.mkdtemp(prefix="rayn", dir="/tmp"))  # short: sockets have a path length limit
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.head = subprocess.Popen(
                [str(RAY), "start", "--head", "--block", "--num-cpus=0", "--num-gpus=0", "--disable-usage-stats",
                 f"--temp-dir={self.temp}", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                 "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *_node_ports()],
                env=clean_env(home, **HEALTH_CHECKS), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
            if (failed := self._wait(1)) is None:
                return
            stop_head(self.head, self.temp)
        pytest.fail(failed)

    def add_worker(self, host: str, private: Path) -> None:
        """A worker node with 2 CPUs and 1 GPU (as Ray counts them: this machine has no GPU, so trials train on the
        CPU), host name `host`, seeing an empty folder of its own at `private`."""
        for _ in range(STARTS):
            temp = Path(tempfile.mkdtemp(prefix="rayw", dir="/tmp"))
            start = [str(RAY), "start", f"--address={self.address}", "--block", "--num-cpus=2", "--num-gpus=1",
                     "--disable-usage-stats", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", *_node_ports()]
            script = f"hostname {host} && mount -t tmpfs tmpfs {private} && exec {' '.join(start)}"
            # --kill-child: when unshare dies, the node's first process gets SIGKILL, and with it every process of
            # the node's own PID namespace.
            node = subprocess.Popen(["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc",
                                     "sh", "-c", script], env={**clean_env(self.home), **self.worker_env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            self.workers[host] = (node, temp)
            if (failed := self._wait(1 + len(self.workers))) is None:
                return
            self.kill_worker(host)
        pytest.fail(failed)

    def kill_worker(self, host: str) -> None:
        node, temp = self.workers.pop(host)
        node.kill()  # unshare: its --kill-child takes the whole node down with it
        node.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)

    def alive_nodes(self) -> list[dict]:
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return [info for info in infos.values() if info.state == 0]  # GcsNodeInfo.ALIVE

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        if (failed := self._wait(count, timeout)) is not None:
            pytest.fail(failed)

    def _wait(self, count: int, timeout: float = 120) -> str | None:
        """None once `count` nodes are alive; else (a node process ended, or time ran out) what went wrong."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):  # the GCS is not up yet
                if len(self.alive_nodes()) == count:
                    return None
            dead = [p for p in (self.head, *(p for p, _ in self.workers.values())) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                return f"the cluster did not reach {count} node(s):\n" + "\n".join(p.stdout.read()[-2000:]
                                                                                  for p in dead)
            time.sleep(0.5)

    def close(self) -> None:
        for host in list(self.workers):
            self.kill_worker(host)
        stop_head(self.head, self.temp)


A10G_MIB = 23028
"""What nvidia-smi lists as the memory of cluster.yaml's worker GPU (an A10G), in MiB."""


@pytest.fixture
def cluster(tmp_path, s3_server):
    """A head and one worker (host tune-worker-1) that sees an empty folder of its own at tmp_path/runs. Workers
    have the nvidia-smi of an A10G node on their PATH (the driver has none, as cluster.yaml's head)."""
    if reason := _namespaces_work():
        pytest.skip(reason)
    home, private, tools = tmp_path / "home", tmp_path / "runs", tmp_path / "worker-bin"
    for folder in (home, private, tools):
        folder.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {A10G_MIB}\n")
    smi.chmod(0o755)
    # The worker holds the bucket's credentials as a cloud node would (its own environment or instance role); the
    # endpoint override is the driver's only: it travels with the study's storage.
    worker_env = {k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL_S3"}
    worker_env["PATH"] = f"{tools}{os.pathsep}{clean_env(home)['PATH']}"
    nodes = Cluster(home, worker_env)
    try:
        nodes.add_worker("tune-worker-1", private)
        yield nodes
    finally:
        nodes.close()


def _study(tmp_path: Path, tiny: str, source: Path, output_dir: str, **tune) -> Path:
    space = {"lora_rank": {"choice": [2, 4]}, "learning_rate": {"loguniform": [1.0e-4, 1.0e-3]}}
    study = one_model_study("nodes", tiny, source, Path("unused"), space=space, epochs=tune.pop("epochs", 2),
                            trials=2)
    study["output_dir"] = output_dir
    study["models"]["tiny"].update(cpu=1, gpu="auto")
    study["data"]["limit"] = tune.pop("limit", 200)
    study["tune"].update(tune)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _driver(cluster: Cluster, s3_server, study: Path) -> StudyProcess:
    """`tune-app run STUDY --address` the cluster. Its whole environment: this machine's without Ray's settings (a
    Ray started in this test process sets RAY_AUTH_MODE in it), the cluster's HOME, the bucket's endpoint and
    credentials."""
    return StudyProcess(["run", str(study), "--address", cluster.address], inherit=False,
                        env={**clean_env(cluster.home), **s3_server.env, "WANDB_MODE": "disabled"})


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.readall().decode("utf-8")


def _results(fs, run: str, trial_dir: str) -> list[dict]:
    return [json.loads(line) for line in _read(fs, f"{run}/{trial_dir}/result.json").splitlines()]


def _saved_iteration(fs, run: str, trial_id: str) -> int | None:
    """The last epoch of a trial in the experiment state Tune saved to the bucket last (it saves it once the trial's
    checkpoint is on record), or None while it is not there."""
    import pyarrow.fs

    states = sorted(info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
                    if info.base_name.startswith("experiment_state-"))
    try:
        found = trial_in_state(_read(fs, states[-1]), trial_id) if states else None
    except OSError:
        return None  # being replaced right now
    return found[0] if found else None


def _run_path(fs, prefix: str) -> str:
    import pyarrow.fs

    (run,) = [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(prefix))]
    return run


def test_with_s3_output_the_trials_run_on_the_worker(cluster, s3_server, tmp_path, tiny_models, tweets_csv):
    prefix = f"{s3_server.bucket}/nodes-{uuid.uuid4().hex[:8]}"
    study = _study(tmp_path, tiny_models("bert"), tweets_csv, f"s3://{prefix}", max_concurrent=2)
    with _driver(cluster, s3_server, study) as p:
        assert p.finish(timeout=400) == 0, p.output[-4000:]
    # gpu: auto planned for the worker's GPU, as its nvidia-smi reads it, not for a default: a tiny model fits
    # many trials in 22.5 GiB, but the worker's 2 CPUs hold 2 (cpu: 1 each).
    assert (f"resources per trial: tiny 1 CPU + 0.5 GPU; gpu: auto planned for {A10G_MIB * 2**20 / 1e9:.1f} GB per GPU "
            f"(the smallest GPU on the cluster's GPU nodes, read by nvidia-smi on 1)") in p.output, p.output[-4000:]
    fs = s3_server.filesystem()
    run = _run_path(fs, prefix)
    summary = json.loads(_read(fs, f"{run}/{SUMMARY}"))
    rows = list(csv.DictReader(io.StringIO(_read(fs, f"{run}/{TRIALS}"))))
    assert summary["complete"] is True and len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows), rows
    for row in rows:
        hosts = {r["hostname"] for r in _results(fs, run, f"tiny_{row['trial_id']}")}
        assert hosts == {"tune-worker-1"}, hosts  # the head has no CPU for them
    assert not any((tmp_path / "runs").iterdir())  # nothing landed on the head's side of the worker's folder


def test_a_local_output_dir_the_worker_cannot_see_is_refused_before_any_trial(cluster, s3_server, tmp_path,
                                                                                tiny_models, tweets_csv):
    runs = tmp_path / "runs"
    (runs / "mine.txt").write_text("a user's file")
    study = _study(tmp_path, tiny_models("bert"), tweets_csv, str(runs))
    with _driver(cluster, s3_server, study) as p:
        assert p.finish(timeout=300) == cli.EXIT_BAD_INPUT, p.output[-4000:]
    assert "cannot see" in p.output and "(node " in p.output and "s3://" in p.output, p.output[-3000:]
    assert "1 of this cluster's 1 node(s) able to run trials cannot see" in p.output, p.output[-3000:]
    assert " started |" not in p.output and "Traceback" not in p.output
    assert sorted(path.name for path in runs.iterdir()) == ["mine.txt"]  # no run directory, no marker left
    assert (runs / "mine.txt").read_text() == "a user's file"

    # Another folder inside it that does not exist yet: refused too, and not left behind.
    study = _study(tmp_path, tiny_models("bert"), tweets_csv, str(runs / "new" / "deeper"))
    with _driver(cluster, s3_server, study) as p:
        assert p.finish(timeout=300) == cli.EXIT_BAD_INPUT, p.output[-4000:]
    assert sorted(path.name for path in runs.iterdir()) == ["mine.txt"]

    # The head alone (cluster.yaml's, its workers scaled to zero): trials wait for nodes to join, none can be asked,
    # so a local output_dir is refused, unless the user vouches for a shared filesystem with a file:// URI.
    cluster.kill_worker("tune-worker-1")
    cluster.wait_for_nodes(1, timeout=60)
    study = _study(tmp_path, tiny_models("bert"), tweets_csv, str(tmp_path / "elsewhere"))
    with _driver(cluster, s3_server, study) as p:
        assert p.finish(timeout=300) == cli.EXIT_BAD_INPUT, p.output[-4000:]
    assert "no node of this cluster can run a trial yet" in p.output, p.output[-3000:]
    assert f"file://{tmp_path / 'elsewhere'}" in p.output and not (tmp_path / "elsewhere").exists()


def test_a_lost_worker_s_trial_is_retried_on_the_node_that_replaces_it(cluster, s3_server, tmp_path, tiny_models,
                                                                        tweets_csv):
    import optuna

    prefix = f"{s3_server.bucket}/lost-{uuid.uuid4().hex[:8]}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # the driver's: it survives the worker
    study = _study(tmp_path, tiny_models("bert"), tweets_csv, f"s3://{prefix}", epochs=3, limit=1200,
                   max_concurrent=1, max_failures=2, storage=storage)
    fs = s3_server.filesystem()
    with _driver(cluster, s3_server, study) as p:
        line = p.wait_for(lambda line: " epoch 1:" in line, timeout=300)
        victim = line.split("] ", 1)[1].split()[1]
        run = _run_path(fs, prefix)
        deadline = time.monotonic() + 60
        while (_saved_iteration(fs, run, victim) or 0) < 1:  # Tune holds its epoch-1 checkpoint: a retry resumes it
            assert time.monotonic() < deadline, "Tune never saved the trial's first checkpoint"
            time.sleep(0.1)
        cluster.kill_worker("tune-worker-1")
        cluster.wait_for_nodes(1, timeout=60)
        cluster.add_worker("tune-worker-2", tmp_path / "runs")
        assert p.finish(timeout=600) == 0, p.output[-4000:]

    summary = json.loads(_read(fs, f"{run}/{SUMMARY}"))
    rows = list(csv.DictReader(io.StringIO(_read(fs, f"{run}/{TRIALS}"))))
    assert summary["complete"] is True and summary["finished_trials"] == 2, summary
    assert len(rows) == len({r["trial_id"] for r in rows}) == 2  # one row per trial: the retry is no new trial
    assert all(r["status"] == "COMPLETED" and int(r["epochs"]) == 3 for r in rows), rows
    history = _results(fs, run, f"tiny_{victim}")
    # It went on from its last checkpoint (epoch 1, in the bucket), not from scratch.
    assert [(r["training_iteration"], r["hostname"]) for r in history] == [
        (1, "tune-worker-1"), (2, "tune-worker-2"), (3, "tune-worker-2")], history
    # Optuna was told each trial once, when it finished: two trials, both COMPLETE.
    trials = optuna.load_study(study_name=f"{run.rsplit('/', 1)[1]}/tiny", storage=storage).trials
    assert sorted(t.user_attrs["tune_trial_id"] for t in trials) == sorted(r["trial_id"] for r in rows)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
