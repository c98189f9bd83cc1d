"""Accuracy that holds on images from elsewhere: training variants side by side on several
data sets, in-domain and out-of-domain.

    python benchmarks/bench_robust.py --json benchmarks/results/robust.json
    python benchmarks/bench_robust.py --sets emoji --variants lr graft-defaults
    python benchmarks/bench_robust.py --sets emoji --extra 'domain-aug=--augment domain'
    python benchmarks/bench_robust.py --quick --sets emoji sprites --variants lr graft-defaults

Sets (benchmarks/robust_data.py; each a pre-split folder ``train/ val/ test/`` that graft
uses as given, so every method sees the same split):

- ``sprites``: Pokémon 152-251 animation frames split by animation; OOD: their artwork;
- ``emoji``: emoji subcategories drawn by apple, google and facebook, split by base emoji;
  OOD: the same emoji drawn by twitter (benchmarks/emoji_data.py);
- ``fashion``: Fashion-MNIST, 600 per class split 70/10/20; its "independent" column is a
  separate 200 per class of the same source, never seen;
- ``demo``: the demo's five Pokémon split 70/10/20 image by image; no OOD.

Methods, each timed from a cold start:

- ``lr``: EfficientNet-Lite0 frozen features at 128 px with graft's own preprocessing
  (``build_transform(trim=True)``, as ``graft train`` does by default), StandardScaler +
  LogisticRegression; C chosen on the val part from :data:`C_GRID`, then refit on
  train + val and applied to test and OOD; every picture resized straight to 128 px, as
  the usual recipe does (the "vs LR" reference);
- ``lr-detail``: the same, with graft's ``--detail-size auto`` (pictures larger than the
  folder's median size brought down to it first, graft.detail);
- graft variants (:data:`VARIANTS`, plus ``--extra NAME=FLAGS``): ``python -m graft train
  DATA --out RUN --force FLAGS`` in a subprocess with its own empty ``GRAFT_CACHE_DIR``
  (cold feature cache: the wall time is what a first run costs). In-domain: the test
  figure of the run's ``summary.json`` (on a pre-split folder graft's test split is the
  folder's ``test/`` part, touched once at the end). OOD: ``python -m graft evaluate RUN
  OOD --json``, its ``accuracy``: the plain top-1 accuracy (argmax) over all images. An
  image the model would answer "unknown" still counts by its top class, right or wrong:
  the question is whether the classifier holds, and the abstention rule (its own
  threshold, tuned for other ends) is reported beside it as ``ood_coverage``. The LR row
  abstains never, so this keeps the rows comparable.

Accuracies carry Wilson 95% intervals; "vs LR" is the difference in points to the ``lr``
row of the same set. Wall time: everything a method needs from the split folder to the
OOD predictions (features or training, test and OOD prediction). Writes a markdown table
to stdout and, with ``--json``, every figure. ``--quick``: a smoke test (few classes and
images, graft at 1 + 1 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_generalize import SEED_PLAN  # noqa: E402
from robust_data import BUILDERS, BenchSet  # noqa: E402

from graft.metrics import wilson  # noqa: E402

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: the logistic-regression rows: plain, and with graft's detail size (``--detail-size auto``)
#: lr-detail: on pictures brought down to the detail size as graft does; lr-detail-train:
#: the same, refit on the training part only (what graft's head learnt from before --refit)
LR_METHODS = ("lr", "lr-detail", "lr-detail-train")
QUICK_FLAGS = ["--epochs", "1", "--fine-tune-epochs", "1"]


def flags(options: dict) -> list[str]:
    """``graft train`` flags for TrainConfig options (``fine_tune_lr=1e-5`` ->
    ``--fine-tune-lr 1e-05``), so the seed plan here is bench_generalize's own."""
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


#: graft variants: name -> extra ``graft train`` flags. seed-plan: the seed's 10 frozen
#: epochs then 10 of full fine-tuning at 1e-5 (batch 16), no augmentation, one view, no
#: early stopping, no class weights (graft's trim stays on, as in bench_generalize).
#: adam-head: stage 1 trained for 10 Adam epochs, as before the probe (graft.probe).
#: cosine-wise: a 10x faster fine-tune with a cosine schedule, then WiSE-FT on validation.
VARIANTS: dict[str, list[str]] = {
    "graft-defaults": [],
    "adam-head": ["--head-solver", "adam"],
    "cosine-wise": ["--schedule", "cosine", "--fine-tune-lr", "1e-4", "--wise", "auto"],
    "seed-plan": flags(SEED_PLAN),
}


def score(correct: int, n: int) -> dict:
    lo, hi = wilson(correct, n)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "ci95": [lo, hi]}


# --------------------------------------------------------------------------- methods


def fit_lr(
    x: Any, y: Any, part: Any, with_val: bool = True
) -> tuple[Any, float, dict[float, float]]:
    """The baseline every issue-16 target is measured against: StandardScaler + a logistic
    regression, C chosen on the ``val`` rows from :data:`C_GRID` (ties: the stronger
    regularisation), refit on ``train`` + ``val`` (``train`` only without ``with_val``).
    Returns (classifier, C, val accuracy by C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    tr, va = part == "train", part == "val"
    val_acc = {
        c: float((model(c).fit(x[tr], y[tr]).predict(x[va]) == y[va]).mean()) for c in C_GRID
    }
    best = max(C_GRID, key=lambda c: (val_acc[c], -c))
    rows = tr | va if with_val else tr
    return model(best).fit(x[rows], y[rows]), best, val_acc


def run_lr(bset: BenchSet, detail: bool = False, with_val: bool = True) -> dict:
    """Frozen EfficientNet-Lite0 features + logistic regression (C on val, refit); with
    ``detail``, every picture is first brought down to the training images' median size as
    graft's ``--detail-size auto`` does (graft.detail)."""
    import numpy as np
    import torch

    from graft.backbones import get_spec
    from graft.data import ImageFiles, build_transform, make_loader, scan
    from graft.detail import measure_detail
    from graft.model import create_backbone

    t0 = time.perf_counter()
    data = scan(bset.data)
    assert data.given is not None, f"{bset.data} is not split into train/val/test"
    spec = get_spec("efficientnet_lite0")
    backbone, _ = create_backbone(spec, img_size=128)
    backbone.eval()
    size = measure_detail(data.paths, 128, trim=True) if detail else 0
    tf = build_transform(128, spec.mean, spec.std, "none", trim=True, detail=size)

    @torch.no_grad()
    def feats(paths, labels) -> np.ndarray:
        out = []
        for b in make_loader(ImageFiles(paths, labels, tf, 128), 64, False, 0, workers=1):
            out.append(backbone(b["images"]).numpy())
        return np.concatenate(out)

    x, y = feats(data.paths, data.labels), np.asarray(data.labels)
    part = np.asarray(data.given)
    clf, best, val_acc = fit_lr(x, y, part, with_val)
    te = part == "test"
    result = {"in_domain": score(int((clf.predict(x[te]) == y[te]).sum()), int(te.sum()))}
    if bset.ood is not None:
        ood = scan(bset.ood, classes=data.classes)
        right = int((clf.predict(feats(ood.paths, ood.labels)) == np.asarray(ood.labels)).sum())
        result["ood"] = score(right, len(ood.paths))
    result.update(seconds=time.perf_counter() - t0, C=best, val_accuracy_by_C=val_acc)
    result["detail_size"] = size
    return result


def _graft(args: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    """``python -m graft ARGS``; stderr to ``log``; a failure shows the log's tail."""
    with open(log, "a") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "graft", *args], env=env, stdout=subprocess.PIPE,
            stderr=err, text=True,
        )  # fmt: skip
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"graft {' '.join(args)} failed ({proc.returncode}); {log}:\n{tail}")
    return proc


def run_graft(bset: BenchSet, extra: list[str], run: Path, quick: bool) -> dict:
    """Train with ``extra`` flags on a cold cache, then evaluate the OOD folder."""
    run.parent.mkdir(parents=True, exist_ok=True)
    log = run.parent / f"{run.name}.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="graft-cache-") as cache:
        env = {**os.environ, "GRAFT_CACHE_DIR": cache}
        t0 = time.perf_counter()
        train = ["train", str(bset.data), "--out", str(run), "--force", "--quiet", *extra]
        _graft(train + (QUICK_FLAGS if quick else []), env, log)
        train_seconds = time.perf_counter() - t0
        summary = json.loads((run / "summary.json").read_text())
        test = summary["test"]
        result = {
            "in_domain": score(round(test["accuracy"] * test["n"]), test["n"]),
            "train_seconds": train_seconds,
            "kept": summary.get("kept"),
            "diagnosis": (summary.get("diagnosis") or {}).get("verdict"),
        }
        if bset.ood is not None:
            ev = ["evaluate", str(run), str(bset.ood), "--out", str(run / "eval-ood"), "--json"]
            out = json.loads(_graft(ev, env, log).stdout)
            result["ood"] = score(round(out["accuracy"] * out["n"]), out["n"])
            result["ood_coverage"] = out["open_set"]["coverage"]
            result["ood_failed"] = len(out.get("failed", []))
        result["seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- report


def _pct(s: dict | None) -> str:
    if s is None:
        return "-"
    lo, hi = s["ci95"]
    return f"{s['accuracy']:.1%} ({lo:.1%}-{hi:.1%}, n={s['n']})"


def _delta(r: dict, lr: dict | None, key: str) -> str:
    if lr is None or key not in r or key not in lr:
        return "-"
    return f"{100 * (r[key]['accuracy'] - lr[key]['accuracy']):+.1f}"


def table(results: dict[str, dict[str, dict]], sets: dict[str, BenchSet]) -> str:
    lines = [
        "| set | method | in-domain (test) | OOD / independent | vs LR in / out (points) "
        "| wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        lr = rows.get("lr")
        label = sets[name].ood_label
        for method, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | {method} | failed: {r['error'][:60]} | | | |")
                continue
            ood = f"{label}: {_pct(r['ood'])}" if "ood" in r else "-"
            vs = f"{_delta(r, lr, 'in_domain')} / {_delta(r, lr, 'ood')}"
            if method == "lr":
                vs = "(reference)"
            lines.append(
                f"| {name} | {method} | {_pct(r['in_domain'])} | {ood} | {vs} "
                f"| {r['seconds']:.0f} |"
            )
    return "\n".join(lines)


def provenance() -> dict:
    """The graft commit (and whether the tree had local changes) and the machine's load:
    a figure is only as reproducible as the code and the timing conditions behind it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "graft"], capture_output=True, text=True)
    return {
        "commit": head.stdout.strip() or None,
        "local_changes": bool(dirty.stdout.strip()),
        "load_average_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not name.strip():
            sys.exit(f"--extra {item!r}: write NAME=FLAGS, e.g. --extra 'aug=--augment domain'")
        out[name.strip()] = shlex.split(rest)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    ap.add_argument(
        "--variants", nargs="+", default=None,
        help=f"methods: {', '.join([*LR_METHODS, *VARIANTS])} or an --extra name (default: all)",
    )  # fmt: skip
    ap.add_argument(
        "--extra", action="append", default=[], metavar="NAME=FLAGS",
        help="an ad-hoc graft variant, e.g. 'domain=--augment domain --views 8' (repeatable)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-robust")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sets, 1+1 epochs")
    args = ap.parse_args()
    variants = {**VARIANTS, **parse_extra(args.extra)}
    methods = args.variants or [*LR_METHODS, *variants]
    unknown = [m for m in methods if m not in LR_METHODS and m not in variants]
    if unknown:
        sys.exit(
            f"Unknown variant(s) {', '.join(unknown)}: use {', '.join([*LR_METHODS, *variants])}."
        )
    args.cache.mkdir(parents=True, exist_ok=True)
    sets: dict[str, BenchSet] = {}
    results: dict[str, dict[str, dict]] = {}
    for name in args.sets:
        print(f"== {name}: building", flush=True)
        sets[name] = bset = BUILDERS[name](args.cache, args.quick)
        print(f"   {bset.note}\n   data {bset.data}; {bset.ood_label or 'no OOD'} {bset.ood or ''}")
        results[name] = {}
        for method in methods:
            print(f"-- {name} / {method} ...", flush=True)
            run = args.cache / ("runs-quick" if args.quick else "runs") / name / method
            try:
                if method in LR_METHODS:
                    r = run_lr(bset, method != "lr", with_val=method != "lr-detail-train")
                else:
                    r = run_graft(bset, variants[method], run, args.quick)
                    r["flags"] = variants[method]
            except Exception as exc:  # one failure should not lose the other rows
                r = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"   FAILED: {r['error']}", flush=True)
            results[name][method] = r
            if "error" not in r:
                ood = f", {bset.ood_label} {_pct(r['ood'])}" if "ood" in r else ""
                print(f"   in-domain {_pct(r['in_domain'])}{ood}; {r['seconds']:.0f} s", flush=True)
            if args.json:  # after every method: an interrupted run keeps what it has
                payload = {
                    "quick": args.quick,
                    "graft": provenance(),
                    "sets": {
                        n: {"note": s.note, "ood_label": s.ood_label} for n, s in sets.items()
                    },
                    "results": results,
                }
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(table(results, sets))
    return 1 if any("error" in r for rows in results.values() for r in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
