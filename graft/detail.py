"""The detail size: how large the training pictures are, so that larger pictures from
elsewhere are brought down to it before the network sees them.

A model trained on sprites (about 60 px, upscaled to the 128 px input) has learnt the
classes at the detail a 60 px picture holds. An artwork of the same Pokémon at 500 px,
resized straight to 128 px, shows outlines and textures no training image had; first
brought down to 60 px, it looks like the sprites again. Measured on sprites -> artwork
(BENCHMARKS.md, "Detail size"): 63% -> 79% with graft's defaults and 58% -> 68% for a
logistic regression on frozen features, in domain within the intervals; on sets whose
pictures from elsewhere are as small as the training ones (emoji of another vendor,
Fashion-MNIST) nothing changes, and photos larger than the input are left alone (the size
is only used when it is under the input size).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .runtime import load_image, trim_background

if TYPE_CHECKING:
    from .data import ScanResult
    from .modelinfo import ModelInfo

__all__ = ["DETAIL_SAMPLE", "measure_detail", "new_model_info", "resolve_detail"]

#: images looked at, evenly spaced over the sorted file list (the median settles well
#: before: on the sprites every 10th of 1,097 images gave 59 px, all of them 58 px)
DETAIL_SAMPLE = 200


def measure_detail(paths: Sequence[Path], img_size: int, trim: bool) -> int:
    """The median longest side, in pixels (after the trim, when ``trim``), of up to
    :data:`DETAIL_SAMPLE` of ``paths`` (evenly spaced in sorted order); 0 when that is not
    under ``img_size`` (pictures at least as large as the input: nothing to bring down).
    Unreadable files are passed over (the scan reports them)."""
    if not paths:
        return 0
    # sorted: the same files give the same sample in any order (a resumed run's files come
    # from its split.csv, and must measure what the first run measured)
    ordered = sorted(paths)
    step = max(1, len(ordered) // DETAIL_SAMPLE)
    sample = ordered[::step][:DETAIL_SAMPLE]
    return _median_side(tuple((Path(p), _stamp(p)) for p in sample), img_size, trim)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = Path(path).stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


# Remembered per file version (path, mtime, size): ``--backbone auto`` and the run it
# chooses, or scan and the audit, measure the same folder in one process.
@functools.lru_cache(maxsize=8)
def _median_side(
    sample: tuple[tuple[Path, tuple[int, int]], ...], img_size: int, trim: bool
) -> int:
    sides: list[int] = []
    for path, _ in sample:
        try:
            with Image.open(path) as header:
                side = max(header.size)
            # Small enough that the trim may matter (a sprite on a 256 px canvas): its size as
            # the network sees it; larger ones (photos) by the header, without decoding.
            if side < 4 * img_size:
                image = load_image(path)
                side = max((trim_background(image) if trim else image).size)
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            continue
        sides.append(side)
    if not sides:
        return 0
    sides.sort()
    median = sides[len(sides) // 2]
    return median if median < img_size else 0


def resolve_detail(option: str, paths: Sequence[Path], img_size: int, trim: bool) -> int:
    """``--detail-size`` -> pixels: ``auto`` measures ``paths``, ``off`` is 0, a number is
    itself (0 when not under ``img_size``: it would change nothing)."""
    if option == "off":
        return 0
    if option == "auto":
        return measure_detail(paths, img_size, trim)
    size = int(option)
    return size if size < img_size else 0


def new_model_info(
    config: Any, data: ScanResult, backbone: str | None = None, reporter: Any = None
) -> ModelInfo:
    """The description of a new model of ``config`` (or of ``backbone``) for ``data``'s
    classes: the backbone's normalisation, the trim, and the detail size measured on
    ``data``, so that training, the audit, the learning-rate finder and ``--backbone auto``
    see the same pixels and share the cache. With a ``reporter``, says the detail size."""
    from .backbones import get_spec
    from .modelinfo import ModelInfo

    name = backbone or config.backbone
    spec = get_spec(name)
    detail = resolve_detail(config.detail_size, data.paths, config.img_size, config.trim)
    if detail and reporter is not None:
        why = "the images' median size" if config.detail_size == "auto" else "--detail-size"
        reporter.info(
            f"Detail size: pictures larger than {detail} px ({why}) are brought down to it "
            "before the network sees them, in training and prediction alike (--detail-size "
            "off keeps every picture's detail)."
        )
    return ModelInfo(
        name,
        config.img_size,
        spec.mean,
        spec.std,
        tuple(data.classes),
        config.head,
        config.dropout,
        trim=config.trim,
        detail_size=detail,
    )
