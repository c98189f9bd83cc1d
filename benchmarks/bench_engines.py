"""Inference engines side by side on one trained run: PyTorch eager, ONNX Runtime, OpenVINO
(dynamic and static batch shapes), and INT8 (static post-training quantization with ONNX
Runtime's tools, run by both engines).

    python benchmarks/bench_engines.py runs/demo --json benchmarks/results/engines.json

For each engine: model throughput at batch 32, single-image p50 latency, and, on the run's
held-out test images, accuracy, top-1 agreement with PyTorch and the largest probability
difference. INT8 is calibrated on 128 training images of the run. The images are decoded
once beforehand, so only the network is timed. Also prints what the 10x / 2 ms targets of
the speed issue would demand of this CPU in GFLOP/s.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import graft._malloc  # noqa: F401  (the allocator tuning graft uses; before any big tensor)


def timed(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> np.ndarray:
    fn(x)
    fn(x)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return np.asarray(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import onnxruntime as ort
    import openvino as ov
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from torch.utils.flop_counter import FlopCounterMode

    from graft.engines import OpenVinoRunner, Probabilities, export_onnx
    from graft.model import load_model
    from graft.runtime import load_image, preprocess

    run = Path(args.run)
    model = load_model(run).eval()
    info = model.info
    size = info.img_size
    graph = Probabilities(model).eval()
    root = Path(json.loads((run / "config.json").read_text())["data_root"])
    with open(run / "split.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))

    def batch(paths: list[str]) -> np.ndarray:
        images = [load_image(root / p, size) for p in paths]
        return preprocess(images, info.preprocessing._replace(size=size))

    train = [r["path"] for r in rows if r["subset"] == "train"]
    random.Random(0).shuffle(train)
    calib = batch(train[:128])
    test = [r for r in rows if r["subset"] == "test"]
    x_test = batch([r["path"] for r in test])
    y_test = np.array([info.classes.index(r["class"]) for r in test])
    with FlopCounterMode(display=False) as counter:
        graph(torch.from_numpy(x_test[:1]))
    gflop = counter.get_total_flops() / 1e9

    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    f32 = export_onnx(graph, size, tmp / "model.onnx")
    pre, q8 = tmp / "pre.onnx", tmp / "int8.onnx"
    quant_pre_process(str(f32), str(pre))
    name = ort.InferenceSession(str(f32)).get_inputs()[0].name

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(
        str(pre),
        str(q8),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )

    def onnxruntime(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {name: x})[0]

    def openvino_dynamic(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
        return lambda x: request.infer({0: x})[0].copy()

    def openvino_static(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        runner = OpenVinoRunner(path, threads)  # graft's own runner
        return lambda x: runner(torch.from_numpy(x)).numpy()

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return graph(torch.from_numpy(x)).numpy()

    graph_cl = Probabilities(load_model(run).eval().to(memory_format=torch.channels_last))

    def eager_channels_last(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return graph_cl(
                torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            ).numpy()

    engines: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {
        "PyTorch eager fp32": lambda: eager,
        "PyTorch eager fp32, channels_last": lambda: eager_channels_last,
        "ONNX Runtime fp32": lambda: onnxruntime(f32),
        "ONNX Runtime INT8 (QDQ)": lambda: onnxruntime(q8),
        "OpenVINO fp32, dynamic batch": lambda: openvino_dynamic(f32),
        "OpenVINO fp32, static shapes (graft)": lambda: openvino_static(f32),
        "OpenVINO INT8 (QDQ), static shapes": lambda: openvino_static(q8),
    }
    reference = np.concatenate([eager(x_test[i : i + 32]) for i in range(0, len(x_test), 32)])
    results = {}
    print(f"{len(x_test)} test images, {size} px, {threads} threads, {gflop:.3f} GFLOP/image")
    for label, make in engines.items():
        fn = make()
        proba = np.concatenate([fn(x_test[i : i + 32]) for i in range(0, len(x_test), 32)])
        b32 = timed(fn, x_test[:32], args.seconds)
        b1 = timed(fn, x_test[:1], args.seconds)
        r = {
            "img_per_s_b32": 32 / b32.mean(),
            "p50_ms_b1": float(np.median(b1) * 1000),
            "accuracy": float((proba.argmax(1) == y_test).mean()),
            "agreement": float((proba.argmax(1) == reference.argmax(1)).mean()),
            "max_prob_diff": float(np.abs(proba - reference).max()),
        }
        results[label] = r
        print(
            f"{label:<38} {r['img_per_s_b32']:7.1f} img/s  p50 {r['p50_ms_b1']:6.2f} ms  "
            f"acc {r['accuracy']:.3f}  agree {r['agreement']:.3f}  "
            f"max diff {r['max_prob_diff']:.1e}",
            flush=True,
        )
    base = results["PyTorch eager fp32"]["img_per_s_b32"]
    print(
        f"\n10x eager at batch 32 = {10 * base:.0f} img/s = {10 * base * gflop:.0f} GFLOP/s; "
        f"2 ms per image = {gflop / 0.002:.0f} GFLOP/s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"gflop_per_image": gflop, "threads": threads, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
