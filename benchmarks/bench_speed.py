"""Side-by-side speed benchmark: the seed workflow done the plain way vs graft's default.

    python benchmarks/bench_speed.py                # full: 10 + 10 epochs each way (~10 min)
    python benchmarks/bench_speed.py --quick        # 3 + 3 epochs, for a fast check
    python benchmarks/bench_speed.py --sizes demo small   # also a 720-image, 10-class folder
    make bench                                      # the full run

Runs, on the same images and the same split (the demo's five Pokémon sprites):

1. plain:  a hand-written PyTorch loop as in the seed tutorial: eager fp32, the frozen backbone
           recomputed every epoch, then the whole network fine-tuned at 1e-5 (batch 16);
2. graft:  ``graft.fit`` with its defaults and a cold (empty) feature cache, ``--graft-runs``
           times (3), each in a fresh process: the table takes the median run and prints
           the range (one 7-minute plain run averages its own noise, one 30 s graft run not);
3. predict: model throughput at batch 32 and single-image latency, eager fp32 PyTorch vs
           graft's engine, plus end-to-end files/s through ``Predictor``.

Each part runs in its own process, so peak memory (VmHWM) is per part. Prints one table
with ratios and, with --json, writes all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- children


def textbook_transform(mean, std):
    """graft's light augmentation in the textbook order, as a hand-written loop has it:
    graft's own applies the colour jitter to a sprite before enlarging it (cheaper, the
    same kind of change), which a plain loop does not do."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop((128, 128), scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10, fill=255),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def run_plain(data_dir: str, epochs: int, ft_epochs: int) -> dict:
    """The seed's workflow in a plain PyTorch loop (no caching, no engine tricks). It gets
    the same glibc malloc tuning as graft, so the ratio measures graft's method alone."""
    from graft._malloc import tune_malloc

    tune_malloc()
    import torch
    from torch import nn

    from graft.backbones import get_spec
    from graft.data import ImageFiles, build_transform, make_loader, scan
    from graft.model import create_backbone, make_head
    from graft.split import make_split

    torch.manual_seed(42)
    t_start = time.perf_counter()
    data = scan(data_dir)
    subsets = make_split(data.labels, data.classes, 0.2, 0.1, seed=42)
    spec = get_spec("efficientnet_lite0")
    pick = {s: [i for i, x in enumerate(subsets) if x == s] for s in ("train", "val", "test")}

    def loader(subset: str, augment: str, batch: int, shuffle: bool):
        tf = textbook_transform(spec.mean, spec.std) if augment == "light" else None
        tf = tf or build_transform(128, spec.mean, spec.std, augment)
        files = ImageFiles(
            [data.paths[i] for i in pick[subset]], [data.labels[i] for i in pick[subset]], tf, 128
        )
        return make_loader(files, batch, shuffle=shuffle, seed=42, workers=1)

    backbone, _ = create_backbone(spec)
    model = nn.Sequential(backbone, make_head(backbone.num_features, len(data.classes)))
    loss_fn = nn.CrossEntropyLoss()

    def epoch(opt, train_loader) -> None:
        model.train()
        backbone.eval()  # frozen BN, as Keras' trainable=False
        for b in train_loader:
            opt.zero_grad()
            loss_fn(model(b["images"]), b["labels"]).backward()
            opt.step()

    @torch.no_grad()
    def accuracy(subset: str) -> float:
        model.eval()
        right = n = 0
        for b in loader(subset, "none", 64, False):
            right += (model(b["images"]).argmax(1) == b["labels"]).sum().item()
            n += len(b["labels"])
        return right / n

    frozen_epoch_s, ft_epoch_s = [], []
    backbone.requires_grad_(False)
    opt = torch.optim.Adam(model[1].parameters(), 1e-3)
    for _ in range(epochs):
        t = time.perf_counter()
        epoch(opt, loader("train", "light", 32, True))
        accuracy("val")  # the seed validates every epoch
        frozen_epoch_s.append(time.perf_counter() - t)
    backbone.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), 1e-5)
    for _ in range(ft_epochs):
        t = time.perf_counter()
        epoch(opt, loader("train", "light", 16, True))
        accuracy("val")
        ft_epoch_s.append(time.perf_counter() - t)
    return {
        "wall_s": time.perf_counter() - t_start,
        "test_acc": accuracy("test"),
        "frozen_epoch_s": sum(frozen_epoch_s) / max(1, len(frozen_epoch_s)),
        "fine_tune_epoch_s": sum(ft_epoch_s) / max(1, len(ft_epoch_s)),
        "n_test": len(pick["test"]),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_graft(data_dir: str, epochs: int, ft_epochs: int, views: int = 0) -> dict:
    """graft.fit with its defaults (``views``: another number of cached views, if not 0)."""
    from graft import TrainConfig, fit

    with tempfile.TemporaryDirectory() as tmp:
        other = {"views": views} if views else {}
        cfg = TrainConfig(
            epochs=epochs, fine_tune_epochs=ft_epochs, cache_dir=f"{tmp}/cache", **other
        )
        t = time.perf_counter()
        result = fit(cfg, data_dir, f"{tmp}/run")
        wall = time.perf_counter() - t
    s = result.summary
    return {
        "wall_s": wall,
        "test_acc": s["test"]["accuracy"],
        "frozen_epoch_s": s["epoch_seconds"].get("frozen", 0.0),
        "fine_tune_epoch_s": s["epoch_seconds"].get("fine-tune", 0.0),
        "cache_s": s["timings"]["cache_seconds"],
        "timings": {k: round(v, 2) for k, v in s["timings"].items() if k.endswith("_seconds")},
        "plan": s["plan"],
        "engine": s["engine"],
        "epochs_run": len(result.history),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_predict(data_dir: str, backend: str) -> dict:
    """Model throughput (batch 32), single-image latency, and files/s end to end."""
    import numpy as np
    import torch

    from graft import TrainConfig, fit
    from graft.data import scan
    from graft.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        # A small trained run to predict with (the numbers do not depend on how well).
        fit(
            TrainConfig(epochs=1, fine_tune_epochs=0, augment="none", cache_dir=""),
            data_dir,
            f"{tmp}/run",
        )
        if backend == "eager":
            from graft.engines import Probabilities
            from graft.model import load_model

            model = Probabilities(load_model(f"{tmp}/run")).eval()

            def forward(x):
                with torch.no_grad():
                    return model(x)

            predictor = Predictor.from_run(f"{tmp}/run", backend="torch")
        else:
            predictor = Predictor.from_run(f"{tmp}/run")
            forward = predictor.runner
        x32, x1 = torch.randn(32, 3, 128, 128), torch.randn(1, 3, 128, 128)
        for _ in range(3):
            forward(x32)
        t = time.perf_counter()
        n = 20
        for _ in range(n):
            forward(x32)
        throughput = 32 * n / (time.perf_counter() - t)
        lat = []
        for _ in range(10):
            forward(x1)
        for _ in range(200):
            t = time.perf_counter()
            forward(x1)
            lat.append(time.perf_counter() - t)
        files = scan(data_dir, decode=False).paths[:640]
        t = time.perf_counter()
        predictor.predict(files)
        files_s = len(files) / (time.perf_counter() - t)
    return {
        "engine": getattr(forward, "name", "PyTorch eager fp32"),
        "throughput_b32": throughput,
        "latency_p50_ms": float(np.median(lat) * 1000),
        "latency_p99_ms": float(np.percentile(lat, 99) * 1000),
        "files_per_s": files_s,
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- parent


#: the small folder: 10 Pokémon, 72 evenly spaced animation frames each (about 500 for
#: training after the 20% test and 10% validation splits), where fixed costs weigh most
SMALL_POKEMON = {
    1: "bulbasaur", 4: "charmander", 7: "squirtle", 25: "pikachu", 150: "mewtwo",
    152: "chikorita", 155: "cyndaquil", 158: "totodile", 172: "pichu", 249: "lugia",
}  # fmt: skip
SMALL_PER_CLASS = 72


def small_folder(cache: Path) -> str:
    """The small folder, built once from the demo's npm package (links to its frames)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_data import build

    frames, _ = build(cache, SMALL_POKEMON)
    out = cache / f"small-{len(SMALL_POKEMON)}x{SMALL_PER_CLASS}"
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        for folder in sorted(frames.iterdir()):
            files = sorted(folder.iterdir())
            step = len(files) / SMALL_PER_CLASS
            (tmp / folder.name).mkdir(parents=True, exist_ok=True)
            for k in range(SMALL_PER_CLASS):
                src = files[int(k * step)]
                (tmp / folder.name / src.name).symlink_to(src.resolve())
        tmp.rename(out)
    return str(out)


def child(mode: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="dataset folder (default: the demo sprites)")
    p.add_argument("--quick", action="store_true", help="3 + 3 epochs instead of 10 + 10")
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=("demo", "small"),
        default=["demo"],
        help="demo: the demo's 1,506 sprites; small: 10 classes x 72 frames (720 images)",
    )
    p.add_argument(
        "--views-too",
        type=int,
        default=0,
        metavar="N",
        help="also run graft with --views N on each folder (its wall time and accuracy)",
    )
    p.add_argument(
        "--graft-runs",
        type=int,
        default=3,
        metavar="N",
        help="cold graft runs per folder (each its own process); the table takes the median "
        "by wall time and prints the range (a 30 s run varies by 10-20%% on a shared machine)",
    )
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, *rest = args.child
        fn = {"plain": run_plain, "graft": run_graft}.get(mode)
        if fn:
            result = fn(rest[0], *(int(a) for a in rest[1:]))
        else:
            result = run_predict(rest[0], rest[1])
        print(json.dumps(result))
        return

    data = args.data
    if data is None:
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo_data.py")],
            check=True,
            capture_output=True,
            text=True,
        )
        data = out.stdout.splitlines()[0]
    e = "3" if args.quick else "10"
    folders = {"demo": data}
    if "small" in args.sizes:
        folders["small"] = small_folder(ROOT / ".cache" / "demo")
    print(f"epochs: {e} frozen + {e} fine-tune; cpus: {os.cpu_count()}", file=sys.stderr)
    results: dict = {}

    def save(figures: dict) -> None:  # after every child: a failure later keeps these
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))

    for size in args.sizes:  # one after the other, each side in its own process
        runs = results if size == "demo" else results.setdefault(size, {})
        print(f"running plain on {folders[size]}...", file=sys.stderr)
        runs["plain"] = child("plain", folders[size], e, e)
        save(results)
        variants = [("graft", ())] + [("graft_views", (str(args.views_too),))] * bool(
            args.views_too
        )
        walls: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for i in range(args.graft_runs):  # interleaved: a slow spell of the host hits both
            for name, extra in variants:
                print(
                    f"running {name} {' '.join(extra)} ({i + 1}/{args.graft_runs})...",
                    file=sys.stderr,
                )
                walls[name].append(child("graft", folders[size], e, e, *extra))
                save(results | {f"{size}_so_far": walls})
        for name, done in walls.items():
            done.sort(key=lambda r: r["wall_s"])
            runs[name] = {**done[len(done) // 2], "all_wall_s": [r["wall_s"] for r in done]}
        save(results)
    if "demo" in args.sizes:
        for name, backend in (("predict_eager", "eager"), ("predict_graft", "graft")):
            print(f"running {name}...", file=sys.stderr)
            results[name] = child("predict", data, backend)
            save(results)
    for size in args.sizes:
        runs = results if size == "demo" else results[size]
        print(f"\n{size} ({folders[size]}):")
        print_table(runs, results if size == "demo" else None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(runs: dict, predict: dict | None) -> None:
    pl, gr = runs["plain"], runs["graft"]
    rows = [
        ("whole workflow wall time (s)", pl["wall_s"], gr["wall_s"], pl["wall_s"] / gr["wall_s"]),
        ("held-out test accuracy", pl["test_acc"], gr["test_acc"], None),
        (
            "frozen-stage epoch (s)",
            pl["frozen_epoch_s"],
            gr["frozen_epoch_s"],
            pl["frozen_epoch_s"] / max(gr["frozen_epoch_s"], 1e-9),
        ),
        (
            "fine-tune epoch (s)",
            pl["fine_tune_epoch_s"],
            gr["fine_tune_epoch_s"],
            pl["fine_tune_epoch_s"] / max(gr["fine_tune_epoch_s"], 1e-9),
        ),
        ("training peak RSS (MB)", pl["peak_rss_mb"], gr["peak_rss_mb"], None),
    ]
    pe, pg = (predict["predict_eager"], predict["predict_graft"]) if predict else ({}, {})
    rows += (
        [
            (
                "predict img/s, batch 32",
                pe["throughput_b32"],
                pg["throughput_b32"],
                pg["throughput_b32"] / pe["throughput_b32"],
            ),
            (
                "predict latency p50, 1 image (ms)",
                pe["latency_p50_ms"],
                pg["latency_p50_ms"],
                pe["latency_p50_ms"] / pg["latency_p50_ms"],
            ),
            (
                "predict files/s end to end",
                pe["files_per_s"],
                pg["files_per_s"],
                pg["files_per_s"] / pe["files_per_s"],
            ),
            ("predict peak RSS (MB)", pe["peak_rss_mb"], pg["peak_rss_mb"], None),
        ]
        if predict
        else []
    )
    print(f"\n{'':38} {'plain/eager':>12} {'graft':>12} {'ratio':>8}")
    walls = gr.get("all_wall_s", [gr["wall_s"]])
    print(
        f"(graft: the median of {len(walls)} cold runs, {min(walls):.1f}-{max(walls):.1f} s, "
        f"ratio {pl['wall_s'] / max(walls):.1f}x-{pl['wall_s'] / min(walls):.1f}x)"
    )
    for label, a, b, r in rows:
        ratio = f"{r:7.1f}x" if r is not None else ""
        print(f"{label:38} {a:12.4g} {b:12.4g} {ratio:>8}")
    share = 100 * gr["frozen_epoch_s"] / pl["frozen_epoch_s"]
    print(
        f"\nfrozen epoch on cached features = {share:.2f}% "
        f"of a recomputed one; graft cache pass {gr['cache_s']:.1f} s"
    )
    if "graft_views" in runs:
        gv = runs["graft_views"]
        vw = gv.get("all_wall_s", [gv["wall_s"]])
        print(
            f"graft with other views: {gv['wall_s']:.1f} s ({pl['wall_s'] / gv['wall_s']:.1f}x; "
            f"{min(vw):.1f}-{max(vw):.1f} s over {len(vw)} runs), "
            f"held-out accuracy {gv['test_acc']:.4f}; plan: {gv['plan']}"
        )
    print(f"graft plan: {gr['plan']}")
    print(f"graft timings: {gr.get('timings')}")
    if predict:
        print(f"graft predict engine: {pg['engine']}")


if __name__ == "__main__":
    main()
