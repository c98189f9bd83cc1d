"""Cold start, side by side in one invocation: `graft --help`, and `graft predict RUN one.png`
from the run's current ONNX export without torch (graft.fast) against the PyTorch path that
builds the model first (what every predict did before; still what `GRAFT_ENGINE=torch` or a
stale export gives).

Each command is a fresh process, run ``--repeat`` times interleaved (help, fast, torch, help,
...), so a noisy machine slows all of them alike; medians and the ratio are reported, with
the peak resident memory of each (GNU time's %M).

    python benchmarks/bench_coldstart.py RUN IMAGE [--folder DIR] [--repeat 5] [--json out.json]

RUN is a run folder made by `graft train` (e.g. runs/demo after `make demo`). With
``--folder``, also the throughput of `graft predict RUN DIR --out FILE.csv` (files per second,
end to end, decoding included) against the network alone on the same engine (the
preprocessed images of DIR in batches of 32), and the PyTorch path's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the old path, in a fresh process: the PyTorch Predictor (it builds the model with timm)
TORCH_PREDICT = (
    "import sys; from graft.predict import Predictor; "
    "p = Predictor.from_run(sys.argv[1]); print(p.predict([sys.argv[2]])[0].label)"
)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of one fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as fh:
        wrapped = ["/usr/bin/time", "-f", "%M", "-o", fh.name, *cmd] if _gnu_time() else cmd
        t = time.perf_counter()
        subprocess.run(wrapped, check=True, capture_output=True, env=env)
        seconds = time.perf_counter() - t
        rss = int(Path(fh.name).read_text().split()[-1]) // 1024 if _gnu_time() else 0
    return seconds, rss


def _gnu_time() -> bool:
    return Path("/usr/bin/time").is_file()


def _throughput(run: Path, folder: Path, env: dict[str, str], graft: str) -> dict[str, float]:
    """Files per second of `graft predict --out` (fast and torch paths) and of the engine
    alone on the same preprocessed batches."""
    from graft.fast import open_predictor
    from graft.files import expand_inputs

    paths = expand_inputs([folder])
    out: dict[str, float] = {"images": len(paths)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("fast", {}), ("torch", {"GRAFT_ENGINE": "torch"})):
            csv = Path(tmp) / f"{name}.csv"
            t = time.perf_counter()
            subprocess.run(
                [graft, "predict", str(run), str(folder), "--out", str(csv)],
                check=True,
                capture_output=True,
                env={**env, **extra},
            )
            out[f"predict_{name}_files_per_s"] = round(len(paths) / (time.perf_counter() - t), 1)
    predictor = open_predictor(run, n_images=len(paths))
    engine = getattr(predictor, "engine", None)
    if engine is not None:
        import numpy as np

        batches = [
            np.stack([predictor.prepare(p) for p in paths[i : i + 32]])  # type: ignore[attr-defined]
            for i in range(0, len(paths), 32)
        ]
        engine.run(batches[0])  # compile the shape first, as a job does once
        t = time.perf_counter()
        for batch in batches:
            engine.run(batch)
        out["network_only_images_per_s"] = round(len(paths) / (time.perf_counter() - t), 1)
        out["engine"] = engine.name  # type: ignore[assignment]
        out["end_to_end_over_network"] = round(
            out["predict_fast_files_per_s"] / out["network_only_images_per_s"], 3
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    graft = shutil.which("graft") or str(Path(sys.executable).with_name("graft"))
    env = {**os.environ}
    commands = {
        "help": [graft, "--help"],
        "predict_fast": [graft, "predict", str(args.run), str(args.image), "--json"],
        "predict_torch": [sys.executable, "-c", TORCH_PREDICT, str(args.run), str(args.image)],
    }
    subprocess.run(commands["predict_fast"], check=True, capture_output=True)  # warm the disk
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            runs[name].append(_timed(cmd, env))
    result: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "repeat": args.repeat,
        "run": str(args.run),
    }
    for name, values in runs.items():
        result[name] = {
            "median_s": round(statistics.median(v[0] for v in values), 3),
            "all_s": [round(v[0], 3) for v in values],
            "peak_rss_mb": max(v[1] for v in values),
        }
    fast = result["predict_fast"]["median_s"]  # type: ignore[index]
    torch_s = result["predict_torch"]["median_s"]  # type: ignore[index]
    result["predict_fast_over_torch"] = round(fast / torch_s, 3)
    if args.folder is not None:
        result["folder"] = _throughput(args.run, args.folder, env, graft)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
