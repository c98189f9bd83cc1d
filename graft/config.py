"""One configuration object for a training run.

``TrainConfig`` flows unchanged from the CLI (or the library facade) to the trainer and is
written to the run folder as ``config.json``, so a run always says exactly how it was made.
Validation lives here, once, with messages that say which option is wrong and what is allowed.

Each field also carries its command-line description (help, group, and where needed choices,
metavar and a flag form) in its metadata: ``graft.cli`` builds ``graft train``, ``graft scan``
and ``graft lr-find`` from it, so an option's default and meaning are written once, here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

AUGMENTS = ("none", "light", "strong", "domain")
OPTIMIZERS = ("adam", "adamw")
#: --head-solver: how stage 1 fits the head (graft.probe)
HEAD_SOLVERS = ("auto", "probe", "adam")
#: --schedule (graft.schedule.SCHEDULES)
SCHEDULES = ("constant", "cosine", "onecycle")
#: --unknown-reference: what sets the "unknown" threshold when there are no --unseen images
UNKNOWN_REFERENCES = ("augmented", "validation")
CLASS_WEIGHTS = ("auto", "none")
#: the option groups of ``graft train --help``, in the order they are listed
GROUPS = (
    "model",
    "data",
    "stage 1: frozen backbone",
    "stage 2: fine-tuning",
    "both stages",
    "after training",
    "tracking",
)


def option(
    default: Any,
    help: str,
    group: str,
    *,
    flag: str | None = None,
    shortcut: tuple[str, Any, str] | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A field with its command-line description in ``metadata``.

    The option is ``--field-name`` with the field's type and default, under ``group``.
    ``flag`` names a switch instead (a bool field: ``--no-pretrained`` stores ``not
    default``); a bool field without one is ``--name/--no-name``. ``shortcut`` is an extra
    option ``(flag, value, help)`` that stores ``value`` in the same field (``--no-cache``
    stores ``""``). ``argparse_kwargs`` (choices, metavar) go to ``add_argument``.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    meta = {"help": help, "group": group, "flag": flag, "shortcut": shortcut, **argparse_kwargs}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every choice that shapes a training run. Defaults follow the seed workflow."""

    # --- model
    backbone: str = option(
        "efficientnet_lite0",
        "pretrained network to graft onto: efficientnet_lite0/1/2, vgg16, any timm model name "
        "(convnext_tiny, resnet50.a1_in1k, vit_small_patch14_dinov2.lvd142m, ...), or 'auto': "
        "compare every backbone with weights on this machine by a linear probe on validation",
        "model",
    )
    weights: str | None = option(
        None,
        "local weights file for the backbone (.pth or .safetensors) (default: the backbone's "
        "usual source: its package, the torch or Hugging Face cache, or a download)",
        "model",
        metavar="PATH",
    )
    pretrained: bool = option(
        True,
        "start from random weights on purpose (no ImageNet knowledge)",
        "model",
        flag="--no-pretrained",
    )
    img_size: int = option(128, "input size in pixels, as in the seed's 128x128", "model")
    head: str = option(
        "linear",
        "'linear' (pool, dropout, linear) or 'dense:N' (linear N, ReLU, dropout, linear) like "
        "the seed's Dense(256)",
        "model",
        metavar="linear|dense:N",
    )
    dropout: float = option(0.2, "dropout before the head's last linear layer", "model")
    # --- data
    labels_csv: str | None = option(
        None,
        "CSV listing the images instead of a ROOT folder: a header row with the columns "
        "path,label and optionally split (train/val/test: used as given); paths relative to "
        "the CSV's folder, or absolute. Bad rows are listed and left out",
        "data",
        metavar="CSV",
    )
    test_size: float = option(
        0.2,
        "fraction held out for the final test, touched once at the end (graft evaluate uses "
        "the same files); for a dataset that came split without a test part, the share of "
        "its training images carved for it",
        "data",
    )
    val_size: float = option(
        0.1,
        "fraction of all images used for early stopping and choosing the kept epoch; for a "
        "dataset that came split without a validation part, the share of its training "
        "images carved for it",
        "data",
    )
    seed: int = option(
        42, "seed of the split, augmentation and training: the same seed, the same run", "data"
    )
    group_by: str | None = option(
        None,
        "keep related images on one side of the split: a regex on each file's path relative "
        "to ROOT (group = first capture group, or the whole match), 'auto' for the audit's "
        "near-duplicate clusters, or 'none' to split image by image (default: near-duplicate "
        "clusters whenever the audit finds any, so validation is honest)",
        "data",
        metavar="REGEX|auto|none",
    )
    groups_csv: str | None = option(
        None,
        "CSV file with columns path,group: each group lands on one side of the split "
        "(instead of --group-by)",
        "data",
        metavar="CSV",
    )
    dup_threshold: float = option(
        0.95,
        "cosine similarity of backbone features above which two images count as near-duplicates",
        "data",
    )
    group_threshold: float = option(
        0.90,
        "the loosest similarity at which the default split keeps images together; stricter "
        "rungs up to --dup-threshold are tried when its clusters are too coarse to split "
        "soundly",
        "data",
    )
    trim: bool = option(
        True,
        "crop a uniform background around the object before resizing (sprites, product "
        "shots), in training and prediction alike, so the object has one scale whatever the "
        "source; saved with the model. Images whose content fills the frame are left alone "
        "(on by default: it took sprites -> artwork from 57% to 65%, BENCHMARKS.md)",
        "data",
    )
    detail_size: str = option(
        "auto",
        "bring pictures larger than the training images down to their size first (the "
        "longest side, after the trim), in training and prediction alike: 'auto' = the "
        "training images' median size when it is under --img-size (sprites, icons, "
        "thumbnails; photos are left alone), 'off', or a number of pixels. A model trained "
        "on small pictures has never seen more detail than they hold (sprites -> artwork "
        "took 63% to 79% with it, BENCHMARKS.md 'Detail size')",
        "data",
        metavar="auto|off|N",
    )
    augment: str = option(
        "light",
        "training-image augmentation: light (flips, small rotations and crops, colour "
        "jitter), strong (adds RandAugment), domain (larger crops, strong colour, grayscale, "
        "blur, pixel-art vs smooth resizing: for images from elsewhere) or none",
        "data",
        choices=AUGMENTS,
    )
    # 3 (the clean view and two augmented ones): as accurate as 4 on four benchmarks
    # (within 0.6 points in and out of domain), 11-20% less time (BENCHMARKS.md "Views").
    views: int = option(
        3, "views of each training image cached: the clean one, the rest augmented", "data"
    )
    class_weights: str = option(
        "auto",
        "auto: inverse-frequency loss weights when classes differ by more than 2x; none: "
        "every image counts the same",
        "data",
        choices=CLASS_WEIGHTS,
    )
    workers: int = option(
        -1, "image-decoding worker processes; -1 = choose from the CPU count", "data"
    )
    cache_dir: str | None = option(
        None,
        "where frozen-backbone outputs are cached and reused across runs (default: "
        "~/.cache/graft/features or $GRAFT_CACHE_DIR)",
        "data",
        metavar="DIR",
        shortcut=("--no-cache", "", "keep backbone features in memory only"),
    )
    # --- stage 1: frozen backbone, new head
    epochs: int = option(
        10,
        "most epochs of training the new head on the frozen backbone with Adam (a dense "
        "head, or --head-solver adam; the probe sets its own path); 0 = skip this stage",
        "stage 1: frozen backbone",
    )
    batch_size: int = option(32, "images per batch in stage 1", "stage 1: frozen backbone")
    lr: float = option(
        1e-3,
        "the head's Adam learning rate in stage 1 (graft lr-find suggests one)",
        "stage 1: frozen backbone",
    )
    head_solver: str = option(
        "auto",
        "how stage 1 fits the head: 'probe' solves a linear head exactly (L-BFGS on every "
        "cached view) along a path of L2 strengths, picked on validation; 'adam' trains it "
        "for --epochs like the seed; auto: probe for a linear head, adam for a dense one",
        "stage 1: frozen backbone",
        choices=HEAD_SOLVERS,
    )
    refit: bool = option(
        True,
        "when the model kept is the frozen-stage linear probe, solve it once more on the "
        "training and validation images together at the L2 validation chose (as "
        "scikit-learn's LogisticRegressionCV refits); the temperature and thresholds stay "
        "those fitted on validation, the test split takes no part",
        "stage 1: frozen backbone",
    )
    schedule: str = option(
        "constant",
        "learning-rate schedule of each Adam stage, per step: constant, cosine (linear "
        "warm-up, then cosine decay to 0) or onecycle (fastai's fit_one_cycle)",
        "both stages",
        choices=SCHEDULES,
    )
    warmup: float = option(
        0.05, "share of a stage's steps spent warming up (cosine, onecycle)", "both stages"
    )
    optimizer: str = option(
        "adam",
        "optimizer of both stages (adamw: decoupled weight decay, 0.01 unless "
        "--weight-decay is given, 0 included)",
        "both stages",
        choices=OPTIMIZERS,
    )
    weight_decay: float | None = option(
        None,
        "weight decay of both stages' optimizer (default: 0 for adam, 0.01 for adamw)",
        "both stages",
    )
    # --- stage 2: fine-tuning
    fine_tune_epochs: int = option(
        10,
        "most epochs of fine-tuning the top of the backbone and the head (0 = skip this stage)",
        "stage 2: fine-tuning",
    )
    fine_tune_lr: float = option(
        1e-5, "the backbone's learning rate in stage 2", "stage 2: fine-tuning"
    )
    fine_tune_batch_size: int = option(16, "images per batch in stage 2", "stage 2: fine-tuning")
    unfreeze: str = option(
        "2",
        "'all' (the seed: the whole backbone, on freshly decoded images each epoch) or how "
        "many of the backbone's last blocks to train; the blocks below stay as pretrained "
        "(they generalise better to images from elsewhere) and their activations are cached, "
        "so an epoch costs seconds",
        "stage 2: fine-tuning",
        metavar="all|N",
    )
    fine_tune_head_lr: float | None = option(
        None,
        "the head's learning rate in stage 2; the pretrained blocks move far more slowly than "
        "the head (discriminative learning rates) (default: 10x --fine-tune-lr)",
        "stage 2: fine-tuning",
    )
    l2sp: float = option(
        0.0,
        "pull fine-tuned weights toward their pretrained values with this strength (L2-SP, "
        "e.g. 0.01; 0 = off)",
        "stage 2: fine-tuning",
    )
    wise: str = option(
        "off",
        "weight-space ensemble of the frozen-stage and the fine-tuned model (WiSE-FT): "
        "'auto' mixes them with the share of fine-tuned weights (0, 0.25 ... 1) that has the "
        "lowest validation loss; a number in [0, 1] fixes the share; off keeps the best epoch",
        "stage 2: fine-tuning",
        metavar="off|auto|ALPHA",
    )
    # --- after training
    unknown_precision: float = option(
        0.95,
        "predict answers 'unknown' below the confidence, chosen on validation data, at which "
        "the answered predictions are right this often (0 = always answer)",
        "after training",
    )
    unknown_keep: float = option(
        0.95,
        "answer 'unknown' for images less familiar than this share of the reference images "
        "(the --unseen images, else --unknown-reference); 0 = never 'unknown' for that reason",
        "after training",
    )
    unknown_reference: str = option(
        "augmented",
        "without --unseen: 'augmented' sets the 'unknown' threshold on strongly augmented "
        "validation images (new images may come from elsewhere: few false 'unknown's), "
        "'validation' on the plain ones (new images come from the training source: more "
        "images of new classes caught)",
        "after training",
        choices=list(UNKNOWN_REFERENCES),
    )
    # --- both stages
    patience: int = option(
        3,
        "early stopping: epochs without a better validation loss before a stage stops "
        "(0 = never stop early)",
        "both stages",
    )
    min_delta: float = option(
        1e-3,
        "early stopping: a drop in validation loss smaller than this is no progress (Keras' "
        "min_delta); the kept epoch is still the one with the lowest loss",
        "both stages",
    )
    allow_download: bool = option(
        True,
        "never download weights (VGG16, timm models); fail with instructions instead",
        "model",
        flag="--offline",
    )
    unseen: str | None = option(
        None,
        "labelled folder from another source (like the seed's internet images): evaluated "
        "after every epoch and at the end, reported apart from the in-domain figures; used "
        "for no choice but the 'unknown' threshold (--unknown-keep of them stay answered)",
        "tracking",
        metavar="DIR",
    )
    track: str = option(
        "",
        "also log config, epochs, metrics and artifacts to MLflow (./mlruns or "
        "$MLFLOW_TRACKING_URI) and/or TensorBoard (RUN/tensorboard) (default: neither)",
        "tracking",
        metavar="mlflow,tensorboard",
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        from .backbones import backbone_problem

        def bad(option: str, value: Any, allowed: str) -> UsageError:
            return UsageError(f"--{option.replace('_', '-')} {value!r} is not valid: {allowed}.")

        if isinstance(self.detail_size, numbers.Real) and not isinstance(self.detail_size, bool):
            # detail_size=64 (or numpy's 64) from the library; 64.0 then fails the check below
            self.detail_size = str(self.detail_size)
        if isinstance(self.unfreeze, int) and not isinstance(self.unfreeze, bool):
            self.unfreeze = str(self.unfreeze)  # unfreeze=2 from the library means "2"
        if isinstance(self.wise, int | float) and not isinstance(self.wise, bool):
            self.wise = f"{float(self.wise):g}"  # wise=0.5 from the library (a grid search)
        if isinstance(self.wise, str):
            self.wise = self.wise.strip()
        self._check_types(bad)
        problem = backbone_problem(self.backbone, auto=True)
        if problem:  # graft's own names and auto need no timm (nor torch) to check
            raise bad("backbone", self.backbone, problem)
        if not (32 <= self.img_size <= 1024):
            raise bad("img_size", self.img_size, "use a size between 32 and 1024 pixels")
        dense = re.fullmatch(r"dense:([1-9]\d{0,5})", self.head)
        if not (self.head == "linear" or (dense and int(dense.group(1)) <= 65536)):
            raise bad("head", self.head, "use 'linear' or 'dense:N' with N up to 65536")
        if not (0.0 <= self.dropout < 1.0):
            raise bad("dropout", self.dropout, "use a value in [0, 1)")
        for name in ("test_size", "val_size"):
            value = getattr(self, name)
            if not (0.0 < value < 0.5):
                raise bad(name, value, "use a fraction between 0 and 0.5, e.g. 0.2")
        if self.test_size + self.val_size >= 0.8:
            raise UsageError("--test-size plus --val-size must leave most images for training.")
        if self.group_by and self.group_by not in ("auto", "none"):
            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise bad("group_by", self.group_by, f"it is not a valid regex ({exc})") from None
        if self.group_by and self.groups_csv:
            raise UsageError("Use either --group-by or --groups-csv, not both.")
        if not (0.5 <= self.dup_threshold <= 1.0):
            raise bad("dup_threshold", self.dup_threshold, "use a cosine similarity in [0.5, 1]")
        if not (0.5 <= self.group_threshold <= 1.0):
            raise bad(
                "group_threshold", self.group_threshold, "use a cosine similarity in [0.5, 1]"
            )
        if not (0.0 <= self.unknown_precision < 1.0):
            raise bad("unknown_precision", self.unknown_precision, "use a fraction in [0, 1)")
        if not (0.0 <= self.unknown_keep <= 1.0):
            raise bad("unknown_keep", self.unknown_keep, "use a fraction in [0, 1], e.g. 0.95")
        if self.unknown_reference not in UNKNOWN_REFERENCES:
            raise bad("unknown_reference", self.unknown_reference, "choose augmented or validation")
        if self.augment not in AUGMENTS:
            raise bad("augment", self.augment, f"choose one of {', '.join(AUGMENTS)}")
        self._check_solver_schedule_wise(bad)
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise bad("class_weights", self.class_weights, "choose auto or none")
        for name in ("epochs", "fine_tune_epochs", "patience"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "use 0 or more")
        for name, most in (("batch_size", 65536), ("fine_tune_batch_size", 65536), ("views", 64)):
            if not 1 <= getattr(self, name) <= most:
                raise bad(name, getattr(self, name), f"use a whole number from 1 to {most}")
        if not 0 <= self.seed < 2**32:
            raise bad("seed", self.seed, "use a whole number from 0 to 4294967295")
        if not -1 <= self.workers <= 64:
            raise bad("workers", self.workers, "use -1 (automatic), 0 (none) or up to 64")
        for name in ("epochs", "fine_tune_epochs"):
            if getattr(self, name) > 100_000:
                raise bad(name, getattr(self, name), "use at most 100000")
        if self.fine_tune_head_lr is not None and not (0.0 < self.fine_tune_head_lr < 10.0):
            raise bad("fine_tune_head_lr", self.fine_tune_head_lr, "use a positive learning rate")
        if self.min_delta < 0:
            raise bad("min_delta", self.min_delta, "use 0 (any drop counts) or a small loss")
        if self.l2sp < 0:
            raise bad("l2sp", self.l2sp, "use 0 (off) or a positive strength such as 0.01")
        self._check_detail(bad)
        if self.weight_decay is None:  # the optimizer's own default, recorded as a number
            self.weight_decay = 0.01 if self.optimizer == "adamw" else 0.0
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "use 0 (off) or a small positive value")
        for name in ("lr", "fine_tune_lr"):
            if not (0.0 < getattr(self, name) < 10.0):
                raise bad(name, getattr(self, name), "use a positive learning rate such as 1e-3")
        if self.epochs + self.fine_tune_epochs == 0:
            raise UsageError("Nothing to train: --epochs and --fine-tune-epochs are both 0.")
        if self.unfreeze != "all" and not re.fullmatch(r"[1-9]\d*", str(self.unfreeze)):
            raise bad("unfreeze", self.unfreeze, "use 'all' or a number of last blocks, e.g. 2")
        self.unfreeze = str(self.unfreeze)
        from .tracking import parse_track

        parse_track(self.track)

    def _check_detail(self, bad: Any) -> None:
        if not _detail_ok(self.detail_size):
            raise bad(
                "detail_size", self.detail_size, "use auto, off or a whole number of pixels 8..1024"
            )
        if self.detail_size.isdigit() and int(self.detail_size) >= self.img_size:
            raise bad(
                "detail_size",
                self.detail_size,
                f"use a size under --img-size {self.img_size} (pictures are resized to that "
                "anyway), auto or off",
            )

    def _check_solver_schedule_wise(self, bad: Any) -> None:
        """--head-solver, --schedule, --warmup and --wise, and how they combine."""
        if self.head_solver not in HEAD_SOLVERS:
            raise bad("head_solver", self.head_solver, f"choose one of {', '.join(HEAD_SOLVERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup < 1.0:
            raise bad("warmup", self.warmup, "use a share of the steps in [0, 1), e.g. 0.05")
        if self.wise_alpha is None and self.wise not in ("off", "auto"):
            raise bad("wise", self.wise, "use off, auto or a share in [0, 1] such as 0.5")
        if self.wise != "off" and not (self.epochs and self.fine_tune_epochs):
            raise UsageError(
                f"--wise {self.wise} mixes the frozen-stage model with the fine-tuned one: it "
                "needs both stages (--epochs and --fine-tune-epochs above 0), or --wise off."
            )
        if self.head_solver == "probe" and self.head != "linear":
            raise UsageError(
                f"--head-solver probe solves a linear head exactly; --head {self.head} has a "
                "hidden layer. Use --head linear, or --head-solver adam (or auto)."
            )

    def check_paths(self) -> None:
        """The files and folders the options name exist and are of the right kind: checked
        before a run folder is made, so a typo costs nothing (paths can change between
        runs, so this is not part of :meth:`validate`)."""
        from pathlib import Path

        def missing(option: str, value: str, kind: str) -> UsageError:
            other = "folder" if kind == "file" else "file"
            found = f"a {other}, not a {kind}" if Path(value).exists() else f"no such {kind}"
            return UsageError(
                f"--{option.replace('_', '-')} {value}: {found}. Check the path "
                "(relative paths are taken from the current folder)."
            )

        if self.weights and not Path(self.weights).is_file():
            from .errors import WeightsError

            raise WeightsError(
                f"--weights {self.weights}: no such file. Give the path of a .pth or "
                ".safetensors file, or leave --weights out to use the backbone's usual source."
            )
        if self.groups_csv and not Path(self.groups_csv).is_file():
            raise missing("groups_csv", self.groups_csv, "file")
        if self.unseen and not Path(self.unseen).is_dir():
            raise missing("unseen", self.unseen, "folder")
        if self.weights and Path(self.weights).suffix.lower() not in (
            ".pth",
            ".pt",
            ".safetensors",
        ):
            raise UsageError(
                f"--weights {self.weights}: give a .pth, .pt or .safetensors weights file."
            )
        if self.cache_dir and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise UsageError(f"--cache-dir {self.cache_dir} is a file; give a folder.")

    def _check_types(self, bad: Any) -> None:
        """Each field has its annotated type (ints are not bools or floats), and no float
        is NaN or infinite: one rule for every option, from the CLI or the library."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            if "float" in kinds and isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise bad(f.name, value, "use a finite number")
                setattr(self, f.name, float(value))
            elif "int" in kinds and not (isinstance(value, int) and not isinstance(value, bool)):
                raise bad(f.name, value, "use a whole number")
            elif "bool" in kinds and not isinstance(value, bool):
                raise bad(f.name, value, "use True or False")
            elif kinds == ["str"] and not isinstance(value, str):
                raise bad(f.name, value, "use text")
            elif "float" in kinds and not isinstance(value, int | float):
                raise bad(f.name, value, "use a number")

    # ------------------------------------------------------------------ derived values
    @property
    def head_hidden(self) -> int | None:
        return int(self.head.split(":")[1]) if self.head.startswith("dense:") else None

    @property
    def wise_alpha(self) -> float | None:
        """--wise as a fixed share of fine-tuned weights; None for off/auto or no number."""
        try:
            alpha = float(self.wise)
        except ValueError:
            return None
        return alpha + 0.0 if 0.0 <= alpha <= 1.0 else None  # (+ 0.0: -0 is 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _detail_ok(value: object) -> bool:
    """``detail_size``: "auto", "off" or a whole number of pixels in 8..1024."""
    if value in ("auto", "off"):
        return True
    text = str(value)
    # isascii: str.isdigit() also takes "²" and other scripts' digits, which int() refuses
    return text.isascii() and text.isdigit() and 8 <= int(text) <= 1024
