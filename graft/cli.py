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

Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 data, 4 weights, 5 run folder exists,
6 run folder incomplete, 7 partial failure (some files could not be read), 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import GROUPS, TrainConfig
from .errors import PARTIAL_FAILURE_EXIT, GraftError, RunFolderError, UsageError
from .io import display as _display

#: the TrainConfig fields ``graft scan`` and ``graft lr-find`` take (their library calls use
#: no others); ``graft train`` takes them all
SCAN_OPTIONS = (
    "backbone",
    "weights",
    "allow_download",
    "img_size",
    "trim",
    "dup_threshold",
    "cache_dir",
)
LR_FIND_OPTIONS = (
    "backbone",
    "weights",
    "pretrained",
    "allow_download",
    "img_size",
    "head",
    "dropout",
    "test_size",
    "val_size",
    "seed",
    "trim",
    "class_weights",
    "cache_dir",
    "batch_size",
)

# --------------------------------------------------------------------------- options


def _value_type(field: dataclasses.Field) -> Any:
    """``int`` for ``img_size: int``, ``float`` for ``fine_tune_head_lr: float | None``."""
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_field(target: Any, field: dataclasses.Field, override: dict[str, Any]) -> None:
    """One TrainConfig field as an option of ``target`` (a parser or an argument group)."""
    meta = {k: v for k, v in field.metadata.items() if k not in ("group", "flag", "shortcut")}
    meta.update(override)
    text = meta.pop("help").replace("%", "%%")
    flag, shortcut = field.metadata["flag"], field.metadata["shortcut"]
    name = "--" + field.name.replace("_", "-")
    if isinstance(field.default, bool) and flag:  # --no-pretrained, --offline
        action: Any = "store_const"
        meta.update(const=not field.default)
        name = flag
    elif isinstance(field.default, bool):  # --trim/--no-trim
        action = argparse.BooleanOptionalAction
    else:
        action = "store"
        meta["type"] = _value_type(field)
    if field.default not in (None, "") and not flag and "(default:" not in text:
        text += " (default: %(default)s)"
    target.add_argument(
        name, dest=field.name, action=action, default=field.default, help=text, **meta
    )
    if shortcut:  # --no-cache: another way to set the same field
        option, value, about = shortcut
        target.add_argument(option, dest=field.name, action="store_const", const=value, help=about)


def add_config_options(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Add TrainConfig fields (all, or those in ``names``) as options, under the groups their
    metadata names; ``overrides`` replaces a field's argparse settings (``{"backbone":
    {"help": ...}}``). Names, types, defaults and help all come from the field."""
    # Imported here, not at module level: the --backbone choices are the registry's names.
    from .backbones import BACKBONES

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    chosen = [fields[n] for n in names] if names is not None else list(fields.values())
    settings = {"backbone": {"choices": [*BACKBONES, "auto"]}}
    for name, extra in (overrides or {}).items():
        settings[name] = {**settings.get(name, {}), **extra}
    for group in GROUPS:
        members = [f for f in chosen if f.metadata["group"] == group]
        if members:
            target = parser.add_argument_group(group)
            for f in members:
                _add_field(target, f, settings.get(f.name, {}))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that parsed options describe (validated); fields the command has no
    option for keep their defaults. Every option's ``dest`` is its field's name, flag forms
    included (``--no-pretrained`` stores ``pretrained=False``, ``--no-cache`` ``cache_dir=""``)."""
    names = (f.name for f in dataclasses.fields(TrainConfig))
    return TrainConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def _backbone_for(purpose: str) -> dict[str, dict[str, Any]]:
    """--backbone for scan and lr-find: one named backbone ('auto' is train's alone)."""
    from .backbones import BACKBONES

    return {"backbone": {"choices": list(BACKBONES), "help": purpose}}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="graft",
        description="Transfer learning for image classifiers.",
        epilog="Exit codes: 0 ok, 2 usage, 3 data, 4 weights, 5 run exists, 6 bad run folder, "
        "7 some files failed, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="check a dataset folder: counts, unreadable files, warnings")
    p.add_argument("root", help="folder with one sub-folder per class")
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="where to save the class-count bar chart (default: ./<root>_class_counts.png)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-audit", action="store_true", help="skip the duplicate audit (no backbone needed)"
    )
    add_config_options(p, SCAN_OPTIONS, _backbone_for("backbone whose features compare images"))

    p = sub.add_parser("train", help="train and fine-tune a classifier")
    p.add_argument("root", nargs="?", help="folder with one sub-folder per class")
    p.add_argument("--out", help="run folder to create")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last finished epoch (options and split "
        "come from the run folder)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    add_config_options(p)

    p = sub.add_parser("evaluate", help="metrics on the held-out split or a labelled folder")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument(
        "folder",
        nargs="?",
        default=None,
        help="labelled folder to evaluate on (default: the run's test split)",
    )
    p.add_argument("--out", default=None, help="where to write evaluation.json and the plot")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (flip and crops); reports its effect",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("lr-find", help="plot loss against learning rate and suggest one")
    p.add_argument("root", help="folder with one sub-folder per class")
    p.add_argument("--out", default="lr_find.png", help="the plot (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the curve and suggestion as JSON")
    add_config_options(
        p, LR_FIND_OPTIONS, _backbone_for("backbone whose frozen features the head learns on")
    )

    p = sub.add_parser("report", help="write the run's self-contained HTML report")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument("--out", default=None, help="where to write it (default: RUN/report.html)")

    _add_predict_parser(sub)

    p = sub.add_parser("export", help="write the model as ONNX, OpenVINO or TorchScript")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "openvino", "torchscript"],
        help="model format (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="export folder (default: RUN/export-FORMAT)")
    p.add_argument("--force", action="store_true", help="replace an existing export in --out")

    p = sub.add_parser("serve", help="HTTP API and web page for a run or an export folder")
    p.add_argument("source", help="run folder (graft train) or export folder (graft export)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument(
        "--max-mb", type=float, default=20.0, help="largest image accepted, in MB (default: 20)"
    )
    p.add_argument(
        "--max-files", type=int, default=16, help="most images per request (default: 16)"
    )
    p.add_argument("--top-k", type=int, default=3, help="classes returned per image (default: 3)")
    return parser


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify images")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument(
        "--top-k", type=int, default=3, help="classes listed per image (default: %(default)s)"
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="average over flipped and cropped views (slower, often steadier)",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV (the columns of --out FILE.csv)")
    fmt.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="stream results to FILE (.jsonl or .csv) as they are computed; run again with "
        "the same FILE to continue after an interruption",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per model call with --out (default: %(default)s)",
    )
    p.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="also draw the images with their top class and probability",
    )


# --------------------------------------------------------------------------- commands


def cmd_scan(args: argparse.Namespace) -> int:
    from .data import scan
    from .plots import plot_class_counts
    from .progress import Reporter

    config = config_from_args(args)  # validates the options before any work
    reporter = Reporter(verbose=not args.json)
    data = scan(args.root, progress=reporter.iter)
    plot = Path(args.plot or f"{Path(data.root).name}_class_counts.png")
    plot_class_counts(data.counts, plot)
    findings: list[str] = []
    audit_summary = None
    pairs_png = plot.with_name(plot.stem.replace("_class_counts", "") + "_duplicates.png")
    if not args.no_audit:
        from .audit import audit_dataset, draw_examples, explain

        report = audit_dataset(data, config, reporter=reporter)
        findings = explain(report, data.classes, data.labels, data.paths)
        if report.near_pairs or report.exact_groups:
            findings.append(
                "A random train/validation split would put these copies on both sides and "
                "overstate accuracy: `graft train` keeps them on one side by default "
                "(--group-by none turns that off)."
            )
        audit_summary = report.to_dict(data.paths, data.root)
        if draw_examples(report, data.paths, data.labels, None, pairs_png, data.root):
            findings.append(f"Example pairs: {pairs_png}")
    if not args.json:
        from .console import print_scan

        print_scan(data, findings, audit_summary, plot)
        return 0
    summary = {
        "root": str(data.root),
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
    if args.resume:
        from .io import read_json

        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise RunFolderError(
                f"Nothing to resume: {saved} does not exist. Start a run with "
                "`graft train ROOT --out DIR`."
            )
        config = TrainConfig.from_dict(read_json(saved))
        result = fit(config, args.root, args.resume, reporter=reporter, resume=True)
    else:
        if not args.root or not args.out:
            raise UsageError("graft train needs ROOT and --out DIR (or --resume RUN_DIR).")
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .progress import Reporter

    result = evaluate_run(
        args.run, args.folder, args.out, Reporter(verbose=not args.json), tta=args.tta
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from .console import print_evaluation

        print_evaluation(result)
    return PARTIAL_FAILURE_EXIT if result["failed"] else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import Predictor, csv_header, csv_row, expand_inputs

    if args.top_k < 1:
        raise UsageError("--top-k must be 1 or more.")
    paths = expand_inputs(args.paths)
    if not paths:
        raise UsageError("No images to predict: the folders given hold no image files.")
    predictor = Predictor.from_run(args.run, tta=args.tta, workers=-1 if args.out else 0)
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
    from .data import load_image
    from .plots import plot_prediction_grid

    items = []
    for p in preds:
        if not p.error:
            # A file in a folder named like a class is taken to be of that class.
            truth = Path(p.path).parent.name
            correct = (p.label == truth) if truth in classes else None
            caption = f"{p.label} {p.top[0][1]:.1%}"
            items.append((load_image(p.path, 256), _short_name(p.path), caption, correct))
    if items:
        plot_prediction_grid(items, path)
        print(f"Grid: {path}", file=sys.stderr)


def _predict_to_file(args: argparse.Namespace, predictor: Any, paths: list[Path]) -> int:
    from .predict import stream_predictions
    from .progress import Reporter

    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".ndjson", ".csv"):
        raise UsageError(f"--out {out}: use a .jsonl or .csv file name.")
    reporter = Reporter(verbose=True)
    with reporter.bar("Predicting", len(paths)) as advance:
        stats = stream_predictions(predictor, paths, out, args.top_k, args.batch_size, advance)
    if stats.skipped:
        print(
            f"{stats.skipped} image(s) were already in {_display(out)}: skipped.", file=sys.stderr
        )
    print(
        f"Wrote {stats.written} prediction(s) to {_display(out)} in {stats.seconds:.1f} s "
        f"({stats.per_second:.0f} images/s, {predictor.runner.name}).",
        file=sys.stderr,
    )
    if stats.failed:
        print(f"{stats.failed} file(s) could not be read (their rows say why).", file=sys.stderr)
        return PARTIAL_FAILURE_EXIT
    return 0


def _short_name(path: str, width: int = 28) -> str:
    name = _display(Path(path).name)
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-width // 2 :]


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import lr_find
    from .progress import Reporter

    config = config_from_args(args)
    result = lr_find(args.root, config, args.out, reporter=Reporter(verbose=not args.json))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"Suggested learning rate for the head: {result['suggested_lr']:.1e} "
            f"(loss lowest at {result['min_loss_lr']:.1e}). Plot: {result['plot']}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    run = Path(args.run)
    if not (run / "summary.json").is_file():
        raise RunFolderError(f"{run} has no summary.json: it is not a finished graft run.")
    print(f"Report: {write_report(run, args.out)}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run, args.format, args.out, force=args.force)
    for f in sorted(out.iterdir()):
        print(f"  {f.name:<20} {f.stat().st_size / 1e6:8.2f} MB", file=sys.stderr)
    print(f"Exported {args.format}: {_display(out)}", file=sys.stderr)
    print(
        f"Try it:  python {_display(out / 'graft_runtime.py')} {_display(out)} IMAGE",
        file=sys.stderr,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeSettings, serve

    if args.max_mb <= 0 or args.max_files < 1 or args.top_k < 1:
        raise UsageError("--max-mb, --max-files and --top-k must be positive.")
    settings = ServeSettings(max_mb=args.max_mb, max_files=args.max_files, top_k=args.top_k)
    print(
        f"Serving {_display(Path(args.source))} on http://{args.host}:{args.port}/ "
        f"(API docs at /docs; Ctrl+C stops)",
        file=sys.stderr,
    )
    serve(args.source, args.host, args.port, settings)
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
    try:
        return COMMANDS[args.command](args)
    except GraftError as exc:
        print(f"graft {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"graft {args.command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the details
        if os.environ.get("GRAFT_DEBUG"):
            raise
        print(
            f"graft {args.command}: unexpected error: {type(exc).__name__}: {exc}\n"
            "This is a bug in graft; run again with GRAFT_DEBUG=1 to see the traceback and "
            "please report it.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
