"""INT8 exports (``graft export RUN --int8``): ONNX Runtime's static post-training
quantization, calibrated on the run's training images and measured against fp32 on its
held-out test split.

Never a silent default: INT8 changes the probabilities (by up to 0.1-0.6 on the demo,
BENCHMARKS.md), so it is chosen explicitly and the export records how far it moved:

1. :func:`run_images` finds the images: a class-balanced, seeded sample of up to
   :data:`CALIBRATION_IMAGES` training images, and every test image, as ``split.csv`` lists
   them, each checked against its recorded sha256 (graft.integrity);
2. :func:`quantize_onnx` rewrites the fp32 ONNX graph as QDQ (quantize/dequantize pairs
   around each quantized operator): per-channel INT8 weights, UINT8 activations whose ranges
   come from the calibration images. ONNX Runtime runs QDQ graphs with INT8 kernels, and
   OpenVINO reads them as FakeQuantize and runs INT8 too. The tail after the pooled
   features (head, softmax, familiarity) stays fp32 (:func:`tail_nodes`);
3. :func:`agreement` compares the INT8 export with the fp32 graph on the test images: top-1
   agreement, the largest and mean probability difference, "unknown" agreement and both
   accuracies (graft.json's ``int8``).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL.Image import Image

from .errors import DataError, RunFolderError
from .io import display, shell_path
from .modelinfo import ModelInfo
from .runtime import is_unknown, load_image, preprocess

__all__ = [
    "CALIBRATION_IMAGES",
    "RunImages",
    "agreement",
    "balanced_sample",
    "describe_agreement",
    "quantize_onnx",
    "run_images",
    "tail_nodes",
]

#: training images the activation ranges are calibrated on (ONNX Runtime's examples use
#: 100-500; beyond 128 the demo's agreement did not change, BENCHMARKS.md)
CALIBRATION_IMAGES = 128
#: images per calibration / comparison batch (memory: one batch of inputs)
BATCH = 16
#: below this top-1 agreement with fp32, ``graft export --int8`` says to keep fp32 in mind
AGREEMENT_WARNING = 0.99
#: the poolings that end a graft backbone (``mean(dim=(2, 3))`` exports as ReduceMean)
POOLS = ("ReduceMean", "GlobalAveragePool")


@dataclass
class RunImages:
    """The images an INT8 export needs: calibration (training) and comparison (test)."""

    root: Path
    calibration: list[Path]
    test: list[Path]
    test_labels: list[int]


def balanced_sample(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """Up to ``n`` positions of ``labels``, the classes taking turns (so a rare class is not
    left out of calibration), each class's order shuffled by ``seed``."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    queues = []
    for label in sorted(by_class):
        queue = by_class[label]
        rng.shuffle(queue)
        queues.append(queue)
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: n - len(picked)]
        depth += 1
    return picked


def _without_int8(run: Path) -> str:
    return f"or export without --int8 (`graft export {shell_path(run)}`: fp32 needs no images)"


def _check_present(run: Path, root: Path, relpaths: Sequence[str]) -> None:
    """A :class:`DataError` saying how to go on unless every image is under ``root``."""
    why = "training images to calibrate on, test images to compare with fp32"
    moved = (
        f"Point graft at their new location (`graft export {shell_path(run)} --int8 --data-root "
        f"NEW_ROOT`), {_without_int8(run)}."
    )
    if not root.is_dir():
        raise DataError(
            f"--int8 reads {run}'s images ({why}), but their folder {display(root)} no longer "
            f"exists (moved or deleted). {moved}"
        )
    missing = [r for r in relpaths if not (root / r).is_file()]
    if missing:
        shown = ", ".join(display(r) for r in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DataError(
            f"--int8 reads {len(relpaths)} of {run}'s images ({why}), but {len(missing)} of "
            f"them are no longer in {display(root)} ({shown}): the folder moved or files "
            f"were deleted. {moved}"
        )


def run_images(run: Path, classes: Sequence[str], data_root: str | Path | None = None) -> RunImages:
    """The run's calibration and test images as ``split.csv`` lists them, under
    ``data_root`` (default: the folder the run was trained on), every one checked. Raises
    :class:`DataError` (images moved, deleted or changed) or :class:`RunFolderError` (no
    split, or no test images), each saying how to go on."""
    from .integrity import (
        check_split_images,
        check_split_record,
        read_run_config,
        read_split_rows,
    )
    from .rundir import RunDir

    rundir = RunDir(run)
    if not rundir.split.is_file() or not rundir.config.is_file():
        raise RunFolderError(
            f"{run} has no split.csv/config.json, so graft cannot find the training images "
            f"to calibrate INT8 on: {_without_int8(run)}."
        )
    config = read_run_config(rundir)
    if list(config["classes"]) != list(classes):
        raise RunFolderError(
            f"config.json and model.safetensors in {run} disagree on the classes: one of them "
            "was replaced after training; retrain the run or restore the files."
        )
    rows = read_split_rows(rundir.split, config["classes"])
    check_split_record(rundir, rows, config)
    train = [i for i, s in enumerate(rows.subsets) if s == "train"]
    test = [i for i, s in enumerate(rows.subsets) if s == "test"]
    if not test or not train:
        raise RunFolderError(
            f"split.csv in {run} lists no {'test' if train else 'training'} images: INT8 "
            f"cannot be {'checked' if train else 'calibrated'}; {_without_int8(run)}."
        )
    seed = config.get("seed")
    sample = balanced_sample(
        [rows.labels[i] for i in train], CALIBRATION_IMAGES, seed if isinstance(seed, int) else 0
    )
    chosen = [train[j] for j in sample]
    root = Path(data_root or config["data_root"]).expanduser().resolve()
    needed = chosen + test
    relpaths = [rows.relpaths[i] for i in needed]
    _check_present(run, root, relpaths)
    try:
        check_split_images(rundir, root, relpaths, [rows.hashes[i] for i in needed], "evaluate")
    except DataError as exc:
        raise DataError(f"{exc} Or export without --int8.") from exc
    return RunImages(
        root,
        [root / rows.relpaths[i] for i in chosen],
        [root / rows.relpaths[i] for i in test],
        [rows.labels[i] for i in test],
    )


def decoded(paths: Sequence[Path], info: ModelInfo, size: int = BATCH) -> Iterator[list[Image]]:
    """The images, decoded as graft decodes them, ``size`` at a time."""
    for start in range(0, len(paths), size):
        images = []
        for path in paths[start : start + size]:
            try:
                images.append(load_image(path, info.img_size))
            except Exception as exc:  # Pillow raises many kinds; hash-checked, so rare
                raise DataError(f"{display(path)} cannot be decoded ({exc}).") from exc
        yield images


def batches(paths: Sequence[Path], info: ModelInfo, size: int = BATCH) -> Iterator[np.ndarray]:
    """Preprocessed inputs, ``size`` images at a time, exactly as graft predicts them."""
    for images in decoded(paths, info, size):
        yield preprocess(images, info.preprocessing)


# --------------------------------------------------------------------------- quantization


def tail_nodes(graph: Any) -> list[str]:
    """The names of the nodes from the backbone's global pooling to the outputs: the head,
    the temperature and softmax, and the familiarity score. A handful of small operations
    whose rounding would move every probability and the familiarity directly, for almost
    no time (the convolutions are over 99% of the work)."""
    pools = [n for n in graph.node if n.op_type in POOLS]
    if not pools:
        return []
    reached = set(pools[-1].output)
    names = [pools[-1].name]
    for node in graph.node:  # ONNX stores nodes in topological order
        if any(name in reached for name in node.input):
            names.append(node.name)
            reached.update(node.output)
    return [n for n in names if n]


def shape_nodes(graph: Any) -> list[str]:
    """The names of the nodes that compute shapes rather than images: everything fed only
    by ``Shape`` outputs and constants. Backbones with TensorFlow-style "same" padding
    (EfficientNet-Lite) work out each padding at run time as ``ceil(size / stride)`` in
    float; quantized, 19.0 comes back as 18.9, the padding is off by one and the feature
    maps shift (measured: top-1 agreement 0.56 instead of 1.0 on ONNX Runtime)."""
    constants = {t.name for t in graph.initializer}
    derived: set[str] = set()
    names = []
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        inputs = [i for i in node.input if i]
        from_shape = node.op_type in ("Shape", "Size") or (
            any(i in derived for i in inputs)
            and all(i in derived or i in constants for i in inputs)
        )
        if from_shape:
            derived.update(node.output)
            if node.name:
                names.append(node.name)
    return names


def quantize_onnx(
    fp32: Path,
    out: Path,
    calibration: Callable[[], Iterator[np.ndarray]],
    keep_tail_fp32: bool = True,
    reduce_range: bool = True,
) -> Path:
    """Write ``fp32`` (an ONNX graph, images in) as a QDQ INT8 graph to ``out``: per-channel
    INT8 weights, UINT8 activations with the MinMax ranges of the ``calibration`` batches.
    The shape arithmetic (:func:`shape_nodes`) is never quantized; ``keep_tail_fp32`` leaves
    :func:`tail_nodes` in fp32 too.

    ``reduce_range`` keeps weights within 7 bits. CPUs without VNNI (AVX2, most AVX-512)
    multiply UINT8 by INT8 in pairs summed into 16 bits, which overflows with full-range
    weights; measured on the demo (BENCHMARKS.md), OpenVINO's top-1 agreement with fp32
    went from 96.7% to 100% and the largest probability change from 0.56 to 0.06."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.name, self.it = name, calibration()

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {self.name: x}

    tmp = Path(tempfile.mkdtemp(prefix="graft-int8-"))
    try:
        pre = tmp / "pre.onnx"
        # graph folding and shape inference first, as ONNX Runtime recommends. Its symbolic
        # shape inference is skipped: graft's inputs have a fixed size, ONNX's own shape
        # inference suffices, and on the demo it gave the same INT8 graph 10 s sooner
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre), load_external_data=False).graph
        quantize_static(
            str(pre),
            str(out),
            Reader(graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=shape_nodes(graph) + (tail_nodes(graph) if keep_tail_fp32 else []),
            calibration_providers=["CPUExecutionProvider"],
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- agreement


#: images -> their probabilities and familiarity (None without the score), as
#: ``ExportedModel.predict_scores_images``
Scorer = Callable[[list[Image]], tuple[np.ndarray, np.ndarray | None]]


def agreement(fp32: Scorer, int8: Scorer, images: RunImages, info: ModelInfo) -> dict[str, Any]:
    """The INT8 model against the fp32 one on the test images (each scorer takes decoded
    images). "unknown" is decided from each one's own scores with the model's thresholds."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("p32", "p8", "f32", "f8")}
    for batch in decoded(images.test, info):
        p32, f32 = fp32(batch)
        p8, f8 = int8(batch)
        parts["p32"].append(p32)
        parts["p8"].append(p8)
        if f32 is not None and f8 is not None:
            parts["f32"].append(f32)
            parts["f8"].append(f8)
    p32, p8 = np.concatenate(parts["p32"]), np.concatenate(parts["p8"])
    fam32 = np.concatenate(parts["f32"]) if parts["f32"] else None
    fam8 = np.concatenate(parts["f8"]) if parts["f8"] else None
    labels = np.asarray(images.test_labels)

    def unknown(p: np.ndarray, fam: np.ndarray | None) -> np.ndarray:
        return np.array(
            [
                is_unknown(
                    float(p[i].max()),
                    info.unknown_threshold,
                    None if fam is None else float(fam[i]),
                    info.familiarity_threshold,
                )
                for i in range(len(p))
            ]
        )

    diff = np.abs(p8.astype(np.float64) - p32)
    report: dict[str, Any] = {
        "n": len(labels),
        "agreement_top1": float((p8.argmax(1) == p32.argmax(1)).mean()),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
        "agreement_unknown": float((unknown(p8, fam8) == unknown(p32, fam32)).mean()),
        "accuracy_int8": float((p8.argmax(1) == labels).mean()),
        "accuracy_fp32": float((p32.argmax(1) == labels).mean()),
    }
    if fam32 is not None and fam8 is not None:
        report["max_abs_familiarity_diff"] = float(np.abs(fam8 - fam32).max())
    return report


def describe_agreement(report: dict[str, Any]) -> list[str]:
    """graft.json's ``int8`` entry as the lines ``graft export --int8`` prints."""
    lines = [
        f"INT8 against fp32 on the held-out test split ({report['n']} images, "
        f"{report.get('engine', 'its engine')}; calibrated on "
        f"{report['calibration_images']} training images):",
        f"  same top class {report['agreement_top1']:.1%}, 'unknown' decided alike "
        f"{report['agreement_unknown']:.1%}",
        f"  probabilities moved by up to {report['max_abs_prob_diff']:.3f} "
        f"({report['mean_abs_prob_diff']:.4f} on average)",
        f"  accuracy {report['accuracy_int8']:.1%} INT8, {report['accuracy_fp32']:.1%} fp32",
    ]
    if report["agreement_top1"] < AGREEMENT_WARNING:
        lines.append(
            f"  INT8 changes the answer for {1 - report['agreement_top1']:.1%} of the held-out "
            "images: keep the fp32 export where that matters."
        )
    return lines
