"""The ``graft`` command line: the parser of every command and its options.

The options that shape a run are not written here: they are the fields of
:class:`graft.config.TrainConfig`, whose metadata holds each one's help, group and flag form
(:func:`add_config_options`, :func:`config_from_args`). Other options are checked by their
argparse type (:func:`whole`, :func:`positive`), so a bad value is exit 2 before any work.
Only light modules are imported here: ``graft --help`` never loads torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from typing import Any

from .config import GROUPS, TrainConfig

#: the TrainConfig fields ``graft scan`` and ``graft lr-find`` take (their library calls use
#: no others); ``graft train`` takes them all
SCAN_OPTIONS = (
    "labels_csv",
    "backbone",
    "weights",
    "allow_download",
    "img_size",
    "trim",
    "detail_size",
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
    "detail_size",
    "class_weights",
    "cache_dir",
    "batch_size",
)

#: ROOT of ``graft scan`` and ``graft train`` (graft.layouts)
ROOT_HELP = (
    "folder with one sub-folder per class, or already split: ROOT/train/<class>/ with "
    "val/ (valid/, validation/) and test/ optional, used as given (or give --labels-csv)"
)

# --------------------------------------------------------------------------- options


def whole(low: int, high: int) -> Any:
    """An argparse type: a whole number in [low, high] (a bad value is exit 2, before any
    work, with the range in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def positive(high: float) -> Any:
    """An argparse type: a finite number in (0, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= high:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{text} is not a number in (0, {high:g}]")
        return value

    return parse


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
        meta.setdefault("type", _value_type(field))  # an override's type (--backbone) wins
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
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    chosen = [fields[n] for n in names] if names is not None else list(fields.values())
    settings: dict[str, dict[str, Any]] = {"backbone": {"type": backbone_name, "metavar": "NAME"}}
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
    return {"backbone": {"type": backbone_name, "metavar": "NAME", "help": purpose}}


def backbone_name(text: str) -> str:
    """The argparse type of --backbone: graft's own names, 'auto' and any timm model name; a
    wrong name is refused with the closest ones (only names outside graft's own import
    timm). One function for every command, so that their options stay alike; 'auto' outside
    `graft train` is refused where the backbone is built."""
    from .backbones import backbone_problem

    problem = backbone_problem(text, auto=True)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="graft",
        description="Transfer learning for image classifiers.",
        epilog="Exit codes: 0 ok, 1 a bug in graft, 2 usage, 3 data, 4 weights, 5 run exists, "
        "6 bad run folder, 7 some files failed, 8 system refused (disk, permission, port), "
        "9 training diverged, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="check a dataset folder: counts, unreadable files, warnings")
    p.add_argument("root", nargs="?", help=ROOT_HELP)
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
    p.add_argument("root", nargs="?", help=ROOT_HELP)
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
        "--data-root",
        default=None,
        metavar="FOLDER",
        help="where the run's images are now, if its data folder moved",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (flip and crops); reports its effect",
    )
    p.add_argument(
        "--others",
        default=None,
        metavar="DIR",
        help="images of none of the classes (any layout): how well 'unknown' rejects them "
        "(AUROC, false positives at 95%% true positives, share rejected)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "lr-find",
        help="plot loss against learning rate and suggest one",
        description="Train the head on cached features of the training images (the split "
        "graft train would make: the folder's own train/ when it came split) while the "
        "learning rate grows, and suggest one.",
    )
    p.add_argument(
        "root", help="folder with one sub-folder per class, or train/ (val/, test/) of them"
    )
    p.add_argument("--out", default="lr_find.png", help="the plot (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the curve and suggestion as JSON")
    add_config_options(
        p, LR_FIND_OPTIONS, _backbone_for("backbone whose frozen features the head learns on")
    )

    p = sub.add_parser("report", help="write the run's self-contained HTML report")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument("--out", default=None, help="where to write it (default: RUN/report.html)")

    _add_predict_parser(sub)

    _add_export_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write the model as ONNX, OpenVINO or TorchScript")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "openvino", "torchscript"],
        help="model format (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="export folder (default: RUN/export-FORMAT[-int8])")
    p.add_argument("--force", action="store_true", help="replace an existing export in --out")
    p.add_argument(
        "--int8",
        action="store_true",
        help="onnx/openvino: quantize to INT8, calibrated on the run's training images; its "
        "agreement with fp32 on the held-out split is printed and kept in graft.json",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="with --int8: where the run's images are now, if they moved since training",
    )
    p.add_argument("--quiet", action="store_true", help="print only errors")


def _add_unknown_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--unknown",
        choices=["on", "off"],
        default="on",
        help="'off' answers every image with its top class, never 'unknown' (default: on)",
    )


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page for a run or an export folder")
    p.add_argument("source", help="run folder (graft train) or export folder (graft export)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=whole(1, 65535), default=8000, help="port (default: %(default)s)")
    p.add_argument(
        "--max-mb",
        type=positive(1000),
        default=20.0,
        help="largest image accepted, in MB (default: 20)",
    )
    p.add_argument(
        "--max-files", type=whole(1, 256), default=16, help="most images per request (default: 16)"
    )
    p.add_argument(
        "--top-k", type=whole(1, 1000), default=3, help="classes returned per image (default: 3)"
    )
    _add_unknown_option(p)
    auth = p.add_argument_group("authentication (required to listen beyond this machine)")
    auth.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept requests carrying 'Authorization: Bearer KEY' (repeat for several; "
        "other users of this machine can see it in the process list: prefer the file or "
        "GRAFT_API_KEY, comma-separated keys)",
    )
    auth.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="accept the keys in FILE, one per line (# comments)",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="listen on a non-loopback --host without a key, accepting the risk (e.g. behind "
        "a proxy that authenticates)",
    )
    load = p.add_argument_group("load and shutdown")
    load.add_argument(
        "--max-queue",
        type=whole(1, 100_000),
        default=128,
        help="images waiting for the model; beyond, 503 with Retry-After (default: 128)",
    )
    load.add_argument(
        "--timeout-ms",
        type=positive(3_600_000),
        default=10_000.0,
        help="deadline of a request once its body is in; past it, 503 with Retry-After "
        "(default: 10000)",
    )
    load.add_argument(
        "--grace-s",
        type=positive(3600),
        default=20.0,
        help="on SIGTERM, seconds requests in progress get to finish (default: 20)",
    )
    load.add_argument(
        "--max-connections",
        type=whole(1, 100_000),
        default=256,
        help="open connections; a request beyond gets 503 with Retry-After (default: 256)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="one line per request and message on stderr, as text or JSON (default: text)",
    )


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify images")
    p.add_argument("run", help="run folder made by `graft train`")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument(
        "--top-k",
        type=whole(1, 100_000),
        default=3,
        help="classes listed per image (default: %(default)s)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="average over flipped and cropped views (slower, often steadier)",
    )
    _add_unknown_option(p)
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
        type=whole(1, 65536),
        default=64,
        help="images per model call with --out (default: %(default)s)",
    )
    p.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="also draw the images with their top class and probability",
    )
