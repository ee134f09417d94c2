"""Command line: `tune-app VERB ...` (also `python -m tune_app VERB ...`).

Bad input ends with a message that names the problem and exit code 2, before Ray or any model starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from tune_app.errors import ConfigError, DataError, ReportError, UnknownFamilyError, UsageError
from tune_app.spec import config as config_mod
from tune_app.spec.config import StudyConfig
from tune_app.spec.paths import cannot_make_file, is_uri
from tune_app.spec.rundir import failure_line, open_run_dir, unfinished

EXIT_BAD_INPUT = 2


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="study YAML (see search_spaces/)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="override any key, YAML-typed (e.g. tune.num_samples=4 data.limit=500)")


def _load(args) -> StudyConfig:
    return config_mod.load(args.space, args.overrides, check_wandb=True, check_outputs=True)


def _print_notes(cfg: StudyConfig) -> None:
    for note in config_mod.notes(cfg):
        print(f"note: {note}")


def cmd_validate(args) -> int:
    cfg = _load(args)
    if cfg.tune.storage or cfg.tune.warm_start:  # the databases a run would open (Optuna only: no Ray, no torch)
        from tune_app.study import warmstart
        from tune_app.study.studies import check_storage

        check_storage(cfg.tune.storage)
        warmstart.load(cfg.tune.warm_start, list(cfg.models))
    n = cfg.planned_trials
    print(f"{args.space}: OK ({len(cfg.models)} model(s), {n} trial(s), metric {cfg.tune.metric} ({cfg.tune.mode}))")
    _print_notes(cfg)
    return 0


def cmd_show(args) -> int:
    """The merged config and, per model, what each trial will search and fix."""
    from tune_app.spec import space as space_mod

    cfg = _load(args)
    print(config_mod.dump(cfg.raw).rstrip())
    print("\n# resolved per model (defaults < train.batch_size < space < models.<name>.space)")
    for name, model in cfg.models.items():
        params = cfg.model_space(name)
        print(f"\n{name}: checkpoint {model.checkpoint}, {cfg.model_samples(name)} trial(s), "
              f"gpu {model.gpu}, cpu {model.cpu}"
              + (f", LoRA on {model.target_modules} (no preset)" if model.target_modules else ""))
        for key, value in params.items():
            if value is None:
                continue
            tag = "search" if space_mod.is_distribution(value) else "fixed "
            shown = space_mod.describe(value)
            if key == "lora_alpha" and space_mod.alpha_from_ratio(params):
                tag, shown = "fixed ", "lora_alpha_ratio x lora_rank"
            print(f"  {tag} {key:<17} {shown}")
    _print_notes(cfg)
    return 0


def cmd_run(args) -> int:
    cfg = _load(args)  # every check before Ray starts or anything is written
    if not (args.address or os.environ.get("RAY_ADDRESS")):  # Ray on this machine: its cores are all there is
        from tune_app.spec.machine import cores_problems

        if problems := cores_problems(cfg.models):
            raise ConfigError(problems)
    _print_notes(cfg)
    from tune_app.study.cluster import disconnect_ray
    from tune_app.study.runner import run_study

    try:
        summary = run_study(cfg, address=args.address)
    finally:
        disconnect_ray()
    code = _report(summary)
    _after_run(summary)
    return code


EXIT_INTERRUPTED = 130
EXIT_NO_RESULT = 1


def _report(summary: dict) -> int:
    """The end-of-run table; an interrupted study (Ctrl-C) also says how to continue it and exits 130; a study
    in which no trial reported a result says why the first one failed and exits 1."""
    from tune_app.study.results import format_table

    print()
    print(format_table(summary))
    best = summary["best"]
    if best:
        confirmed = best.get("confirmed")
        confirmed = (f" (confirmed: mean {confirmed['mean']:.4f} over seeds {', '.join(map(str, confirmed['seeds']))};"
                     f" its best seed)" if confirmed else "")
        print(f"\nbest: {best['model']} trial {best['trial_id']} {summary['metric']}={best[summary['metric']]:.4f}"
              f"{confirmed}")
    print(f"run directory: {summary['run_dir']}")
    if partial := unfinished(summary):
        print(f"interrupted: {partial} finished (kept); continue with: {summary['resume_command']}")
        return EXIT_INTERRUPTED
    if best is None:
        failed = summary.get("failed_trials") or []
        total = sum(m["trials"] for m in summary["models"].values())
        print(f"no trial reported a result ({len(failed)} of {total} failed); nothing to export", file=sys.stderr)
        if failed and not is_uri(str(summary["run_dir"])):
            first = failed[0]
            print(f"first failure, {first['model']} trial {first['trial_id']} ({first['error']}):\n  "
                  f"{failure_line(Path(summary['run_dir']), first['error'])}", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0


def cmd_resume(args) -> int:
    """Continue an interrupted study in RUN_DIR; a finished one is reported and left as it is."""
    from tune_app.study.cluster import disconnect_ray
    from tune_app.study.runner import check_resumable, resume_study
    from tune_app.study.storage import finished_summary

    try:
        run = open_run_dir(args.run_dir)
        _check_summary(run)
        if (done := finished_summary(run)) is not None:
            print(f"{run.uri}: study {done['study']} already finished ({done.get('finished_trials', '?')} trials); "
                  f"nothing to resume, nothing changed")
            return 0
        check_resumable(run)
        _check_study(run)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        summary = resume_study(run, address=args.address)
    finally:
        disconnect_ray()
    code = _report(summary)
    _after_run(summary)  # a resumed study ends as a run does: best bundle and report
    return code


def _check_summary(run) -> None:
    """A run's summary.json (when the study finished or was interrupted), checked before resume reads it, so that
    a damaged one is named."""
    from tune_app.bundle.runfiles import parse_summary
    from tune_app.spec.rundir import SUMMARY

    if run.has(SUMMARY):
        parse_summary(run.read_text(SUMMARY), f"{run.uri}/{SUMMARY}", run.uri)


def _check_study(run) -> None:
    """The schema of a local run's study.yaml, checked before resume loads it, so that a hand-edited one is named
    (its data is checked when the study is loaded)."""
    from tune_app.bundle.runfiles import study_error
    from tune_app.spec.rundir import STUDY

    if not run.remote:
        try:
            config_mod.load(run.local / STUDY, check_data=False, of_run=True)
        except ConfigError as e:
            raise study_error(run.local / STUDY, e, "be resumed") from None


def _after_run(summary: dict) -> None:
    """After a finished run: the overall best as a bundle in RUN_DIR/best, then report.md and plots. Neither step
    can fail the run: the study's results are written already; a failure says how to retry. A remote run (s3://,
    gs://, ...) gets its report only: the export loads the base model and scores the validation split, work for
    the machine that will use the bundle (`tune-app export RUN_DIR` there), not for a cluster's head node."""
    run_dir = str(summary["run_dir"])
    remote = is_uri(run_dir)
    finished = summary.get("complete", True) and summary.get("best")
    steps = []
    if finished and remote:
        print(f"export the best trial with: tune-app export {shlex.quote(run_dir)}")
    elif finished:
        from tune_app.bundle.export import export

        steps.append(("export the best trial", "export", lambda: f"bundle of the best trial: {export(run_dir)}"))
    from tune_app.bundle.report import write_report

    steps.append(("write the report", "report", lambda: f"report: {write_report(run_dir)}"))
    for what, verb, step in steps:
        try:
            print(step())
        except Exception as e:  # noqa: BLE001 - keep the results, say what to do
            print(f"warning: could not {what} ({type(e).__name__}: {e}); the study's results are intact in "
                  f"{run_dir}; retry with: tune-app {verb} {shlex.quote(run_dir)}", file=sys.stderr)


def cmd_dashboard(args) -> int:
    """optuna-dashboard over a run's stored Optuna studies (or any storage URL), live while the run goes on."""
    from tune_app.study.studies import serve_dashboard, storage_of

    try:
        serve_dashboard(storage_of(args.target), args.port)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_export(args) -> int:
    """A trial of a finished run (default: the overall best) as a self-contained bundle; 1 if it scores off."""
    import json

    from tune_app.bundle.export import export
    from tune_app.bundle.format import METRICS_FILE

    out = export(args.run_dir, model=args.model, trial=args.trial, out=args.out, merge=args.merge)
    print(f"bundle: {out}")
    return 0 if json.loads((out / METRICS_FILE).read_text())["round_trip_ok"] else 1


def cmd_predict(args) -> int:
    """Classify texts with a bundle: JSON lines on stdout, or a file with --input/--output."""
    from tune_app.bundle import predict

    frame = predict.predict(args.bundle, texts=args.text, input_path=args.input, output_path=args.output,
                            text_column=args.text_column, threshold=args.threshold)
    bundle = predict.open_bundle(args.bundle)
    print(predict.decision_note(bundle, bundle.decision_threshold(args.threshold)), file=sys.stderr)
    if args.output:
        print(f"{len(frame)} predictions -> {args.output}", file=sys.stderr)
    else:
        print(frame.to_json(orient="records", lines=True, force_ascii=False).rstrip())
    return 0


def cmd_evaluate(args) -> int:
    """Metrics of a bundle on labelled data (optionally beside the base checkpoint alone): JSON and a table."""
    import json

    from tune_app.bundle import predict

    json_out = Path(args.json_out).expanduser() if args.json_out else None
    if json_out and json_out.exists():
        raise UsageError(f"--json-out {args.json_out}: already exists; choose another file (nothing is overwritten)")
    if json_out and (why := cannot_make_file(json_out)):
        raise UsageError(f"--json-out {why}")
    report = predict.evaluate(args.bundle, args.data, label_column=args.label, text_column=args.text_column,
                              baseline=args.baseline, threshold=args.threshold)
    text = json.dumps(report, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
        print(predict.format_report(report))
    else:
        print(predict.format_report(report), file=sys.stderr)
        print(text)
    return 0


def cmd_report(args) -> int:
    """report.md plus PNG plots in RUN_DIR, from its summary.json, trials.csv and the trials' histories."""
    from tune_app.bundle.report import write_report

    try:
        path = write_report(args.run_dir)
    except ReportError as e:
        raise UsageError(str(e)) from None
    print(f"report: {path}")
    return 0


def cmd_keys(args) -> int:
    """Every YAML key with its default and meaning (the README's reference table)."""
    print(config_mod.reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune-app",
        description="Tune LoRA sequence classification across models with Ray Tune + Optuna TPE + ASHA.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("run", help="run a study from a search-space YAML")
    _add_study_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("resume", help="continue an interrupted study from its run directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory `run` printed (local path or URI)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    p.set_defaults(func=cmd_resume)

    p = verbs.add_parser("report", help="write report.md and plots comparing the models of a finished run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory `run` printed")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser("validate", help="check a study YAML (and its data) without running anything")
    _add_study_args(p)
    p.set_defaults(func=cmd_validate)

    p = verbs.add_parser("show", help="print the merged study and each model's resolved search space")
    _add_study_args(p)
    p.set_defaults(func=cmd_show)

    p = verbs.add_parser("keys", help="print every study YAML key with its default and meaning")
    p.set_defaults(func=cmd_keys)

    p = verbs.add_parser("export", help="write a trial of a finished run (default: the best) as a bundle")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory `run` printed")
    p.add_argument("--model", default=None, help="the best trial of this model (default: the overall best)")
    p.add_argument("--trial", default=None, metavar="ID", help="this trial (an id from trials.csv)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="bundle folder, new or empty (default: RUN_DIR/best for the overall best)")
    p.add_argument("--merge", action="store_true", help="also write merged/, a plain transformers model")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("dashboard", help="optuna-dashboard for a run's Optuna studies, on 127.0.0.1")
    p.add_argument("target", metavar="RUN_DIR|STORAGE", help="a run directory, or an Optuna storage URL")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = verbs.add_parser("predict", help="classify texts with an exported bundle")
    p.add_argument("bundle", metavar="BUNDLE", help="a folder `tune-app export` wrote")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    p.add_argument("--input", default=None, metavar="FILE", help="csv/json/jsonl/parquet file of texts")
    p.add_argument("--output", default=None, metavar="FILE", help="where predictions go (csv/json/jsonl/parquet)")
    p.add_argument("--text-column", default=None, help="text column of --input (default: the study's)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="binary tasks: P(class 1) cut (default: the bundle's, chosen on the validation split)")
    p.set_defaults(func=cmd_predict)

    p = verbs.add_parser("evaluate", help="score an exported bundle on labelled data")
    p.add_argument("bundle", metavar="BUNDLE", help="a folder `tune-app export` wrote")
    p.add_argument("--data", required=True, metavar="FILE", help="labelled csv/json/jsonl/parquet file")
    p.add_argument("--label", default=None, metavar="COL", help="label column (default: the study's)")
    p.add_argument("--text-column", default=None, metavar="COL", help="text column (default: the study's)")
    p.add_argument("--baseline", nargs="?", const="base", default=None, metavar="CHECKPOINT",
                   help="also score this checkpoint without the adapter (no value: the bundle's base)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="binary tasks: P(class 1) cut (default: the bundle's)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="write the JSON report here (default: stdout)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def probability(text: str) -> float:
    """--threshold: a probability, 0 to 1 (argparse exits 2 with this message otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give P(class 1), e.g. 0.5") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability: give P(class 1) between 0 and 1, e.g. 0.5")
    return value


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, a reader that has gone surfaces as BrokenPipeError below, not as noise at exit
        return code
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UsageError, DataError, UnknownFamilyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tune-app keys | head`: the reader of what this verb prints has gone
        if args.func not in (cmd_keys, cmd_show, cmd_predict):
            raise  # a pipe of Ray's or a subprocess's: a real failure, shown
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise again
        return 1
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        return _unexpected(e)


TRACEBACK_ENV = "TUNE_APP_TRACEBACK"
"""Set to 1 to let an unexpected exception escape with its traceback (debugging) instead of the short message."""

EXIT_FAILED = 1


def _unexpected(error: Exception) -> int:
    """Any other exception a verb raised (a bug, or a library's failure): one line on stderr, naming the file that
    holds the full traceback, and exit 1."""
    import tempfile
    import time
    import traceback

    from tune_app.errors import first_line

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        folder = Path(tempfile.gettempdir()) / "tune_app"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=time.strftime("traceback-%Y%m%d-%H%M%S-"), suffix=".txt", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        where = f"full traceback: {name}"
    except OSError as e:  # no writable temp folder: the traceback goes to stderr instead
        print(text, file=sys.stderr, end="")
        where = f"traceback above; could not write it to a file: {e}"
    message = first_line(error) if str(error).strip() else ""
    print(f"error: {type(error).__name__}: {message} ({where})" if message
          else f"error: {type(error).__name__} ({where})", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
