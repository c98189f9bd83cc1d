"""One configuration object for a training run.

``TrainConfig`` flows unchanged from the CLI (or the library facade) to the trainer and is
written to the run folder as ``config.json``, so a run always says exactly how it was made.
Validation lives here, once, with messages that say which option is wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

AUGMENTS = ("none", "light", "strong", "domain")
OPTIMIZERS = ("adam", "adamw")
CLASS_WEIGHTS = ("auto", "none")


@dataclass
class TrainConfig:
    """Every choice that shapes a training run. Defaults follow the seed workflow."""

    # --- model
    backbone: str = "efficientnet_lite0"
    weights: str | None = None  # local weights file; None = the backbone's usual source
    pretrained: bool = True  # False only with --no-pretrained: random init on purpose
    img_size: int = 128  # the seed's 128x128
    head: str = "linear"  # "linear" (pool -> dropout -> linear) or "dense:N" (seed-like)
    dropout: float = 0.2
    # --- data
    test_size: float = 0.2  # held out, only used by evaluate
    val_size: float = 0.1  # taken from the rest; early stopping and model selection
    seed: int = 42
    # Keep groups of related images on one side of the split: a regex on each file's path
    # relative to the root (group = first capture group, or the whole match), or "auto" for
    # the audit's near-duplicate clusters. groups_csv maps path -> group instead. None (the
    # default) groups by near-duplicate clusters whenever the audit finds any, so validation
    # is honest by default; "none" splits image by image.
    group_by: str | None = None
    groups_csv: str | None = None
    dup_threshold: float = 0.95  # cosine similarity above which two images are near-copies
    # the loosest similarity at which the default split groups images (it tries this first,
    # then stricter rungs up to dup_threshold until the clusters can be split soundly)
    group_threshold: float = 0.90
    # crop a uniform background around the object before resizing (sprites, product shots):
    # the object then has one scale whatever the source; saved with the model. On by
    # default: sprites -> artwork went from 57% to 65% with it (BENCHMARKS.md); images whose
    # content fills the frame (most photos) are left as they are.
    trim: bool = True
    augment: str = "light"
    views: int = 4  # augmented views per training image cached for the frozen stage
    class_weights: str = "auto"
    workers: int = -1  # image-decoding worker processes; -1 = choose from the CPU count
    # Where frozen-backbone outputs are cached across runs; None = the user cache
    # (~/.cache/graft/features or $GRAFT_CACHE_DIR), "" = keep them in memory only.
    cache_dir: str | None = None
    # --- stage 1: frozen backbone, new head
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    # --- stage 2: fine-tuning
    fine_tune_epochs: int = 10
    fine_tune_lr: float = 1e-5
    fine_tune_batch_size: int = 16
    # "all" (the seed: whole backbone) or the number of last blocks to train. The default
    # trains only the top 2 blocks: the bottom stays as pretrained (it generalises better to
    # images from elsewhere) and its activations are cached, so an epoch costs seconds.
    unfreeze: str = "2"
    # The head's learning rate while fine-tuning (None = 10x fine_tune_lr): the pretrained
    # blocks move far more slowly than the head (discriminative learning rates).
    fine_tune_head_lr: float | None = None
    # L2-SP strength: pulls fine-tuned weights toward their pretrained values (0 = off)
    l2sp: float = 0.0
    # --- after training
    # predict answers "unknown" below a confidence chosen on validation data so that the
    # answered predictions are right this often; 0 = always answer
    unknown_precision: float = 0.95
    # --- both stages
    patience: int = 3  # epochs without a better validation loss before stopping; 0 = never
    # an epoch counts as progress for early stopping only when it lowers the validation loss
    # by more than this (Keras' min_delta); the kept epoch is still the lowest loss
    min_delta: float = 1e-3
    allow_download: bool = True  # may fetch weights (VGG16) when they are not on disk
    # a labelled folder from another source, evaluated after every epoch and at the end and
    # reported apart from the in-domain figures (never used to choose anything)
    unseen: str | None = None
    # experiment tracking: "", "mlflow", "tensorboard" or "mlflow,tensorboard" (graft.tracking)
    track: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        from .backbones import BACKBONES

        def bad(option: str, value: Any, allowed: str) -> UsageError:
            return UsageError(f"--{option.replace('_', '-')} {value!r} is not valid: {allowed}.")

        if self.backbone not in BACKBONES and self.backbone != "auto":
            raise bad("backbone", self.backbone, f"choose auto or one of {', '.join(BACKBONES)}")
        if not (32 <= self.img_size <= 1024):
            raise bad("img_size", self.img_size, "use a size between 32 and 1024 pixels")
        if not (self.head == "linear" or re.fullmatch(r"dense:[1-9]\d*", self.head)):
            raise bad("head", self.head, "use 'linear' or 'dense:N' (e.g. dense:256)")
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
        if self.augment not in AUGMENTS:
            raise bad("augment", self.augment, f"choose one of {', '.join(AUGMENTS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise bad("class_weights", self.class_weights, "choose auto or none")
        for name in ("epochs", "fine_tune_epochs", "patience"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "use 0 or more")
        for name in ("batch_size", "fine_tune_batch_size", "views"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "use 1 or more")
        if self.fine_tune_head_lr is not None and not (0.0 < self.fine_tune_head_lr < 10.0):
            raise bad("fine_tune_head_lr", self.fine_tune_head_lr, "use a positive learning rate")
        if self.min_delta < 0:
            raise bad("min_delta", self.min_delta, "use 0 (any drop counts) or a small loss")
        if self.l2sp < 0:
            raise bad("l2sp", self.l2sp, "use 0 (off) or a positive strength such as 0.01")
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

    # ------------------------------------------------------------------ derived values
    @property
    def head_hidden(self) -> int | None:
        return int(self.head.split(":")[1]) if self.head.startswith("dense:") else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
