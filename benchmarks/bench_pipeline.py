"""The prediction pipeline against its network, side by side in one process: how close the
network comes to the CPU's fp32 peak, and how close files per second (decoding included)
come to the network alone.

    python benchmarks/bench_pipeline.py RUN [--folder DIR | --make 600] [--peak 157]
        [--json benchmarks/results/pipeline.json]

RUN is a run folder made by `graft train`. The images are DIR's, or ``--make N`` drawn
images written to a temporary folder (256 px, half PNG, half JPEG: photos and drawings
bigger than the network's input, as users give them). Reported:

- the network alone: the run's exported model (``model.onnx``: backbone, head, softmax,
  familiarity) on preprocessed batches of 32, on each engine and batch shape graft can
  use, in images/s and GFLOP/s (FLOPs counted by ``torch.utils.flop_counter`` on the
  PyTorch model), and the share of ``--peak``;
- end to end: ``graft.fast.open_predictor(RUN).predict_scores(paths)`` (decode, resize,
  normalise, run, in batches of 32) with 1 and 2 decoding threads, and its ratio to the
  network alone on the same engine;
- ``graft predict RUN DIR --out x.csv`` as a fresh process (start-up included);
- where a file's preparation goes: each step of ``graft.runtime`` by format, in ms per
  image, against the network's core-ms per image.

``--peak``: the CPU's fp32 peak in GFLOP/s. This machine's: 2 cores x 2.45 GHz x 2 FMA units
x 8 fp32 lanes (AVX2) x 2 FLOP per FMA = 157 GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graft._malloc  # noqa: E402,F401  (the allocator tuning graft uses)

if TYPE_CHECKING:
    from graft.runtime import Preprocessing


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` drawn 256 px images (shapes on a tinted background), half PNG, half JPEG."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.integers(0, 200, 2)
            x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
                [int(x0), int(y0), int(x1), int(y1)], fill=colour
            )
        path = folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}"
        im.save(path, quality=90) if path.suffix == ".jpg" else im.save(path)
        paths.append(path)
    return paths


def rate(fn, n_images: int, seconds: float = 4.0) -> float:
    """Images per second of ``fn()`` (which handles ``n_images``): the median of repeats
    over about ``seconds`` (at least 3) after a warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / float(np.median(times))


def gflop_per_image(run: Path) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from graft.engines import Probabilities
    from graft.model import load_model

    model = Probabilities(load_model(run)).eval()
    size = model.model.info.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def step_costs(paths: list[Path], pre: Preprocessing) -> dict[str, dict[str, float]]:
    """Where one file's preparation goes, by format: ms per image of each step of
    ``graft.runtime`` (decode with the JPEG draft, trim, detail cap, resize, normalise),
    each the best of 5 passes over up to 100 files of that format, on one thread."""
    from PIL import Image

    from graft.runtime import cap_detail, load_image, normalise_into, trim_background

    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    out = np.empty((1, 3, pre.size, pre.size), dtype=np.float32)
    square = (pre.size, pre.size)

    def ms(fn: Any, items: list[Any]) -> float:
        fn(items[0])
        best = math.inf
        for _ in range(5):
            t = time.perf_counter()
            for item in items:
                fn(item)
            best = min(best, time.perf_counter() - t)
        return best / len(items) * 1e3

    costs: dict[str, dict[str, float]] = {}
    for suffix in sorted({p.suffix.lower() for p in paths}):
        files = [p for p in paths if p.suffix.lower() == suffix][:100]
        images = [load_image(f, pre.size) for f in files]
        trimmed = [trim_background(im) if pre.trim else im for im in images]
        capped = [cap_detail(im, pre.detail) for im in trimmed]
        resized = [np.asarray(im.resize(square, Image.Resampling.BILINEAR))[None] for im in capped]
        costs[suffix] = {
            "decode": ms(lambda f: load_image(f, pre.size), files),
            "trim": ms(trim_background, images) if pre.trim else 0.0,
            "detail cap": ms(lambda im: cap_detail(im, pre.detail), trimmed),
            "resize": ms(lambda im: im.resize(square, Image.Resampling.BILINEAR), capped),
            "normalise": ms(lambda a: normalise_into(out, a, mean, std), resized),
        }
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--make", type=int, default=600)
    ap.add_argument("--peak", type=float, default=157.0, help="fp32 peak, GFLOP/s")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from graft.fast import open_predictor
    from graft.files import expand_inputs
    from graft.inference import OnnxEngine, OpenVinoEngine
    from graft.modelinfo import current_onnx

    tmp = Path(tempfile.mkdtemp())
    try:
        folder = args.folder or tmp / "images"
        paths = expand_inputs([folder]) if args.folder else make_images(folder, args.make)
        gflop = gflop_per_image(args.run)
        # the engine a folder of 1,000 or more images gets (OpenVINO; ONNX Runtime below)
        predictor = open_predictor(args.run, n_images=max(1000, len(paths)))
        x = np.stack([predictor.prepare(p) for p in paths[:32]])  # type: ignore[attr-defined]
        onnx = current_onnx(args.run / "model.safetensors")
        assert onnx is not None, f"{args.run} has no current model.onnx: run graft predict once"
        threads = os.cpu_count() or 1
        network: dict[str, float] = {}
        engines = {
            "OpenVINO static, batch 32": lambda: OpenVinoEngine(onnx, threads, 32),
            "OpenVINO static, 2 x 16": lambda: OpenVinoEngine(onnx, threads, 16),
            "OpenVINO static, 4 x 8": lambda: OpenVinoEngine(onnx, threads, 8),
            "ONNX Runtime": lambda: OnnxEngine(onnx, threads),
        }
        for name, make in engines.items():
            engine = make()
            network[name] = rate(lambda e=engine: e.run(x), len(x))
        prepare = predictor.prepare  # type: ignore[attr-defined]
        steps = step_costs(paths, predictor.info.preprocessing)  # type: ignore[attr-defined]
        sample = paths[:200]
        decode = rate(lambda: [prepare(p) for p in sample], len(sample), 2)
        engine_name = predictor.engine.name  # type: ignore[attr-defined]
        own = rate(lambda: predictor.engine.run(x), len(x))  # type: ignore[attr-defined]
        end_to_end = {}
        for workers in (1, 2):
            predictor.workers = workers  # type: ignore[attr-defined]
            end_to_end[workers] = rate(lambda: predictor.predict_scores(paths), len(paths), 10)
        graft = shutil.which("graft") or str(Path(sys.executable).with_name("graft"))
        t = time.perf_counter()
        subprocess.run(
            [graft, "predict", str(args.run), str(folder), "--out", str(tmp / "x.csv")],
            check=True,
            capture_output=True,
        )
        command = len(paths) / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{len(paths)} images; {gflop:.3f} GFLOP per image; peak {args.peak:.0f} GFLOP/s")
    print(f"\n{'network alone (batch of 32 images)':40} {'img/s':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for name, r in network.items():
        print(f"{name:40} {r:8.0f} {r * gflop:8.1f} {r * gflop / args.peak:8.0%}")
    print(f"\nend to end, {engine_name} (network alone {own:.0f} img/s):")
    cores = os.cpu_count() or 1
    # The network keeps every core busy: per image it costs cores/own core-seconds, and
    # decoding 1/decode more, so no overlap can beat cores / (cores/own + 1/decode).
    bound = cores / (cores / own + 1 / decode)
    print(
        f"  decoding + preprocessing alone, 1 thread: {decode:.0f} images/s; on {cores} cores "
        f"no pipeline can pass {bound:.0f} files/s = {bound / own:.0%} of the network"
    )
    for workers, r in end_to_end.items():
        print(f"  {workers} decoding thread(s): {r:6.0f} files/s = {r / own:.0%} of the network")
    print(
        f"\nwhere a file's preparation goes (ms per image, one thread; the network: "
        f"{cores / own * 1e3:.2f} core-ms per image)"
    )
    names = list(next(iter(steps.values())))
    print(f"  {'format':8}" + "".join(f"{n:>12}" for n in names) + f"{'sum':>8}")
    for suffix, cost in steps.items():
        row = "".join(f"{cost[n]:12.3f}" for n in names)
        print(f"  {suffix:8}{row}{sum(cost.values()):8.3f}")
    print(f"  `graft predict RUN DIR --out`, a fresh process: {command:.0f} files/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "images": len(paths),
                    "gflop_per_image": gflop,
                    "peak_gflop_s": args.peak,
                    "network_img_s": network,
                    "predictor_engine": engine_name,
                    "predictor_engine_img_s": own,
                    "end_to_end_files_s": end_to_end,
                    "decode_img_s_one_thread": decode,
                    "bound_files_s": bound,
                    "step_ms": steps,
                    "command_files_s": command,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
