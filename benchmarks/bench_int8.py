"""fp32 against INT8 exports of one trained run, as `graft export [--int8]` writes them.

    python benchmarks/bench_int8.py RUN [--rounds 8] [--seconds 1] [--variants] [--json OUT]

The run is exported four ways with graft's own export (onnx and openvino, fp32 and
``--int8``). Each export is loaded with its exported runtime (``graft_runtime.ExportedModel``)
and timed on the run's held-out test images, decoded beforehand so only the network runs:
images per second at batch 32 and the median latency of one image, each engine's best of
``--rounds`` rounds taken in turn (the machine is shared), and INT8's speed-up over fp32 on
the same engine as the median of the rounds' ratios. OpenVINO is also timed
with graft's static-shape engine (``graft.fast.OpenVinoEngine``, what ``graft predict``
uses). The agreement with fp32 is the one each INT8 export measured and recorded
(graft.json's ``int8``). ``--variants`` adds the choices behind graft's defaults: the tail
(head, softmax, familiarity) kept in fp32 or quantized, and 7-bit or 8-bit weights, on both
engines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def timed(fn: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float) -> np.ndarray:
    fn(x)
    fn(x)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return np.asarray(times)


def exports(run: Path, tmp: Path) -> dict[str, Any]:
    from graft.export import export_run

    made = {}
    for fmt in ("onnx", "openvino"):
        for int8 in (False, True):
            start = time.perf_counter()
            out = export_run(run, fmt, tmp / f"{fmt}{'-int8' * int8}", int8=int8)
            made[(fmt, int8)] = (out, time.perf_counter() - start)
    return made


def variants(run: Path, tmp: Path) -> dict[str, Any]:
    """The defaults' alternatives, each measured against fp32 on the test split."""
    import onnxruntime as ort
    import openvino as ov

    from graft.engines import Probabilities, export_onnx
    from graft.export import output_name
    from graft.model import load_model
    from graft.quantize import agreement, batches, quantize_onnx, run_images
    from graft.runtime import preprocess, split_output

    model = load_model(run).eval()
    info = model.info
    fp32 = export_onnx(
        Probabilities(model).eval(), info.img_size, tmp / "v32.onnx", output_name(model)
    )
    images = run_images(run, info.classes)

    def scorer(run_batch: Callable[[np.ndarray], np.ndarray]) -> Callable:
        def score(ims: list) -> tuple:
            x = preprocess(ims, info.preprocessing)
            return split_output(run_batch(x), len(info.classes), model.familiarity is not None)

        return score

    def onnxruntime(path: Path) -> Callable:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return scorer(lambda x: session.run(None, {"images": x})[0])

    def openvino(path: Path) -> Callable:
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return scorer(lambda x: compiled(x)[0])

    reference = onnxruntime(fp32)
    results = {}
    for tail in (True, False):
        for reduce in (True, False):
            q8 = quantize_onnx(
                fp32,
                tmp / f"v{tail:d}{reduce:d}.onnx",
                lambda: batches(images.calibration, info),
                keep_tail_fp32=tail,
                reduce_range=reduce,
            )
            for engine, load in (("ONNX Runtime", onnxruntime), ("OpenVINO", openvino)):
                label = (
                    f"tail {'fp32' if tail else 'INT8'}, {7 if reduce else 8}-bit weights, {engine}"
                )
                results[label] = r = agreement(reference, load(q8), images, info)
                print(
                    f"{label:<44} agree {r['agreement_top1']:.4f}  unknown "
                    f"{r['agreement_unknown']:.4f}  max diff {r['max_abs_prob_diff']:.3f}  mean "
                    f"{r['mean_abs_prob_diff']:.4f}  familiarity "
                    f"{r.get('max_abs_familiarity_diff', 0):.3f}",
                    flush=True,
                )
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per measurement")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of timing (best kept)")
    ap.add_argument("--variants", action="store_true", help="also measure the alternatives")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from graft.fast import OpenVinoEngine, cpu_threads
    from graft.modelinfo import read_info
    from graft.quantize import batches, run_images
    from graft.runtime import ExportedModel

    run = Path(args.run)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    threads = cpu_threads()
    made = exports(run, tmp)
    _, info = read_info(run)
    x = np.concatenate(list(batches(run_images(run, info.classes).test, info, 32)))
    print(f"{len(x)} test images, {info.img_size} px, {threads} threads")
    engines: dict[str, tuple[Callable[[np.ndarray], Any], dict[str, Any], float]] = {}
    for fmt in ("onnx", "openvino"):
        loaded = {i: ExportedModel(made[(fmt, i)][0], threads=threads) for i in (False, True)}
        kinds = {f"{loaded[False].engine} (graft_runtime)": lambda m: m._run}
        if fmt == "openvino":  # graft predict's engine on the same IR
            kinds["OpenVINO, static shapes (graft.fast)"] = lambda m: (
                OpenVinoEngine(m.folder / "model.xml", threads).run
            )
        for kind, make in kinds.items():
            for int8, model in loaded.items():  # fp32 then INT8: timed side by side
                name = f"{kind}, {'INT8' if int8 else 'fp32'}"
                engines[name] = (make(model), model.meta, made[(fmt, int8)][1])
    # The machine is shared: every engine is timed in each of several rounds, in turn, fp32
    # right before INT8. Each keeps its best round, and the INT8 speed-up is the median of
    # the rounds' ratios (each taken from neighbouring seconds).
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, (fn, _meta, _s) in engines.items():
            b32 = timed(fn, x[:32], args.seconds)
            b1 = timed(fn, x[:1], args.seconds)
            rounds[name].append((32 / float(np.median(b32)), float(np.median(b1) * 1000)))
    rows: dict[str, Any] = {}
    for name, (_fn, meta, seconds) in engines.items():
        rate = max(r[0] for r in rounds[name])
        p50 = min(r[1] for r in rounds[name])
        q8 = meta.get("int8") or {}
        rows[name] = {"img_per_s_b32": rate, "p50_ms_b1": p50, "export_s": seconds}
        extra = ""
        if q8:
            base = rounds[name.replace(", INT8", ", fp32")]
            ratios = [(a[0] / b[0], b[1] / a[1]) for a, b in zip(rounds[name], base, strict=True)]
            rows[name]["speedup_b32"] = float(np.median([r[0] for r in ratios]))
            rows[name]["speedup_b1"] = float(np.median([r[1] for r in ratios]))
            rows[name]["int8"] = q8
            extra = (
                f"x{rows[name]['speedup_b32']:.2f} / x{rows[name]['speedup_b1']:.2f}  "
                f"agree {q8['agreement_top1']:.4f}  max diff {q8['max_abs_prob_diff']:.3f}  "
                f"acc {q8['accuracy_int8']:.4f} (fp32 {q8['accuracy_fp32']:.4f})"
            )
        print(
            f"{name:<48} {rate:7.1f} img/s  p50 {p50:6.2f} ms  export {seconds:5.1f} s  {extra}",
            flush=True,
        )
    results: dict[str, Any] = {
        "command": "python benchmarks/bench_int8.py " + " ".join(sys.argv[1:]),
        "threads": threads,
        "n_test": len(x),
        "load_average_before_after": [load_before, os.getloadavg()],
        "engines": rows,
    }
    if args.variants:
        results["variants"] = variants(run, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
