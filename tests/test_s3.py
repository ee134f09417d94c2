"""A study whose output_dir is s3://, against a real S3-compatible server on loopback (moto's, the `s3_server`
fixture) reached as users of MinIO, R2 or Ceph reach theirs: pyarrow's S3 filesystem with AWS_ENDPOINT_URL_S3.
The study is interrupted, resumed from the bucket, reported on and exported from it; nothing is read from a local
copy the study left behind."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import one_model_study
from tests.test_resume import StudyProcess
from tune_app import cli
from tune_app.spec.rundir import SUMMARY, TRIALS

pytestmark = pytest.mark.slow

EPOCHS, PLANNED = 2, 3


def test_a_study_in_s3_resumes_reports_and_exports_from_the_bucket(s3_server, tmp_path, tiny_models, tweets_csv,
                                                                   monkeypatch, capsys, request):
    import pyarrow.fs

    fs = s3_server.filesystem()
    prefix = f"{s3_server.bucket}/runs-{uuid.uuid4().hex[:8]}"
    space = {"lora_rank": {"choice": [2, 4, 8]}, "learning_rate": {"loguniform": [1.0e-4, 1.0e-3]}}
    study = one_model_study("bucket", tiny_models("bert"), tweets_csv, tmp_path / "unused", space=space,
                            epochs=EPOCHS, trials=PLANNED)
    study["output_dir"] = f"s3://{prefix}"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    # The study's and the CLI's $TMPDIR, where their local copies land: short, since Ray puts its sockets there.
    staging = Path(tempfile.mkdtemp(prefix="s3", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(staging, ignore_errors=True))
    env = {**s3_server.env, "TMPDIR": str(staging)}

    # Ctrl-C once the first trial has finished: Tune saves its state to the bucket, the study says how to resume.
    with StudyProcess(["run", str(tmp_path / "study.yaml")], env=env) as proc:
        proc.wait_for(lambda line: " completed |" in line, timeout=240)
        proc.proc.send_signal(signal.SIGINT)
        assert proc.finish(timeout=120) == cli.EXIT_INTERRUPTED, proc.output[-4000:]
    (name,) = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(prefix))]
    uri = f"s3://{prefix}/{name}"
    assert f"tune-app resume {uri}" in proc.output
    interrupted = json.loads(read(fs, f"{prefix}/{name}/{SUMMARY}"))
    assert interrupted["complete"] is False and interrupted["finished_trials"] >= 1

    shutil.rmtree(staging / "tune_app")  # the bucket alone must be enough from here on
    with StudyProcess(["resume", uri], env=env) as resumed:
        assert resumed.finish(timeout=400) == 0, resumed.output[-4000:]
    summary = json.loads(read(fs, f"{prefix}/{name}/{SUMMARY}"))
    rows = list(csv.DictReader(io.StringIO(read(fs, f"{prefix}/{name}/{TRIALS}"))))
    assert summary["complete"] is True and summary["run_dir"] == uri
    assert summary["finished_trials"] == PLANNED == len(rows) == len({r["trial_id"] for r in rows})
    assert all(r["status"] == "COMPLETED" and int(r["epochs"]) == EPOCHS for r in rows), rows
    assert all(r["checkpoint"].startswith(f"tiny_{r['trial_id']}/checkpoint_") for r in rows), rows

    # export and report run here, from the bucket: this process reaches it as the study did.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    shutil.rmtree(staging / "tune_app")
    assert cli.main(["export", uri]) == 0
    assert f"uploaded to {uri}/best" in capsys.readouterr().out
    bundle = json.loads(read(fs, f"{prefix}/{name}/best/bundle.json"))
    assert (bundle["model"], bundle["trial_id"]) == (summary["best"]["model"], summary["best"]["trial_id"])
    assert json.loads(read(fs, f"{prefix}/{name}/best/metrics.json"))["round_trip_ok"]
    local = staging / "tune_app" / name
    assert len(list(local.glob("*/checkpoint_*"))) == 1  # only the exported checkpoint came down
    assert not list(local.glob("*/progress.csv"))  # and no trial history: the report's, not the export's

    before = read(fs, f"{prefix}/{name}/best/bundle.json")
    assert cli.main(["export", uri]) == cli.EXIT_BAD_INPUT
    assert f"{uri}/best: already exists" in capsys.readouterr().err
    assert read(fs, f"{prefix}/{name}/best/bundle.json") == before

    assert cli.main(["report", uri]) == 0
    assert "## Models compared" in read(fs, f"{prefix}/{name}/report.md")
    run_files = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{prefix}/{name}"))]
    assert any(file.endswith(".png") for file in run_files), run_files  # the plots went up with it
    assert cli.main(["report", f"{uri}-nope"]) == cli.EXIT_BAD_INPUT
    assert "no such run directory" in capsys.readouterr().err


def read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.readall().decode("utf-8")
