"""Open set: which out-of-distribution score, and which threshold, answers "unknown" for
images of none of a model's classes while keeping the pictures of its own classes.

    python benchmarks/bench_openset.py [--run runs/demo] [--json runs/bench_openset.json]

Data, all public and built here (nothing downloaded but the npm package the demo uses):
- the run's own split (training images for fitting scores, validation for the threshold,
  test for accuracy on answered images) and, for the demo model, its five own artworks;
- other Pokémon's dream-world artwork and black/white sprites (numbers 152-386, none of the
  five classes), scikit-image's sample photographs, and synthetic textures.

Scores (higher = more like the training classes), each from what a run already has, the
pooled backbone features and the logits: maximum softmax probability (Hendrycks & Gimpel
2017), energy (Liu et al. 2020), Mahalanobis distance to the class means with a shared
Ledoit-Wolf covariance (Lee et al. 2018), its relative form (Ren et al. 2021) and the
k-nearest-neighbour distance on L2-normalised features (Sun et al. 2022).

Thresholds, each keeping 95% of a reference set: the in-domain validation images ("val"),
validation images under the `domain` augmentation ("shifted val", 4 views each: a simulated
change of source), and the --unseen images where the run has them ("unseen").
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

OTHERS = range(152, 387)


def build_others(cache: Path) -> dict[str, Path]:
    """Other Pokémon (artwork, sprites), photographs and textures, as flat folders."""
    import demo_data
    from PIL import Image

    out = {k: cache / k for k in ("others-artwork", "others-sprites", "photos", "textures")}
    if (cache / ".built").exists():
        return out
    tgz = demo_data.fetch_package(ROOT / ".cache" / "demo")
    for folder in out.values():
        folder.mkdir(parents=True, exist_ok=True)
    front = demo_data.ANIMATED
    with tarfile.open(tgz) as tar:
        for member in tar:
            name, stem = member.name, Path(member.name).stem
            if not stem.isdigit() or int(stem) not in OTHERS:
                continue
            if name.startswith(demo_data.ARTWORK) and name.endswith(".svg"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                demo_data.svg_on_white(data).save(out["others-artwork"] / f"{stem}.png")
            elif name == f"{front}{stem}.gif":
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                demo_data.frames_on_white(data)[0].save(out["others-sprites"] / f"{stem}.png")
    import skimage.data as sk

    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel", "logo", "motorcycle_left",
                 "page", "camera", "coins", "moon", "text", "clock", "horse", "brick", "grass",
                 "gravel", "rough_wall"):  # fmt: skip
        try:
            im = getattr(sk, name)()
        except Exception:  # some need pooch (a download): skipped
            continue
        image = Image.fromarray(np.asarray(im)).convert("RGB")
        image.save(out["photos"] / f"{name}.png")
    rng = np.random.default_rng(0)
    for i in range(40):
        kind = i % 4
        if kind == 0:
            a = rng.integers(0, 256, (128, 128, 3))
        elif kind == 1:
            x = np.linspace(0, rng.uniform(4, 30), 128)
            a = (np.sin(x)[None, :, None] * 127 + 128) * np.ones((128, 1, 3))
            a = a * rng.uniform(0.3, 1.0, 3)
        elif kind == 2:
            k = int(rng.integers(4, 32))
            a = ((np.indices((128, 128)).sum(0) // k) % 2)[..., None] * rng.integers(0, 256, 3)
        else:
            a = np.ones((128, 128, 3)) * rng.integers(0, 256, 3)
            a += rng.normal(0, 20, a.shape)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(out["textures"] / f"t{i}.png")
    (cache / ".built").touch()
    return out


def features_of(model, paths: list[Path], transform, views: int = 1) -> tuple[np.ndarray, ...]:
    """Pooled features and logits of ``paths`` (``views`` transformed copies each)."""
    import torch

    from graft.runtime import load_image

    feats, logits = [], []
    with torch.inference_mode():
        for start in range(0, len(paths), 64):
            batch = []
            for p in paths[start : start + 64]:
                im = load_image(p)
                batch += [transform(im) for _ in range(views)]
            x = torch.stack(batch)
            f = model.backbone(x)
            feats.append(f.numpy())
            logits.append(model.head(f).numpy())
    return np.concatenate(feats), np.concatenate(logits)


def fit_scores(train_f: np.ndarray, train_y: np.ndarray, n_classes: int, k: int = 10):
    """Every candidate score as a function of (features, logits) -> higher is in-class."""
    from scipy.special import logsumexp, softmax
    from sklearn.covariance import LedoitWolf

    means = np.stack([train_f[train_y == c].mean(0) for c in range(n_classes)])
    centred = train_f - means[train_y]
    prec = LedoitWolf().fit(centred).precision_
    glob_mean = train_f.mean(0)
    glob_prec = LedoitWolf().fit(train_f - glob_mean).precision_
    bank = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)

    def maha(f: np.ndarray) -> np.ndarray:
        d = f[:, None, :] - means[None]
        return np.einsum("ncd,de,nce->nc", d, prec, d)

    def scores(f: np.ndarray, z: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
        md = maha(f)
        g = f - glob_mean
        md0 = np.einsum("nd,de,ne->n", g, glob_prec, g)
        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        sims = fn @ bank.T
        kth = np.sort(sims, axis=1)[:, -k]
        return {
            "msp": softmax(z / temperature, axis=1).max(1),
            "energy": logsumexp(z / temperature, axis=1),
            "mahalanobis": -md.min(1),
            "relative mahalanobis": -(md - md0[:, None]).min(1),
            f"knn (k={k})": kth,
        }

    return scores


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def fpr_at_95(inside: np.ndarray, outside: np.ndarray) -> float:
    return float((outside >= np.quantile(inside, 0.05)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", type=Path)
    parser.add_argument("--unseen", default=".cache/demo/artwork-1-4-7-25-150", type=Path)
    parser.add_argument("--cache", default=".cache/bench-openset", type=Path)
    parser.add_argument("--keep", type=float, default=0.95)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import csv

    import torch

    from graft.data import build_transform
    from graft.model import load_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    others = build_others(args.cache)
    model = load_model(args.run / "model.safetensors").eval()
    info = model.info
    clean = build_transform(info.img_size, info.mean, info.std, "none", info.trim)
    config = json.loads((args.run / "config.json").read_text())
    root = Path(config["data_root"])
    rows = list(csv.DictReader(open(args.run / "split.csv", encoding="utf-8")))
    classes = list(info.classes)
    sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for subset in ("train", "val", "test"):
        chosen = [r for r in rows if r["subset"] == subset]
        paths = [root / r["path"] for r in chosen]
        y = np.array([classes.index(r["class"]) for r in chosen])
        f, z = features_of(model, paths, clean)
        sets[subset] = (f, z, y)
    val_paths = [root / r["path"] for r in rows if r["subset"] == "val"]
    for aug in ("light", "strong", "domain"):
        shift = build_transform(info.img_size, info.mean, info.std, aug, info.trim)
        f, z = features_of(model, val_paths, shift, views=4)
        sets[f"{aug} val"] = (f, z, np.repeat(sets["val"][2], 4))
    own = sorted(p for p in args.unseen.rglob("*.png")) if args.unseen.is_dir() else []
    if own:
        f, z = features_of(model, own, clean)
        sets["own artwork"] = (f, z, np.array([classes.index(p.parent.name) for p in own]))
    for name, folder in others.items():
        paths = sorted(folder.glob("*.png"))
        f, z = features_of(model, paths, clean)
        sets[name] = (f, z, np.full(len(paths), -1))
    print(f"features in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    np.savez(
        args.cache / "features.npz",
        **{
            f"{name}|{part}": arr
            for name, t in sets.items()
            for part, arr in zip("fzy", t, strict=True)
        },
    )

    train_f, _, train_y = sets["train"]
    score_fn = fit_scores(train_f, train_y, len(classes))
    scored = {name: score_fn(f, z, info.temperature) for name, (f, z, _) in sets.items()}
    refs = ["val", "light val", "strong val", "domain val"] + (["own artwork"] if own else [])
    result: dict[str, dict] = {}
    for score in scored["val"]:
        inside = scored["val"][score]
        entry: dict[str, dict] = {"auroc": {}, "fpr95": {}}
        for name in others:
            entry["auroc"][name] = auroc(inside, scored[name][score])
            entry["fpr95"][name] = fpr_at_95(inside, scored[name][score])
        if own:
            entry["auroc"]["own artwork vs others-artwork"] = auroc(
                scored["own artwork"][score], scored["others-artwork"][score]
            )
        for ref in refs:
            threshold = float(np.quantile(scored[ref][score], 1 - args.keep))
            row: dict[str, float] = {"threshold": threshold}
            for name in others:
                row[f"{name} rejected"] = float((scored[name][score] < threshold).mean())
            f, z, y = sets["test"]
            answered = scored["test"][score] >= threshold
            right = z.argmax(1) == y
            row["test answered"] = float(answered.mean())
            row["test accuracy answered"] = float(right[answered].mean()) if answered.any() else 0
            if own:
                f, z, y = sets["own artwork"]
                ok = (scored["own artwork"][score] >= threshold) & (z.argmax(1) == y)
                row["own artwork named"] = int(ok.sum())
            entry[f"threshold from {ref}"] = row
        result[score] = entry
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
