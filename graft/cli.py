"""The ``graft`` command: a thin layer that parses options and calls the library.

    graft scan ROOT                         counts, unreadable files, warnings, bar chart
    graft train ROOT --out RUN              both stages, curves, diagnosis, test metrics
    graft evaluate RUN [FOLDER]             metrics on the held-out split or another folder
    graft predict RUN PATH... [--grid F]    top-k classes per image ('unknown' when unsure)
    graft report RUN                        the run's self-contained HTML report
    graft lr-find ROOT                      loss against learning rate, and a suggestion
    graft export RUN --format onnx          portable model + preprocessing JSON + model card
    graft serve RUN_OR_EXPORT               HTTP API (/predict, /docs) and a web page
    graft train --resume RUN                continue an interrupted run

The options that shape a run are not written here: they are the fields of
:class:`graft.config.TrainConfig`, whose metadata holds each one's help, group and flag form
(:func:`add_config_options`, :func:`config_from_args`). Only light modules are imported at
module level, so ``graft --help`` and argument errors never load torch; the libraries a
command needs are imported when it runs.

Exit codes: 0 ok, 1 a bug in graft, 2 usage, 3 data, 4 weights, 5 run folder exists,
6 run folder incomplete or damaged, 7 partial failure (some files could not be read),
8 the system refused (disk full, read-only, permission, port in use), 9 training diverged,
130 interrupted. See graft.errors.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import stopping
from .cliparse import build_parser, config_from_args
from .config import TrainConfig
from .errors import (
    PARTIAL_FAILURE_EXIT,
    DataError,
    GraftError,
    RunFolderError,
    SystemResourceError,
    UsageError,
    os_error_message,
)
from .io import check_output_file, check_output_folder, shell_path
from .io import display as _display
from .rundir import RunDir

# --------------------------------------------------------------------------- commands


def cmd_scan(args: argparse.Namespace) -> int:
    from .data import open_dataset
    from .plots import plot_class_counts
    from .progress import Reporter

    config = config_from_args(args)  # validates the options before any work
    config.check_paths()
    if not args.labels_csv and not (args.root or "").strip():
        raise UsageError(
            "ROOT is empty: give the data folder, e.g. `graft scan photos/`, or --labels-csv FILE."
        )
    source = Path(args.labels_csv) if args.labels_csv else Path(args.root).expanduser().resolve()
    name = source.stem if args.labels_csv else source.name
    plot = check_output_file(args.plot or f"{name}_class_counts.png", "--plot", ".png")
    pairs_png = plot.with_name(plot.stem.replace("_class_counts", "") + "_duplicates.png")
    if not args.no_audit:
        check_output_file(pairs_png, "--plot (its example pairs)", ".png")
    reporter = Reporter(verbose=not args.json)
    data = open_dataset(args.root, args.labels_csv, progress=reporter.iter)
    reporter.info(data.layout_note)
    plot_class_counts(data.counts, plot)
    findings: list[str] = []
    audit_summary = None
    if not args.no_audit:
        from .audit import audit_dataset, check_split, draw_examples, explain

        report = audit_dataset(data, config, reporter=reporter)
        if data.given is not None:  # a split the user made: are near-copies across it?
            check_split(report, data.given, data.given)
        findings = explain(report, data.classes, data.labels, data.paths, data.root, data.layout)
        if (report.near_pairs or report.exact_groups) and data.given is None:
            findings.append(
                "A random train/validation split would put these copies on both sides and "
                "overstate accuracy: `graft train` keeps them on one side by default "
                "(--group-by none turns that off)."
            )
        audit_summary = report.to_dict(data.paths, data.root)
        if draw_examples(report, data.paths, data.labels, data.given, pairs_png, data.root):
            findings.append(f"Example pairs: {pairs_png}")
    if not args.json:
        from .console import print_scan

        print_scan(data, findings, audit_summary, plot)
        return 0
    summary = {
        "root": str(data.root),
        "layout": data.layout,  # "class folders", "split folders" or "labels csv"
        "layout_note": data.layout_note,
        "given_split": None
        if data.given is None
        else {s: data.given.count(s) for s in ("train", "val", "test")},
        "classes": data.classes,
        "counts": data.counts,
        "total": len(data.paths),
        "skipped": [{"path": str(p), "reason": r} for p, r in data.skipped],
        "unsupported": [str(p) for p in data.unsupported],
        "warnings": data.warnings,
        "plot": str(plot),
        "audit": audit_summary,
        "findings": findings,
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .progress import Reporter
    from .train import fit

    reporter = Reporter(verbose=not args.quiet)
    if args.quiet:  # "print only errors": library warnings (scikit-learn's) included
        import warnings

        warnings.simplefilter("ignore")
    if args.resume:
        config = _resume_config(args)
        result = fit(config, args.root, args.resume, reporter=reporter, resume=True)
    else:
        if not (args.root or args.labels_csv) or not args.out:
            raise UsageError(
                "graft train needs ROOT (or --labels-csv FILE) and --out DIR (or --resume RUN_DIR)."
            )
        config = config_from_args(args)
        result = fit(config, args.root, args.out, force=args.force, reporter=reporter)
    out = result.run_dir
    if not result.summary:  # a torchrun rank other than 0: rank 0 reports
        return 0
    reporter.info(
        f"Run folder: {out}\n  model        {out / 'model.safetensors'}\n"
        f"  curves       {out / 'learning_curves.png'}\n"
        f"  confusion    {out / 'confusion_matrix.png'}\n"
        f"  summary      {out / 'summary.json'}"
    )
    return 0


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    """The saved options of the run to resume; options given with --resume would be
    silently ignored, so they are refused (ROOT may be given: the data moved)."""
    run = Path(args.resume)
    saved = run / "config.json"
    if not saved.is_file():
        raise RunFolderError(
            f"Nothing to resume: {saved} does not exist. Start a run with "
            "`graft train ROOT --out DIR`."
        )
    if RunDir(run).finished:
        raise UsageError(
            f"{run} is a finished run: nothing to resume. To train it again, run "
            f"`graft train ROOT --out {shell_path(run)} --force`."
        )
    given = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, f.default) != f.default
    ]
    if args.out and Path(args.out).resolve() != run.resolve():
        given.insert(0, "--out")
    if args.force:
        given.insert(0, "--force")
    if given:
        raise UsageError(
            f"--resume continues {run} with the options it was started with; "
            f"{', '.join(given)} would be ignored. Drop them, or start a new run with --out."
        )
    from .io import read_json

    try:
        data = read_json(saved)
        if isinstance(data, dict):
            # a run from before the probe trained its head with Adam: resume it that way
            data.setdefault("head_solver", "adam")
        return TrainConfig.from_dict(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise RunFolderError(f"{saved} is damaged ({exc}); the run cannot be resumed.") from exc


def _warn_if_unfinished(command: str, run: str | Path) -> None:
    """A run folder whose training was interrupted holds its last kept epoch, not the
    finished model (no temperature, "unknown" thresholds or refit yet): say so before
    using it, as ``graft report`` does."""
    path = Path(run)
    if RunDir(path).unfinished:
        print(
            f"graft {command}: warning: {_display(path)} has no summary.json: its training did "
            "not finish, so this is its last kept epoch, not the finished model (no "
            "temperature, 'unknown' thresholds or refit yet). "
            f"`graft train --resume {shell_path(path)}` finishes it.",
            file=sys.stderr,
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .progress import Reporter

    if args.out:
        check_output_folder(args.out, "--out")
    _warn_if_unfinished("evaluate", args.run)

    result = evaluate_run(
        args.run,
        args.folder,
        args.out,
        Reporter(verbose=not args.json),
        tta=args.tta,
        data_root=args.data_root,
        others=args.others,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from .console import print_evaluation

        print_evaluation(result)
    # unreadable files of --others are skipped like unreadable test images: exit 7
    skipped = result["failed"] or result.get("others", {}).get("failed")
    return PARTIAL_FAILURE_EXIT if skipped else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .fast import open_predictor
    from .files import expand_inputs
    from .predictions import csv_header, csv_row

    if args.top_k < 1:
        raise UsageError("--top-k must be 1 or more.")
    if args.grid:
        check_output_file(args.grid, "--grid", ".png")
    paths = expand_inputs(args.paths)
    if not paths:
        raise UsageError("No images to predict: the folders given hold no image files.")
    _warn_if_unfinished("predict", args.run)
    predictor = open_predictor(
        args.run,
        tta=args.tta,
        workers=-1 if args.out else 0,
        unknown=args.unknown == "on",
        n_images=len(paths),
    )  # first: a missing run is the first thing to say
    if not any(p.exists() for p in paths):  # one missing among others is that file's error
        raise DataError(
            f"No images to predict: {', '.join(map(str, args.paths[:3]))}"
            f"{' ...' if len(args.paths) > 3 else ''} does not exist. Check the path."
        )
    if args.out:
        return _predict_to_file(args, predictor, paths)
    preds = predictor.predict(paths, args.top_k)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    elif args.csv:  # the columns of --out FILE.csv; names printable in the terminal
        k = min(args.top_k, len(predictor.classes))
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(csv_header(k))
        writer.writerows([_display(cell) for cell in csv_row(p, k)] for p in preds)
    else:
        from .console import print_predictions

        print_predictions(preds)
    if args.grid:
        _draw_grid(preds, predictor.classes, Path(args.grid))
    failed = [p for p in preds if p.error]
    if failed:
        print(
            f"{len(failed)} of {len(preds)} file(s) could not be read (listed above).",
            file=sys.stderr,
        )
        return PARTIAL_FAILURE_EXIT
    return 0


def _draw_grid(preds: Sequence[Any], classes: Sequence[str], path: Path) -> None:
    from .plots import plot_prediction_grid
    from .runtime import load_image

    items = []
    for p in preds:
        if not p.error:
            # A file in a folder named like a class is taken to be of that class.
            truth = Path(p.path).parent.name
            correct = (p.label == truth) if truth in classes else None
            best = f"{p.top[0][0]} {p.top[0][1]:.1%}"
            caption = f"unknown ({best})" if p.unknown else best
            items.append((load_image(p.path, 256), _short_name(p.path), caption, correct))
    if items:
        plot_prediction_grid(items, path)
        print(f"Grid: {path}", file=sys.stderr)


def _predict_to_file(args: argparse.Namespace, predictor: Any, paths: list[Path]) -> int:
    from .predictions import OUT_FORMATS, stream_predictions
    from .progress import Reporter

    out = Path(args.out)
    if out.suffix.lower() not in OUT_FORMATS:
        raise UsageError(f"--out {out}: use a .jsonl or .csv file name.")
    reporter = Reporter(verbose=True)
    from .files import file_sha256
    from .modelinfo import resolve_model_file

    weights = resolve_model_file(args.run)
    model = {
        "model": str(weights.resolve()),
        "weights_sha256": file_sha256(weights),
        "tta": bool(args.tta),
        "unknown": args.unknown,
    }
    with reporter.bar("Predicting", len(paths)) as advance:
        stats = stream_predictions(
            predictor, paths, out, args.top_k, args.batch_size, advance, model=model
        )
    if stats.skipped:
        print(
            f"{stats.skipped} image(s) were already in {_display(out)}: skipped.", file=sys.stderr
        )
    print(
        f"Wrote {stats.written} prediction(s) to {_display(out)} in {stats.seconds:.1f} s "
        f"({stats.per_second:.0f} images/s, {predictor.runner.name}).",
        file=sys.stderr,
    )
    if stats.failed_before:
        print(
            f"{stats.failed_before} of the skipped file(s) could not be read by the earlier "
            f"call (their rows in {_display(out)} say why); to try them again, delete those "
            "rows or write to a new --out.",
            file=sys.stderr,
        )
    if stats.failed:
        print(f"{stats.failed} file(s) could not be read (their rows say why).", file=sys.stderr)
    return PARTIAL_FAILURE_EXIT if stats.failed or stats.failed_before else 0


def _short_name(path: str, width: int = 28) -> str:
    name = _display(Path(path).name)
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-width // 2 :]


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import lr_find
    from .progress import Reporter

    config = config_from_args(args)
    config.check_paths()
    check_output_file(args.out, "--out", ".png")
    result = lr_find(args.root, config, args.out, reporter=Reporter(verbose=not args.json))
    if args.json:  # how many images it learned from, not their list
        print(json.dumps({**result, "train_images": len(result["train_images"])}, indent=2))
    else:
        print(
            f"Suggested learning rate for the head: {result['suggested_lr']:.1e} "
            f"(loss lowest at {result['min_loss_lr']:.1e}). Plot: {result['plot']}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    run = Path(args.run)
    if not RunDir(run).finished:
        raise RunFolderError(f"{run} has no summary.json: it is not a finished graft run.")
    if args.out:
        check_output_file(args.out, "--out", ".html")
    print(f"Report: {write_report(run, args.out)}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    if not args.quiet:
        _warn_if_unfinished("export", args.run)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr)

    if args.int8:
        say(
            "Quantizing to INT8: calibrating on up to 128 training images of the run, then "
            "comparing with fp32 on its held-out test split..."
        )
    out = export_run(
        args.run, args.format, args.out, args.force, int8=args.int8, data_root=args.data_root
    )
    for f in sorted(out.iterdir()):
        say(f"  {f.name:<20} {f.stat().st_size / 1e6:8.2f} MB")
    if args.int8:
        from .export import METADATA_FILE
        from .quantize import describe_agreement

        report = json.loads((out / METADATA_FILE).read_text())["int8"]
        say("\n".join(describe_agreement(report)))
    say(f"Exported {args.format}{' INT8' * args.int8}: {_display(out)}")
    say(f"Try it:  python {shell_path(out / 'graft_runtime.py')} {shell_path(out)} IMAGE")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .serve import ServeSettings, build_server, configure_logging, load_api_keys

    if args.max_mb <= 0 or args.max_files < 1 or args.top_k < 1:
        raise UsageError("--max-mb, --max-files and --top-k must be positive.")
    settings = ServeSettings(
        max_mb=args.max_mb,
        max_files=args.max_files,
        top_k=args.top_k,
        max_queue=args.max_queue,
        timeout_ms=args.timeout_ms,
        max_connections=args.max_connections,
    )
    configure_logging(args.log_format)  # every line on stderr in one format, from here on
    say = logging.getLogger("graft.serve").info
    keys = load_api_keys(args.api_key, args.api_key_file, os.environ.get("GRAFT_API_KEY"))
    _warn_if_unfinished("serve", args.source)
    say("Loading %s...", _display(Path(args.source)))
    # the model loads here; it warms up once the server listens (/readyz says when)
    server, sock = build_server(
        args.source,
        args.host,
        args.port,
        settings,
        unknown=args.unknown == "on",
        api_keys=keys,
        no_auth=args.no_auth,
        grace_s=args.grace_s,
        log_format=args.log_format,
    )
    say(
        "Serving %s on http://%s:%d/ (%s; API docs at /docs%s; SIGTERM or Ctrl+C stops)",
        _display(Path(args.source)),
        args.host,
        args.port,
        f"API key required, {len(keys)} accepted" if keys else "no API key",
        "; never answers unknown" if args.unknown == "off" else "",
    )
    with sock:
        server.run(sockets=[sock])
    return 0


COMMANDS = {
    "scan": cmd_scan,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "report": cmd_report,
    "lr-find": cmd_lr_find,
    "export": cmd_export,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._malloc import tune_malloc

    tune_malloc()  # where work starts, before torch allocates: see graft._malloc
    # `kill` or `timeout` (SIGTERM) unwinds like Ctrl+C, so a run stopped before its first
    # epoch removes what it wrote (graft.train) instead of leaving a half-made folder
    stopping.install()
    try:
        if os.environ.get("GRAFT_ENGINE"):  # a bad value is refused before any work
            from .inference import wanted_engine

            wanted_engine()
        return COMMANDS[args.command](args)
    except GraftError as exc:
        print(f"graft {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted(args)
    except BrokenPipeError:
        # Whoever read stdout went away (`graft evaluate RUN | head -1`): not a bug, and
        # nothing left to say. Exit as a process killed by SIGPIPE would, with stdout
        # pointed at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the machine's refusal (disk full, read-only...), not a bug
        message = os_error_message(exc)
        if message is None or os.environ.get("GRAFT_DEBUG"):
            return _bug(args.command, exc)
        print(f"graft {args.command}: error: {message}", file=sys.stderr)
        return SystemResourceError.exit_code
    except Exception as exc:  # a bug: say so in one line, keep the details
        if stopping.stop_requested() is not None:  # e.g. an import the signal cut short
            return _interrupted(args)
        return _bug(args.command, exc)
    finally:
        stopping.uninstall()


def _interrupted(args: argparse.Namespace) -> int:
    import signal

    if args.command == "serve" and stopping.stop_requested() == signal.SIGTERM:
        # a supervisor's stop while the model was still loading: as clean as a stop later
        print("graft serve: stopped (SIGTERM) before it began serving.", file=sys.stderr)
        return 0
    print(f"graft {args.command}: interrupted.{_how_to_continue(args)}", file=sys.stderr)
    return 130


def _how_to_continue(args: argparse.Namespace) -> str:
    """After an interrupted ``graft train``: whether finished epochs were kept, and the
    command that continues from them; after ``graft predict --out``, that the file is
    continued by the same command."""
    if args.command == "predict" and getattr(args, "out", None):
        return (
            f" The predictions written so far are kept in {_display(args.out)}; the same command "
            "continues it without repeating a row."
        )
    run = getattr(args, "resume", None) or getattr(args, "out", None)
    if args.command != "train" or not run:
        return ""
    folder = RunDir(Path(run))
    if folder.finished and not folder.report.is_file():
        # stopped while writing the report, the last step: the run itself is complete
        return (
            " The run finished; only its report is missing: "
            f"`graft report {shell_path(run)}` writes it."
        )
    if folder.finished:  # only --force reaches a finished run: it put that one back
        return (
            " Nothing of the new run was kept (it had no checkpoint yet); the run that "
            "--force was replacing is back in place, as it was."
        )
    if folder.checkpoint.is_file():
        return (
            f" Its finished epochs are kept: `graft train --resume {shell_path(run)}` continues it."
        )
    return (
        " Nothing was kept: no checkpoint had been written yet (the first comes after a "
        "finished epoch, or once stage 1's linear probe has solved its whole L2 path). Run "
        "the same command again."
    )


def _bug(command: str, exc: BaseException) -> int:
    if os.environ.get("GRAFT_DEBUG"):
        raise exc
    print(
        f"graft {command}: unexpected error: {type(exc).__name__}: {exc}\n"
        "This is a bug in graft; run again with GRAFT_DEBUG=1 to see the traceback and "
        "please report it.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
