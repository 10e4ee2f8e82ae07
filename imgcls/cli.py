"""One command-line front for every job: `imgcls train|predict|evaluate|tune|export|report|promote`.

Exit codes a scheduler can alert on: 0 success, 2 user error (message, no traceback), 1 a failed run
(a cluster or storage fault, a stall: one paragraph) or an internal failure (a traceback), 3 a bulk
run that committed its rows but whose drift test flagged it (`predict --fail-on-drift`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from imgcls.errors import DriftDetectedError, JobFailedError, UserError, clip
from imgcls.platform.logs import configure_logging, set_verbose, verbose

logger = logging.getLogger("imgcls")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_DRIFT = 3
# Characters of a user error's message printed at most: each message bounds the input it quotes, and
# this is the last guard should one not (stderr goes to logs and alerts).
MAX_MESSAGE_CHARACTERS = 2_000
# Seconds Ray gets to shut down when a job ends.
SHUTDOWN_GRACE_SECONDS = 60.0


def _add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config key (dotted, e.g. train.epochs=5); the value is parsed as YAML. Repeatable.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Also print Ray's and TensorFlow's own lines (as IMGCLS_LOG_LEVEL=DEBUG does).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcls", description="Distributed image classification on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="Train a classifier with Ray Train.")
    train.add_argument("--config", required=True, help="YAML job config (see README, 'Config reference').")
    _add_set_option(train)

    predict = verbs.add_parser("predict", help="Classify a folder of images into Parquet.")
    predict.add_argument("--model", required=True, help="Model artifact directory (a training run's output_dir/model).")
    predict.add_argument("--input", required=True, help="Folder of images, read recursively.")
    predict.add_argument("--output", required=True, help="Parquet dataset directory for the predictions.")
    predict.add_argument("--top-k", type=int, default=None, help="Labels kept per image (default min(5, classes)).")
    predict.add_argument("--batch-size", type=int, default=None, help="Images per model call (default 64).")
    predict.add_argument("--min-score", type=float, default=None, help="Label rows whose top score is lower 'unknown'; multi-label: every class's threshold.")
    predict.add_argument("--rows-per-file", type=int, default=None, help="Upper bound on rows per Parquet file.")
    predict.add_argument("--partition-by", choices=["run_date"], default=None, help="Write run_date=YYYY-MM-DD/ partitions.")
    predict.add_argument(
        "--overwrite", action="store_true", help="Reclassify everything and replace the output (default: only new images)."
    )
    predict.add_argument(
        "--allow-foreign-files",
        action="store_true",
        help="Write into an output that holds files imgcls did not write; they are left alone (default: exit 2).",
    )
    predict.add_argument(
        "--review", type=int, default=None, metavar="N",
        help="Also write the N least certain images to OUTPUT/_review/<run_id>.parquet.",
    )  # fmt: skip
    predict.add_argument(
        "--review-folder", default=None, metavar="DIR",
        help="Copy the review images into DIR/<predicted label>/ for labelling (needs --review).",
    )  # fmt: skip
    predict.add_argument(
        "--fail-on-drift", action="store_true",
        help="Exit 3 when the drift test flags the run (its rows are committed first).",
    )  # fmt: skip
    _add_set_option(predict)

    evaluate = verbs.add_parser("evaluate", help="Measure a model on labelled images: metrics, figures, report.")
    evaluate.add_argument("--model", required=True, help="Model artifact directory.")
    evaluate.add_argument("--data", required=True, help="Labelled images: a folder per class or a manifest.")
    evaluate.add_argument("--output", required=True, help="Folder for the report, metrics and figures.")
    evaluate.add_argument(
        "--min-score", type=float, default=None, help="Multi-label models: every class's decision threshold."
    )
    _add_set_option(evaluate)

    tune = verbs.add_parser("tune", help="Search hyperparameters with Ray Tune; writes best_config.yaml and its model.")
    tune.add_argument("--config", required=True, help="YAML job config with a `tune:` section (see README).")
    _add_set_option(tune)

    export = verbs.add_parser("export", help="Export a model artifact for serving: SavedModel, ONNX or LiteRT.")
    export.add_argument("--model", required=True, help="Model artifact directory (a training run's output_dir/model).")
    # Not argparse choices: a wrong format is a user error of exit 2 with the config's own message.
    export.add_argument("--format", required=True, help="saved_model, onnx or litert.")
    export.add_argument("--output", required=True, help="Folder for the exported model, labels.txt and metadata.json.")
    _add_set_option(export)

    report = verbs.add_parser("report", help="Trend report of a predictions output: its runs over time, drift, uncertain images.")
    report.add_argument("--output", required=True, help="The predictions output to report on (predict's --output).")
    report.add_argument("--report-dir", default=None, help="Folder for report.md and its figures (default OUTPUT/_report).")
    _add_set_option(report)

    promote = verbs.add_parser("promote", help="Point an alias of an MLflow registered model at one of its versions.")
    promote.add_argument("name", help="Registered model name (tracking.register_as of its trainings).")
    promote.add_argument("version", help="Version number to promote, e.g. 3.")
    promote.add_argument("--alias", required=True, help="Alias to move, e.g. champion (predict --model models:/NAME@ALIAS).")
    promote.add_argument("--mlflow-uri", default=None, help="MLflow tracking server (default: MLFLOW_TRACKING_URI).")
    promote.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


def _train(arguments: argparse.Namespace) -> None:
    from imgcls import train
    from imgcls.config import load_job_config

    config = load_job_config(arguments.config, arguments.overrides)
    result = train.run(config)
    registered = f", registered as {result.registered_as}" if result.registered_as else ""
    print(f"model {result.model_version} written to {result.artifact_uri}{registered}")


def _predict(arguments: argparse.Namespace) -> None:
    from imgcls import predict
    from imgcls.config import PredictConfig, build_model, merge, parse_overrides

    values = {"model": arguments.model, "input": arguments.input, "output": arguments.output}
    if arguments.top_k is not None:
        values["top_k"] = arguments.top_k
    for option in ("batch_size", "min_score", "rows_per_file", "partition_by", "review", "review_folder"):
        if getattr(arguments, option) is not None:
            values[option] = getattr(arguments, option)
    for flag in ("overwrite", "allow_foreign_files", "fail_on_drift"):
        if getattr(arguments, flag):
            values[flag] = True
    values = merge(values, parse_overrides(arguments.overrides))
    config = build_model(PredictConfig, values, "predict arguments")
    summary = predict.run(config)
    drift = summary.drift
    verdict = f"drift {drift.status}" + (f" (score {drift.score:.2f})" if drift and drift.score is not None else "") if drift else ""
    print(
        f"{summary.images_listed} images listed, {summary.already_done} already done, {summary.classified} classified, "
        f"{summary.errored} errored, {summary.images_per_second} images/s, {verdict} -> {summary.output_uri}"
    )
    if config.fail_on_drift and drift is not None and drift.detected:
        raise DriftDetectedError(f"run {summary.run_id} committed, but its images drifted from the model's reference: {drift.message}")


def _evaluate(arguments: argparse.Namespace) -> None:
    from imgcls import evaluate
    from imgcls.config import EvaluateConfig, build_model, merge, parse_overrides

    values = {"model": arguments.model, "data": arguments.data, "output": arguments.output}
    if arguments.min_score is not None:
        values["min_score"] = arguments.min_score
    values = merge(values, parse_overrides(arguments.overrides))
    summary = evaluate.run(build_model(EvaluateConfig, values, "evaluate arguments"))
    if summary.task == "multilabel":
        print(
            f"micro-F1 {summary.micro_f1:.4f} macro-F1 {summary.macro_f1:.4f} exact-set accuracy {summary.accuracy:.4f} "
            f"on {summary.evaluated} images ({summary.unreadable} unreadable) -> {summary.output_uri}"
        )
    else:
        print(f"accuracy {summary.accuracy:.4f} on {summary.evaluated} images ({summary.unreadable} unreadable) -> {summary.output_uri}")


def _tune(arguments: argparse.Namespace) -> None:
    from imgcls import tune
    from imgcls.config import load_job_config

    config = load_job_config(arguments.config, arguments.overrides)
    result = tune.run(config)
    finished = sum(trial.status in ("completed", "early_stopped") for trial in result.trials)
    stopped = sum(trial.status == "stopped_by_asha" for trial in result.trials)
    print(
        f"{len(result.trials)} trials ({finished} finished, {stopped} stopped early by ASHA); best {result.best_trial_id} "
        f"{config.tune.metric} {result.best_metric:.4f} -> {result.best_config_uri}, model {result.artifact_uri}"
    )


def _export(arguments: argparse.Namespace) -> None:
    from imgcls import export
    from imgcls.config import ExportConfig, build_model, merge, parse_overrides

    values = merge(
        {"model": arguments.model, "format": arguments.format, "output": arguments.output},
        parse_overrides(arguments.overrides),
    )
    summary = export.run(build_model(ExportConfig, values, "export arguments"))
    difference = "not checked" if summary.max_difference is None else f"{summary.max_difference:.1e}"
    print(
        f"exported model {summary.model_version} as {summary.format} ({len(summary.files)} files, "
        f"{summary.size_bytes / 1e6:.2f} MB, max |difference| vs keras {difference}) -> {summary.output_uri}"
    )


def _report(arguments: argparse.Namespace) -> None:
    from imgcls import report
    from imgcls.config import ReportConfig, build_model, merge, parse_overrides

    values = {"output": arguments.output}
    if arguments.report_dir is not None:
        values["report_dir"] = arguments.report_dir
    values = merge(values, parse_overrides(arguments.overrides))
    summary = report.run(build_model(ReportConfig, values, "report arguments"))
    print(f"{summary.runs} run records read, {len(summary.figures)} figures -> {summary.report_uri}")


def _promote(arguments: argparse.Namespace) -> None:
    from imgcls.config.model_reference import VERSION_PATTERN, check_alias, check_model_name

    try:
        name, alias = check_model_name(arguments.name), check_alias(arguments.alias)
    except ValueError as error:
        raise UserError(str(error)) from None
    if not VERSION_PATTERN.fullmatch(arguments.version):
        raise UserError(f"VERSION must be a registered version's number (1, 2, ...), not {clip(arguments.version, 80)}.")
    from imgcls.tracking.registry import promote, registry_uri

    uri = registry_uri(arguments.mlflow_uri, "imgcls promote changes an MLflow model registry", "--mlflow-uri URI")
    promoted, previous = promote(name, arguments.version, alias, uri)
    was = f"it named version {previous}" if previous else "a new alias"
    print(
        f"{promoted.reference} -> version {promoted.version} (model {promoted.model_version or '?'}, source "
        f"{promoted.source}); {was}"
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": _train,
    "predict": _predict,
    "evaluate": _evaluate,
    "tune": _tune,
    "export": _export,
    "report": _report,
    "promote": _promote,
}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    set_verbose(arguments.verbose)
    # TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) buries the useful lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose() else "2")
    configure_logging()
    try:
        COMMANDS[arguments.verb](arguments)
    except UserError as error:
        print(f"imgcls {arguments.verb}: error: {clip(str(error), MAX_MESSAGE_CHARACTERS)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except DriftDetectedError as error:
        print(f"imgcls {arguments.verb}: drift: {clip(str(error), MAX_MESSAGE_CHARACTERS)}", file=sys.stderr)
        return EXIT_DRIFT
    except JobFailedError as error:
        print(f"imgcls {arguments.verb}: failed: {clip(str(error), MAX_MESSAGE_CHARACTERS)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"imgcls {arguments.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        logger.exception("imgcls %s failed with an internal error", arguments.verb)
        return EXIT_FAILURE
    return EXIT_OK


def process_main(argv: Sequence[str] | None = None) -> NoReturn:
    """`main` for a process that runs this one job and nothing else (the `imgcls` command, jobs/*.py):
    such a process may import TensorFlow without Keras' optional extras (see imgcls.tensorflow_import),
    and ends as soon as the job has returned."""
    from imgcls.platform.tensorflow_import import claim_process

    claim_process()
    _exit_now(main(argv))


def _hard_exit(code: int) -> None:
    print("imgcls: Ray did not shut down in time; exiting without it", file=sys.stderr, flush=True)
    os._exit(code)


def _exit_now(code: int) -> NoReturn:
    """A job's outputs are written, closed and committed when it returns; what is left is the
    interpreter tearing down TensorFlow and Ray, seconds of a short job. Leave Ray cleanly
    (stopping the local Ray this process started, if any), flush the logs, and exit without it."""
    # After a fault (a dead node, a stalled pipeline) Ray's own shutdown can wait on what is gone:
    # it gets a bounded time, then the process ends anyway.
    deadline = threading.Timer(SHUTDOWN_GRACE_SECONDS, _hard_exit, (code,))
    deadline.daemon = True
    deadline.start()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(process_main())
