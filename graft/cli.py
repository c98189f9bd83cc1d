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

Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 data, 4 weights, 5 run folder exists,
6 run folder incomplete, 7 partial failure (some files could not be read), 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import PARTIAL_FAILURE_EXIT, GraftError, RunFolderError, UsageError
from .io import display as _display


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .backbones import BACKBONES
    from .config import TrainConfig

    d = TrainConfig.__dataclass_fields__

    def default(name: str) -> object:
        return d[name].default

    m = p.add_argument_group("model")
    m.add_argument(
        "--backbone",
        default=default("backbone"),
        choices=[*BACKBONES, "auto"],
        help="pretrained CNN to graft onto (default: %(default)s); 'auto' compares every "
        "backbone with weights on this machine by a linear probe on validation and keeps the best",
    )
    m.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="local weights file for the backbone (.pth or .safetensors)",
    )
    m.add_argument(
        "--no-pretrained",
        action="store_true",
        help="start from random weights on purpose (no ImageNet knowledge)",
    )
    m.add_argument(
        "--offline",
        action="store_true",
        help="never download weights; fail with instructions instead",
    )
    m.add_argument(
        "--img-size",
        type=int,
        default=default("img_size"),
        help="input size in pixels (default: %(default)s, as in the seed)",
    )
    m.add_argument(
        "--head",
        default=default("head"),
        help="'linear' (pool, dropout, linear) or 'dense:N' like the seed's Dense(256)",
    )
    m.add_argument("--dropout", type=float, default=default("dropout"))
    s = p.add_argument_group("data")
    s.add_argument(
        "--test-size",
        type=float,
        default=default("test_size"),
        help="fraction held out for the final test (default: %(default)s)",
    )
    s.add_argument(
        "--val-size",
        type=float,
        default=default("val_size"),
        help="fraction used for early stopping and model selection (default: %(default)s)",
    )
    s.add_argument("--seed", type=int, default=default("seed"))
    s.add_argument(
        "--group-by",
        default=None,
        metavar="REGEX|auto|none",
        help="keep related images on one side of the split: a regex on each file's path "
        "relative to ROOT (group = first capture group or the whole match), 'auto' for "
        "near-duplicate clusters (the default when the audit finds any), or 'none' to split "
        "image by image",
    )
    s.add_argument("--groups-csv", default=None, metavar="CSV", help="CSV with columns path,group")
    s.add_argument(
        "--dup-threshold",
        type=float,
        default=default("dup_threshold"),
        help="cosine similarity of backbone features above which two images count as "
        "near-duplicates (default: %(default)s)",
    )
    s.add_argument(
        "--group-threshold",
        type=float,
        default=default("group_threshold"),
        help="the loosest similarity at which the default split keeps images together; "
        "stricter rungs up to --dup-threshold are tried when its clusters are too coarse to "
        "split (default: %(default)s)",
    )
    s.add_argument(
        "--augment",
        default=default("augment"),
        choices=["none", "light", "strong", "domain"],
        help="training-image augmentation (default: %(default)s); 'domain' adds grayscale, "
        "blur, stronger crops and colour, and pixel-art (nearest) vs smooth resizing, for "
        "images from elsewhere",
    )
    s.add_argument(
        "--trim",
        action=argparse.BooleanOptionalAction,
        default=default("trim"),
        help="crop a uniform background around the object before resizing, in training and "
        "prediction alike (default: %(default)s)",
    )
    s.add_argument(
        "--views",
        type=int,
        default=default("views"),
        help="augmented views per training image cached for the frozen stage",
    )
    s.add_argument(
        "--class-weights",
        default=default("class_weights"),
        choices=["auto", "none"],
        help="auto: inverse-frequency loss weights when classes differ by >2x",
    )
    s.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where cached backbone features are kept and reused (default: ~/.cache/graft)",
    )
    s.add_argument("--no-cache", action="store_true", help="keep backbone features in memory only")
    s.add_argument(
        "--workers",
        type=int,
        default=default("workers"),
        help="image-decoding processes (default: chosen from the CPU count)",
    )
    t = p.add_argument_group("stage 1: frozen backbone")
    t.add_argument("--epochs", type=int, default=default("epochs"))
    t.add_argument("--batch-size", type=int, default=default("batch_size"))
    t.add_argument("--lr", type=float, default=default("lr"))
    t.add_argument("--optimizer", default=default("optimizer"), choices=["adam", "adamw"])
    t.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    f = p.add_argument_group("stage 2: fine-tuning")
    f.add_argument("--fine-tune-epochs", type=int, default=default("fine_tune_epochs"))
    f.add_argument("--fine-tune-lr", type=float, default=default("fine_tune_lr"))
    f.add_argument("--fine-tune-batch-size", type=int, default=default("fine_tune_batch_size"))
    f.add_argument(
        "--unfreeze",
        default=default("unfreeze"),
        help="'all', or how many of the backbone's last blocks to train (default: %(default)s)",
    )
    f.add_argument(
        "--fine-tune-head-lr",
        type=float,
        default=None,
        help="the head's learning rate in stage 2 (default: 10x --fine-tune-lr)",
    )
    f.add_argument(
        "--l2sp",
        type=float,
        default=default("l2sp"),
        help="pull fine-tuned weights toward their pretrained values with this strength "
        "(L2-SP; e.g. 0.01; default: off)",
    )
    f.add_argument(
        "--unknown-precision",
        type=float,
        default=default("unknown_precision"),
        help="answer 'unknown' below the confidence at which validation predictions are right "
        "this often (default: %(default)s; 0 = always answer)",
    )
    f.add_argument(
        "--patience",
        type=int,
        default=default("patience"),
        help="early stopping: epochs without a better validation loss (0 = off)",
    )
    f.add_argument(
        "--min-delta",
        type=float,
        default=default("min_delta"),
        help="early stopping: a drop in validation loss smaller than this is no progress "
        "(default: %(default)s; the kept epoch is still the lowest loss)",
    )
    o = p.add_argument_group("tracking")
    o.add_argument(
        "--unseen",
        default=None,
        metavar="DIR",
        help="labelled folder from another source (like the seed's internet images): "
        "evaluated after every epoch and at the end, reported apart from the in-domain figures",
    )
    o.add_argument(
        "--track",
        default="",
        metavar="mlflow,tensorboard",
        help="also log config, epochs, metrics and artifacts to MLflow (./mlruns or "
        "$MLFLOW_TRACKING_URI) and/or TensorBoard (RUN/tensorboard)",
    )


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--dup-threshold",
        type=float,
        default=0.95,
        help="cosine similarity for near-duplicates (default: %(default)s)",
    )
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="backbone whose features compare images (default: %(default)s)",
    )
    p.add_argument("--img-size", type=int, default=128)

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
    _add_train_options(p)

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
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, metavar="PATH")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--head", default="linear")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="lr_find.png", help="the plot (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the curve and suggestion as JSON")

    p = sub.add_parser("report", help="write the run's self-contained HTML report")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument("--out", default=None, help="where to write it (default: RUN/report.html)")

    p = sub.add_parser("predict", help="classify images")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--tta",
        action="store_true",
        help="average over flipped and cropped views (slower, often steadier)",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    fmt.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="stream results to FILE (.jsonl or .csv) as they are computed; run again with "
        "the same FILE to continue after an interruption",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="also draw the images with their top class and probability",
    )

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


# --------------------------------------------------------------------------- commands


def cmd_scan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .data import scan
    from .plots import plot_class_counts
    from .progress import Reporter

    reporter = Reporter(verbose=not args.json)
    data = scan(args.root, progress=reporter.iter)
    plot = Path(args.plot or f"{Path(data.root).name}_class_counts.png")
    plot_class_counts(data.counts, plot)
    findings: list[str] = []
    audit_summary = None
    pairs_png = plot.with_name(plot.stem.replace("_class_counts", "") + "_duplicates.png")
    if not args.no_audit:
        from .audit import audit_dataset, draw_examples, explain

        report = audit_dataset(
            data, args.backbone, args.img_size, args.dup_threshold, reporter=reporter
        )
        findings = explain(report, data.classes, data.labels, data.paths)
        if report.near_pairs or report.exact_groups:
            findings.append(
                "A random train/validation split would put these copies on both sides and "
                "overstate accuracy: train with --group-by auto (or --group-by REGEX)."
            )
        audit_summary = report.to_dict(data.paths, data.root)
        if draw_examples(report, data.paths, data.labels, None, pairs_png, data.root):
            findings.append(f"Example pairs: {pairs_png}")
    if args.json:
        print(
            json.dumps(
                {
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
                },
                indent=2,
            )
        )
        return 0
    console = Console()
    table = Table(title=f"{data.root}")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    total = len(data.paths)
    for name, n in data.counts.items():
        table.add_row(name, str(n), f"{n / total:.1%}")
    table.add_row("[bold]total", f"[bold]{total}", "")
    console.print(table)
    if data.skipped:
        console.print(f"[yellow]{len(data.skipped)} file(s) could not be decoded and are left out:")
        for p, reason in data.skipped:
            console.print(f"  {display(p)}: {display(reason)}")
    if data.unsupported:
        console.print(f"{len(data.unsupported)} file(s) with unsupported extensions ignored.")
    for w in data.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    for f in findings:
        console.print(f"[yellow]audit:[/] {display(f)}")
    if audit_summary is not None and not findings:
        console.print("audit: no duplicates or near-duplicates found.")
    console.print(f"Bar chart: {plot}")
    return 0


def _config_from_args(args: argparse.Namespace) -> object:
    from .config import TrainConfig

    return TrainConfig(
        backbone=args.backbone,
        weights=args.weights,
        pretrained=not args.no_pretrained,
        img_size=args.img_size,
        head=args.head,
        dropout=args.dropout,
        test_size=args.test_size,
        val_size=args.val_size,
        seed=args.seed,
        augment=args.augment,
        views=args.views,
        class_weights=args.class_weights,
        workers=args.workers,
        group_by=args.group_by,
        groups_csv=args.groups_csv,
        dup_threshold=args.dup_threshold,
        group_threshold=args.group_threshold,
        cache_dir="" if args.no_cache else args.cache_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_lr=args.fine_tune_lr,
        fine_tune_batch_size=args.fine_tune_batch_size,
        unfreeze=args.unfreeze,
        patience=args.patience,
        min_delta=args.min_delta,
        unknown_precision=args.unknown_precision,
        allow_download=not args.offline,
        track=args.track,
        unseen=args.unseen,
        trim=args.trim,
        fine_tune_head_lr=args.fine_tune_head_lr,
        l2sp=args.l2sp,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .progress import Reporter
    from .train import fit

    reporter = Reporter(verbose=not args.quiet)
    if args.resume:
        from .config import TrainConfig
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
        config = _config_from_args(args)
        result = fit(config, args.root, args.out, force=args.force, reporter=reporter)  # type: ignore[arg-type]
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
    from rich.console import Console
    from rich.table import Table

    from .evaluate import evaluate_run
    from .progress import Reporter

    result = evaluate_run(
        args.run, args.folder, args.out, Reporter(verbose=not args.json), tta=args.tta
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = Console()
        lo, hi = result["accuracy_ci95"]
        table = Table(
            title=f"{result['data']}: accuracy {result['accuracy']:.1%} "
            f"(95% CI {lo:.1%}-{hi:.1%}) on {result['n']} images, loss {result['loss']:.3f}, "
            f"calibration error {result['calibration']['ece']:.3f}",
            title_justify="left",
        )
        for col in ("class", "precision", "recall", "recall 95% CI", "F1", "support"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for name, m in result["per_class"].items():
            table.add_row(
                name,
                f"{m['precision']:.3f}",
                f"{m['recall']:.3f}",
                f"{m['recall_ci95'][0]:.2f}-{m['recall_ci95'][1]:.2f}",
                f"{m['f1']:.3f}",
                str(m["support"]),
            )
        console.print(table)
        if "tta_effect" in result:
            t = result["tta_effect"]
            console.print(
                f"TTA: accuracy {t['accuracy_without']:.1%} -> {t['accuracy_with']:.1%}, "
                f"loss {t['loss_without']:.3f} -> {t['loss_with']:.3f}"
            )
        o = result["open_set"]
        if o["threshold"] > 0:
            console.print(
                f"Open set: below {o['threshold']:.1%} confidence the answer is "
                f"'unknown': {o['coverage']:.1%} answered, "
                f"{o['answered_accuracy']:.1%} of those right."
            )
        for c in result["most_confused"]:
            console.print(f"confused: {c['true']} taken for {c['predicted']} ({c['count']}x)")
        for f in result["failed"]:
            console.print(f"[yellow]skipped[/] {display(f['path'])}: {display(f['reason'])}")
        console.print(f"Confusion matrix: {Path(result['output_dir']) / 'confusion_matrix.png'}")
    return PARTIAL_FAILURE_EXIT if result["failed"] else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .predict import Predictor, expand_inputs

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
    elif args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        k = min(args.top_k, len(predictor.classes))
        header = ["path", "error"]
        for i in range(1, k + 1):
            header += [f"class_{i}", f"probability_{i}"]
        writer.writerow(header)
        for p in preds:
            row = [_display(p.path), _display(p.error or "")]
            for c, prob in p.top:
                row += [c, f"{prob:.6f}"]
            writer.writerow(row)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        table.add_column("image", overflow="fold", ratio=3)
        table.add_column("prediction", no_wrap=True)
        table.add_column("next classes", ratio=2)
        for p in preds:
            if p.error:
                table.add_row(display(p.path), "[red]error", display(p.error))
            else:
                table.add_row(
                    display(p.path),
                    (
                        f"unknown (best {p.top[0][0]} {p.top[0][1]:.1%})"
                        if p.unknown
                        else f"{p.top[0][0]} {p.top[0][1]:.1%}"
                    ),
                    ", ".join(f"{c} {q:.1%}" for c, q in p.top[1:]),
                )
        Console().print(table)
    if args.grid:
        from .data import load_image
        from .plots import plot_prediction_grid

        items = []
        for p in preds:
            if not p.error:
                # A file in a folder named like a class is taken to be of that class.
                truth = Path(p.path).parent.name
                correct = (p.label == truth) if truth in predictor.classes else None
                caption = f"{p.label} {p.top[0][1]:.1%}"
                items.append((load_image(p.path, 256), _short_name(p.path), caption, correct))
        if items:
            plot_prediction_grid(items, Path(args.grid))
            print(f"Grid: {args.grid}", file=sys.stderr)
    failed = [p for p in preds if p.error]
    if failed:
        print(
            f"{len(failed)} of {len(preds)} file(s) could not be read (listed above).",
            file=sys.stderr,
        )
        return PARTIAL_FAILURE_EXIT
    return 0


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


def display(text: object) -> str:
    """Printable in the terminal: non-UTF-8 bytes replaced, rich markup characters escaped."""
    from rich.markup import escape

    return escape(_display(text))


def _short_name(path: str, width: int = 28) -> str:
    name = _display(Path(path).name)
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-width // 2 :]


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .lr_find import lr_find
    from .progress import Reporter

    config = TrainConfig(
        backbone=args.backbone,
        weights=args.weights,
        img_size=args.img_size,
        batch_size=args.batch_size,
        head=args.head,
        seed=args.seed,
    )
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
