"""Streaming at scale: peak memory and throughput of `graft train` and `graft predict --out`
on generated folders of 1k, 10k and 50k images.

    python benchmarks/bench_scale.py --sizes 1000 10000 50000 --json benchmarks/results/scale.json

Each size gets its own folder of 64x64 PNGs (three classes of drawn shapes, written once
under .cache/bench-scale/) and its own empty feature cache. Every command runs in its own
process; its peak RSS comes from the kernel (``wait4``'s ``ru_maxrss``). The question is
whether memory grows with the number of images beyond the feature cache itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SHAPES, draw_shape


def make_images(root: Path, n: int, size: int = 64) -> Path:
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(n)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
    for i in range(n):
        shape = SHAPES[i % 3]
        draw_shape(shape, rng, size).save(root / shape / f"{i:06d}.png", compress_level=1)
    done.write_text("ok")
    return root


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stderr tail) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 7):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024, err[-600:]


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--work", default=".cache/bench-scale")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for n in args.sizes:
        t = time.perf_counter()
        data = make_images(work / f"images-{n}", n)
        print(f"{n} images ready ({time.perf_counter() - t:.0f} s)", flush=True)
        cache, run = work / f"cache-{n}", work / f"run-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        env = {**os.environ, "GRAFT_CACHE_DIR": str(cache)}
        graft = [sys.executable, "-m", "graft"]
        train_s, train_mb, _ = measure(
            [
                *graft,
                "train",
                str(data),
                "--out",
                str(run),
                "--quiet",
                "--img-size",
                "64",
                "--augment",
                "none",
                "--epochs",
                "3",
                "--fine-tune-epochs",
                "0",
            ],
            env,
        )
        summary = json.loads((run / "summary.json").read_text())
        timings = summary["timings"]
        preds = run / "predictions.jsonl"
        predict_s, predict_mb, _ = measure(
            [*graft, "predict", str(run), str(data), "--out", str(preds)], env
        )
        lines = sum(1 for _ in open(preds))
        assert lines == n, f"{lines} predictions for {n} images"
        row = {
            "images": n,
            "train_seconds": round(train_s, 1),
            "train_peak_rss_mb": round(train_mb),
            "backbone_pass_img_per_s": round(n / timings["cache_seconds"], 1),
            "feature_cache_mb": round(du_mb(cache), 1),
            "test_accuracy": summary["test"]["accuracy"],
            "predict_seconds": round(predict_s, 1),
            "predict_img_per_s": round(n / predict_s, 1),
            "predict_peak_rss_mb": round(predict_mb),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        "| images | train s | train peak RSS | backbone pass | feature cache on disk "
        "| predict --out | predict peak RSS |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['images']:,} | {r['train_seconds']} | {r['train_peak_rss_mb']} MB | "
            f"{r['backbone_pass_img_per_s']} img/s | {r['feature_cache_mb']} MB | "
            f"{r['predict_img_per_s']} img/s | {r['predict_peak_rss_mb']} MB |"
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = b["train_peak_rss_mb"] - a["train_peak_rss_mb"]
        cache_growth = b["feature_cache_mb"] - a["feature_cache_mb"]
        print(
            f"\ntrain peak RSS grew {growth} MB from {a['images']:,} to {b['images']:,} images "
            f"while the feature cache grew {cache_growth:.0f} MB; predict peak RSS grew "
            f"{b['predict_peak_rss_mb'] - a['predict_peak_rss_mb']} MB."
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"platform": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
