"""One Ray Tune study over several models: a searcher and a scheduler that route each trial to its model's own
Optuna TPE searcher and its own ASHA rungs, so models interleave on the resources but never compete in a rung
or share a TPE model.
"""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from tune_app.spec import space as space_mod
from tune_app.spec.metrics import best_of
from tune_app.spec.space import MODEL_KEY
from tune_app.study import warmstart


def default_startup_trials(num_samples: int) -> int:
    """Random proposals before TPE starts modelling: a third of the budget, between 1 and 10."""
    return max(1, min(10, num_samples // 3))


class PerModelSearch(Searcher):
    """Proposes trials model by model (round robin while each has samples left), each from its model's own Optuna
    study and seeded TPE sampler; fixed values are added to every proposal.

    What each model's study learns (Optuna's ask-and-tell): every epoch's metric as an intermediate value; a trial
    that ran every epoch is COMPLETE with the value the study ranks it by (its best epoch); one that ASHA stopped
    early is PRUNED (Optuna then takes its last epoch's value, and TPE ranks pruned trials by how far they got,
    apart from completed ones, so it never mixes a first-rung value with a final one); one that failed is FAIL.
    Each trial carries its Tune trial id, status, epochs, best epoch and cost (seconds) as user attributes.

    With `storage` (an Optuna storage URL: the run's SQLite file, or PostgreSQL), the studies live there as
    `<study_prefix><model>`, for the dashboard, warm starts and anyone's `optuna.load_study`; a resumed search
    reconnects to them (Optuna's storages pickle as their URL). Without, they live in memory and in Tune's pickle
    of this searcher. With `warm` (tune.warm_start), each study starts with the earlier trials of its model that fit
    its space, and proposes the best of them first (tune_app.study.warmstart).
    """

    def __init__(self, spaces: dict[str, dict[str, Any]], samples: dict[str, int], *, metric: str, mode: str,
                 seed: int, epochs: int, n_startup_trials: int | None = None, storage: str | None = None,
                 study_prefix: str = "", warm=None):
        super().__init__(metric=metric, mode=mode)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.models = list(spaces)
        self.remaining = dict(samples)
        self.epochs = epochs
        self.fixed = {m: {k: v for k, v in s.items() if not space_mod.is_distribution(v)} for m, s in spaces.items()}
        self.distributions: dict[str, dict[str, Any]] = {}
        self.studies: dict[str, optuna.Study] = {}
        for index, (model, spec) in enumerate(spaces.items()):
            domains = {k: to_tune(v) for k, v in space_mod.searched(spec).items()}
            self.distributions[model] = OptunaSearch.convert_search_space(domains) if domains else {}
            sampler = optuna.samplers.TPESampler(
                seed=seed + index, n_startup_trials=n_startup_trials or default_startup_trials(samples[model]))
            self.studies[model] = optuna.create_study(
                storage=storage, study_name=f"{study_prefix}{model}", sampler=sampler,
                direction="maximize" if mode == "max" else "minimize")
            with warnings.catch_warnings():  # experimental in Optuna, and only a label
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.studies[model].set_metric_names([metric])  # what the dashboard calls its objective
        self.first: dict[str, list[dict[str, Any]]] = {}  # model -> warm start's configurations to propose first
        self.warm_said: dict[str, str] = {}
        self.warm_source = warm.source if warm else None
        for model, earlier in (warm.trials if warm else {}).items():
            if earlier:
                self.first[model], self.warm_said[model] = warmstart.seed_study(
                    self.studies[model], self.distributions[model], earlier, warm.source, mode)
        self.trial_model: dict[str, str] = {}
        self.asked: dict[str, Any] = {}  # Tune trial id -> its Optuna trial, until told
        self.values: dict[str, dict[int, float]] = {}  # Tune trial id -> epoch -> metric
        self._turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        for offset in range(len(self.models)):
            model = self.models[(self._turn + offset) % len(self.models)]
            if self.remaining[model] <= 0:
                continue
            enqueued = bool(self.first.get(model))
            if enqueued:  # the study's only waiting trial: the ask below takes it
                self.studies[model].enqueue_trial(self.first[model].pop(0))
            trial = self.studies[model].ask(self.distributions[model])
            trial.set_user_attr("tune_trial_id", trial_id)
            if enqueued:
                trial.set_user_attr("warm_start", self.warm_source)
            self._turn = (self._turn + offset + 1) % len(self.models)
            self.remaining[model] -= 1
            self.trial_model[trial_id] = model
            self.asked[trial_id] = trial
            self.values[trial_id] = {}
            return space_mod.with_resolved_alpha({MODEL_KEY: model, **self.fixed[model], **trial.params})
        return Searcher.FINISHED if all(n <= 0 for n in self.remaining.values()) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial, value = self.asked.get(trial_id), result.get(self.metric)
        epoch = result.get("training_iteration")
        if trial is None or value is None or epoch is None or epoch in self.values[trial_id]:
            return  # not ours, no metric, or an epoch reported before a resume (Optuna takes each step once)
        self.values[trial_id][epoch] = value
        if math.isfinite(value):
            trial.report(value, epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if result:
            self.on_trial_result(trial_id, result)
        trial = self.asked.pop(trial_id, None)
        if trial is None:
            return
        values = {e: v for e, v in self.values[trial_id].items() if math.isfinite(v)}
        epochs = max(self.values[trial_id], default=0)
        best = best_of(sorted(values), values.get, self.mode)  # the first best epoch, as the study's results rank it
        status = "failed" if error else "completed" if epochs >= self.epochs else "stopped_early"
        trial.set_user_attr("status", status)
        trial.set_user_attr("epochs", epochs)
        for key, attr in (("time_total_s", "trial_time_s"), ("train_time_s", "train_time_s")):
            if result and isinstance(result.get(key), (int, float)):
                trial.set_user_attr(attr, float(result[key]))
        if best is not None:
            trial.set_user_attr("best_epoch", best)
            trial.set_user_attr(f"best_{self.metric}", values[best])
        study = self.studies[self.trial_model[trial_id]]
        if status == "completed" and best is not None:
            study.tell(trial, values[best])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL if error or best is None
                       else optuna.trial.TrialState.PRUNED)

    def get_state(self) -> dict:
        return dict(self.__dict__)

    def set_state(self, state: dict) -> None:
        """A resumed searcher: as saved, then squared with its studies' storage, which may have been written after
        the save: a trial told there since is done; one still running keeps the epochs stored (Optuna takes each
        step once, and a resumed trial may report epochs again)."""
        self.__dict__.update(state)
        for trial_id, trial in list(self.asked.items()):
            stored = self.studies[self.trial_model[trial_id]].trials[trial.number]
            if stored.state.is_finished():
                del self.asked[trial_id]
            else:
                self.values[trial_id] = {**stored.intermediate_values, **self.values[trial_id]}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class PerModelASHA(FIFOScheduler):
    """One ASHA scheduler per model (rungs at grace x rf^k epochs); without `asha`, a plain FIFO.

    With `state_uri` (a file in the run directory), the rungs are written there after every decision and read
    back when a resumed study first uses the scheduler: Tune restores the searcher on resume but rebuilds the
    scheduler from the Tuner's start, so without this every rung would be empty again and the first trials after
    a resume could not be stopped early.
    """

    def __init__(self, models: list[str], *, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: int, enabled: bool = True, state_uri: str | None = None):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.enabled = enabled
        self.schedulers = {
            m: ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_t,
                             grace_period=grace_period, reduction_factor=reduction_factor)
            for m in models
        } if enabled else {}
        self.state_uri = state_uri if enabled else None
        self._state_checked = False
        self._fs = None  # (pyarrow filesystem, path) of state_uri, opened once
        self._saved: bytes | None = None  # what the file holds now
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the scheduler into tuner.pkl: no open filesystem
        return {**self.__dict__, "_fs": None, "_saved": None}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _of(self, trial) -> ASHAScheduler | None:
        if not self._state_checked:
            self._state_checked = True
            self._load_state()
        return self.schedulers.get(trial.config.get(MODEL_KEY))

    def _file(self):
        if self._fs is None:
            from tune_app.spec.rundir import open_filesystem

            self._fs = open_filesystem(self.state_uri, "scheduler state")
        return self._fs

    def _warn(self, what: str, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            print(f"[tune_app] could not {what} ASHA's rungs ({self.state_uri}: {error}); the study goes on, but a "
                  f"resume starts them empty", flush=True)

    def _load_state(self) -> None:
        if not self.state_uri:
            return
        import pyarrow.fs

        try:
            fs, path = self._file()
            if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
                return
            with fs.open_input_stream(path) as f:
                state = pickle.loads(f.readall())
        except Exception as error:  # noqa: BLE001 - unreadable rungs must not block a resume
            self._warn("read", error)
            return
        self.schedulers.update(state)

    def _save_state(self) -> None:
        """Write the rungs if they changed (results between rungs change nothing): to a temporary file first, then
        moved over the old one, so a crash mid-write never leaves a truncated file for the resume to read."""
        if not self.state_uri:
            return
        data = pickle.dumps(self.schedulers)
        if data == self._saved:
            return
        try:
            fs, path = self._file()
            with fs.open_output_stream(path + ".tmp") as f:
                f.write(data)
            fs.move(path + ".tmp", path)
        except Exception as error:  # noqa: BLE001 - a storage hiccup must not end the study
            self._warn("save", error)
            return
        self._saved = data

    def on_trial_add(self, tune_controller, trial) -> None:
        if s := self._of(trial):
            s.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        s = self._of(trial)
        if s is None:
            return TrialScheduler.CONTINUE
        action = s.on_trial_result(tune_controller, trial, result)
        self._save_state()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        s = self._of(trial)
        if s is not None and trial.trial_id in s._trial_info:
            s.on_trial_complete(tune_controller, trial, result)
            self._save_state()

    def on_trial_remove(self, tune_controller, trial) -> None:
        s = self._of(trial)
        if s is not None and trial.trial_id in s._trial_info:
            s.on_trial_remove(tune_controller, trial)
            self._save_state()

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{m}: {s.debug_string()}" for m, s in self.schedulers.items()) or "FIFO (no ASHA)"


def to_tune(value: Any) -> Any:
    """A validated YAML value as a Ray Tune domain (or the fixed value itself)."""
    if not space_mod.is_distribution(value):
        return value
    kind, args = next(iter(value.items()))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(float(args[0]), float(args[1]))
    if kind == "loguniform":
        return tune.loguniform(float(args[0]), float(args[1]))
    # tune.randint excludes its upper bound; our YAML's int includes it.
    return tune.randint(int(args[0]), int(args[1]) + 1)
