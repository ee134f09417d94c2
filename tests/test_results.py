"""results.trial_rows on trial folders as Ray Tune writes them (result.json lines, checkpoint_* folders)."""

from __future__ import annotations

import json

from ray.tune import Result

from tune_app.spec import config
from tune_app.spec.rundir import run_dir_at
from tune_app.study.results import trial_rows


def _trial_folder(path, epochs: list[dict], kept: int):
    """A trial folder whose result.json holds `epochs` and whose only checkpoint is epoch `kept`'s (1-based)."""
    path.mkdir()
    lines = []
    for i, metrics in enumerate(epochs, start=1):
        name = f"checkpoint_{i - 1:06d}"
        lines.append(json.dumps({"training_iteration": i, "checkpoint_dir_name": name, "time_total_s": i,
                                 "config": {"model": "m", "lora_rank": 8}, **metrics}))
        if i == kept:
            (path / name).mkdir()
    (path / "result.json").write_text("\n".join(lines) + "\n")
    return Result.from_path(str(path))


def test_epochs_tied_on_the_metric_name_the_epoch_whose_checkpoint_was_kept(tmp_path):
    """Two epochs with the same F1 and Tune kept the later one's adapter: the row's best epoch, its other metrics
    and its checkpoint are that epoch's, as a bundle exported from the checkpoint will say."""
    errors = []
    cfg = config.from_dict({"name": "t", "data": {"source": "x.csv"}, "models": {"m": "org/model"},
                            "train": {"epochs": 3}}, errors)
    assert not errors
    tied = [{"f1": 0.4, "eval_loss": 0.9}, {"f1": 0.5, "eval_loss": 0.8}, {"f1": 0.5, "eval_loss": 0.7}]
    run = run_dir_at(str(tmp_path), "RUN_DIR")
    later, = trial_rows(cfg, [_trial_folder(tmp_path / "m_later", tied, kept=3)], run)
    assert (later["best_epoch"], later["best_f1"], later["best_eval_loss"]) == (3, 0.5, 0.7)
    assert later["checkpoint"] == "m_later/checkpoint_000002" and later["lora_rank"] == 8
    earlier, = trial_rows(cfg, [_trial_folder(tmp_path / "m_earlier", tied, kept=2)], run)
    assert (earlier["best_epoch"], earlier["best_eval_loss"], earlier["checkpoint"]) == (
        2, 0.8, "m_earlier/checkpoint_000001")
