"""Open set: which out-of-distribution score, and which threshold, answers "unknown" for
images of none of a model's classes while keeping the pictures of its own classes.

    python benchmarks/bench_openset.py --case demo|many100|fashion|digits [--json OUT]
    python benchmarks/bench_openset.py --all --json benchmarks/results/openset-2026-12-02b.json
    python benchmarks/bench_openset.py --tables benchmarks/results/openset-2026-12-02b.json

Cases (benchmarks/openset_data.py builds their data; missing runs are trained with graft's
defaults into /tmp/openset-runs/CASE): the demo model (five Pokémon sprites), a 100-class
sprite model (Pokémon 152-251 against 252-386), Fashion-MNIST 0-5 against 6-9 and
scikit-learn's digits 0-5 against 6-9. Each run's own split: training images fit the scores
(and fill the kNN bank), validation images set the threshold, test images are the in-class
side of every AUROC and give the accuracy on answered images.

Scores (higher = more like the training classes), from the pooled backbone features and the
logits: maximum softmax probability (Hendrycks & Gimpel 2017), energy (Liu et al. 2020),
Mahalanobis distance to the class means with a shared Ledoit-Wolf covariance (Lee et al.
2018), its relative form (Ren et al. 2021), and the cosine similarity to the k-th nearest
training feature (Sun et al. 2022) for k in 1/5/10/20 and a bank of all training features or
a class-balanced random sample of 4096 ... 256.

Thresholds, each keeping 95% of a reference set: validation images ("val"), validation under
graft's `light`, `strong` or `domain` augmentation (4 views each, seed 0), and the --unseen
images where the run has them ("unseen": pictures of its classes from elsewhere). For each,
a bootstrap over the reference's images (5-95% range of what the threshold then does) and,
for kNN, a leave-one-class-out estimate graft could compute alone: the share of validation
images rejected when their own class is taken out of the bank (a new class, same source).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import openset_data  # noqa: E402

KS = (1, 5, 10, 20)
CAPS = (None, 4096, 2048, 1024, 512, 256)
AUGS = ("light", "strong", "domain")
VIEWS = 4
AUGS_VAL = tuple(f"{a} val" for a in AUGS)
Sets = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


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
            feats.append(f.float().numpy())
            logits.append(model.head(f).float().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def _load_cache(cache: Path, key: str) -> Sets:
    if not cache.exists():
        return {}
    data = np.load(cache)
    if str(data["_key"]) != key:
        return {}
    names = {k.split("|")[0] for k in data.files if "|" in k}
    return {n: tuple(data[f"{n}|{p}"] for p in "fzy") for n in names}  # type: ignore[misc]


def case_features(case: openset_data.Case) -> tuple[Sets, dict]:
    """Features and logits of every set of ``case``, cached per run file (and per set name, so
    a new "others" folder costs only its own pass) under .cache/bench-openset/CASE."""
    import torch

    from graft.loading import transform_for
    from graft.model import load_model

    model_file = case.run / "model.safetensors"
    key = f"{model_file.stat().st_size}-{model_file.stat().st_mtime_ns}"
    cache = openset_data.CACHE / case.name / "features.npz"
    model = load_model(model_file).eval()
    info = model.info
    meta = {"classes": len(info.classes), "temperature": info.temperature}
    cached = _load_cache(cache, key)
    core = ["train", "val", "test", *AUGS_VAL] + (["unseen"] if case.unseen else [])
    wanted = core + [f"others: {n}" for n in case.others]
    sets: Sets = {n: cached[n] for n in wanted if n in cached}
    if len(sets) == len(wanted):
        return sets, meta
    t0 = time.perf_counter()
    clean = transform_for(info.preprocessing)
    classes = list(info.classes)
    if any(n not in sets for n in core):
        torch.manual_seed(0)  # the augmented views, in this order, are the seeded part
        root = Path(json.loads((case.run / "config.json").read_text())["data_root"])
        with open(case.run / "split.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for subset in ("train", "val", "test"):
            chosen = [r for r in rows if r["subset"] == subset]
            f, z = features_of(model, [root / r["path"] for r in chosen], clean)
            sets[subset] = (f, z, np.array([classes.index(r["class"]) for r in chosen]))
        val_paths = [root / r["path"] for r in rows if r["subset"] == "val"]
        for aug in AUGS:
            shift = transform_for(info.preprocessing, aug)
            f, z = features_of(model, val_paths, shift, views=VIEWS)
            sets[f"{aug} val"] = (f, z, np.repeat(sets["val"][2], VIEWS))
        if case.unseen is not None:
            own = sorted(case.unseen.rglob("*.png"))
            f, z = features_of(model, own, clean)
            sets["unseen"] = (f, z, np.array([classes.index(p.parent.name) for p in own]))
    for name, paths in case.others.items():
        if f"others: {name}" not in sets:
            f, z = features_of(model, paths, clean)
            sets[f"others: {name}"] = (f, z, np.full(len(paths), -1))
    print(f"{case.name}: features in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sets = {n: sets[n] for n in wanted}
    flat = {
        f"{n}|{p}": a for n, t in {**cached, **sets}.items() for p, a in zip("fzy", t, strict=True)
    }
    np.savez(cache, _key=np.array(key), **flat)
    return sets, meta


def fit_baselines(train_f: np.ndarray, train_y: np.ndarray, n_classes: int, temperature: float):
    """MSP, energy, Mahalanobis and relative Mahalanobis as (features, logits) -> scores."""
    from scipy.special import logsumexp, softmax
    from sklearn.covariance import LedoitWolf

    means = np.stack([train_f[train_y == c].mean(0) for c in range(n_classes)])
    prec = LedoitWolf().fit(train_f - means[train_y]).precision_
    glob_mean = train_f.mean(0)
    glob_prec = LedoitWolf().fit(train_f - glob_mean).precision_

    def scores(f: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
        # (x-m)^T P (x-m) for every class mean, without an n x c x d temporary
        fp = f @ prec
        md = (fp * f).sum(1)[:, None] - 2 * fp @ means.T + ((means @ prec) * means).sum(1)[None]
        g = f - glob_mean
        md0 = ((g @ glob_prec) * g).sum(1)
        return {
            "msp": softmax(z / temperature, axis=1).max(1),
            "energy": logsumexp(z / temperature, axis=1),
            "mahalanobis": -md.min(1),
            "relative mahalanobis": -(md - md0[:, None]).min(1),
        }

    return scores


def balanced_sample(y: np.ndarray, cap: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``cap`` rows, the same number from each class (all when None)."""
    if cap is None or cap >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = max(1, cap // len(classes))
    picks = [rng.permutation(np.flatnonzero(y == c))[:per] for c in classes]
    return np.sort(np.concatenate(picks))


def knn_scores(bank: np.ndarray, f: np.ndarray) -> dict[int, np.ndarray]:
    """Cosine similarity of each row of ``f`` to its k-th most similar bank row, per k."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    sims = fn @ bank.T
    top = -np.sort(-np.partition(sims, -max(KS), axis=1)[:, -max(KS) :], axis=1)
    return {k: top[:, k - 1] for k in KS if k <= bank.shape[0]}


def leave_one_class_out(
    bank: np.ndarray, bank_y: np.ndarray, f: np.ndarray, y: np.ndarray
) -> dict[int, np.ndarray]:
    """kNN scores of ``f`` against the bank without each image's own class: validation images
    standing in for a new class from the same source, an estimate graft could make itself."""
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    sims = fn @ (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    sims[y[:, None] == bank_y[None, :]] = -2.0
    top = -np.sort(-np.partition(sims, -max(KS), axis=1)[:, -max(KS) :], axis=1)
    return {k: top[:, k - 1] for k in KS if k <= bank.shape[0]}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def bootstrap(
    ref: np.ndarray, views: int, keep: float, checks: dict[str, np.ndarray], rounds: int = 200
) -> dict[str, list[float]]:
    """5-95% range of each check's share at or above the threshold, the reference's images
    (with all their views) resampled: how much the threshold moves with the validation draw."""
    rng = np.random.default_rng(0)
    images = ref.reshape(-1, views)
    shares: dict[str, list[float]] = {name: [] for name in checks}
    for _ in range(rounds):
        sample = images[rng.integers(0, len(images), len(images))].ravel()
        threshold = np.quantile(sample, 1 - keep)
        for name, scores in checks.items():
            shares[name].append(float((scores >= threshold).mean()))
    return {
        n: [float(np.quantile(v, 0.05)), float(np.quantile(v, 0.95))] for n, v in shares.items()
    }


def judge(sets: Sets, scored: dict[str, np.ndarray], keep: float) -> dict:
    """AUROC test vs others, then per reference set the threshold and what it does."""
    others = [n for n in sets if n.startswith("others: ")]
    test = scored["test"]
    out: dict = {"auroc": {n[8:]: auroc(test, scored[n]) for n in others}}
    out["auroc"]["all others"] = auroc(test, np.concatenate([scored[n] for n in others]))
    if "unseen" in sets and "others: others-artwork" in sets:
        out["auroc"]["unseen vs others-artwork"] = auroc(
            scored["unseen"], scored["others: others-artwork"]
        )
    _, z, y = sets["test"]
    right = z.argmax(1) == y
    refs = ["val", *(f"{a} val" for a in AUGS)] + (["unseen"] if "unseen" in sets else [])
    for ref in refs:
        threshold = float(np.quantile(scored[ref], 1 - keep))
        answered = test >= threshold
        row = {
            "threshold": threshold,
            "rejected": {n[8:]: float((scored[n] < threshold).mean()) for n in others},
            "all others rejected": float(
                np.mean(np.concatenate([scored[n] for n in others]) < threshold)
            ),
            "test kept": float(answered.mean()),
            "test accuracy answered": float(right[answered].mean()) if answered.any() else 0.0,
        }
        checks = {"others kept": np.concatenate([scored[n] for n in others]), "test kept": test}
        if "unseen" in sets:
            checks["unseen kept"] = scored["unseen"]
        row["bootstrap 5-95%"] = bootstrap(
            scored[ref], VIEWS if ref in AUGS_VAL else 1, keep, checks
        )
        if "unseen" in sets:
            _, zu, yu = sets["unseen"]
            named = (scored["unseen"] >= threshold) & (zu.argmax(1) == yu)
            row["unseen named"] = int(named.sum())
            row["unseen kept"] = float((scored["unseen"] >= threshold).mean())
        out[f"threshold from {ref}"] = row
    return out


def run_case(name: str, keep: float) -> dict:
    case = openset_data.CASES[name]()
    openset_data.ensure_run(case)
    sets, meta = case_features(case)
    train_f, _, train_y = sets["train"]
    _, z, y = sets["test"]
    result: dict = {
        "run": str(case.run),
        "classes": meta["classes"],
        "sizes": {n: len(t[2]) for n, t in sets.items()},
        "test accuracy": float((z.argmax(1) == y).mean()),
        "feature dim": int(train_f.shape[1]),
        "scores": {},
    }
    if "unseen" in sets:
        _, zu, yu = sets["unseen"]
        result["unseen accuracy"] = float((zu.argmax(1) == yu).mean())
    base = fit_baselines(train_f, train_y, meta["classes"], meta["temperature"])
    base_scored = {n: base(f, zz) for n, (f, zz, _) in sets.items()}
    for score in base_scored["val"]:
        result["scores"][score] = judge(sets, {n: s[score] for n, s in base_scored.items()}, keep)
    for cap in CAPS:
        idx = balanced_sample(train_y, cap)
        if cap is not None and len(idx) == len(train_y):
            continue  # the cap is above the training set: the same as "all"
        knn = {n: knn_scores(train_f[idx], f) for n, (f, _, _) in sets.items()}
        loco = leave_one_class_out(train_f[idx], train_y[idx], sets["val"][0], sets["val"][2])
        for k in knn["val"]:
            label = f"knn k={k} bank={'all' if cap is None else cap} ({len(idx)})"
            entry = judge(sets, {n: s[k] for n, s in knn.items()}, keep)
            for row in (v for name, v in entry.items() if name.startswith("threshold from")):
                row["new-class estimate rejected"] = float((loco[k] < row["threshold"]).mean())
            result["scores"][label] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(openset_data.CASES), action="append")
    parser.add_argument("--all", action="store_true", help="run every case")
    parser.add_argument("--keep", type=float, default=0.95)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tables", type=Path, default=None, help="print Markdown from a JSON")
    args = parser.parse_args()
    if args.tables:
        import openset_tables

        print(openset_tables.markdown(json.loads(args.tables.read_text())))
        return
    names = list(openset_data.CASES) if args.all else (args.case or ["demo"])
    results = {}
    for name in names:
        results[name] = run_case(name, args.keep)
        if args.json:  # after each case, so a long --all keeps what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    if not args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
