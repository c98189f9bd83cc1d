"""Feature ensembles: do several backbones' frozen features together beat one?

    python benchmarks/bench_ensemble.py --sets sprites emoji --json benchmarks/results/ensemble.json

On the sets of benchmarks/bench_robust.py (pre-split folders, the same split for every
row), each backbone's pooled ImageNet features at 128 px with graft's preprocessing (trim
on, ``--detail-size`` as given), then bench_robust's logistic regression (StandardScaler +
LogisticRegression, C chosen on val, refit on train + val) on each backbone alone and on
concatenations. "flip" averages the features of the picture and its mirror image (test-time
augmentation of the features, training included). Reports in-domain and OOD accuracy with
Wilson 95% intervals and the seconds each backbone's features took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_robust import fit_lr, score  # noqa: E402
from robust_data import BUILDERS  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
COMBOS = (
    ("efficientnet_lite0",),
    ("efficientnet_lite1",),
    ("efficientnet_lite2",),
    ("efficientnet_lite0", "efficientnet_lite2"),
    BACKBONES,
)


def features(name: str, paths: list, detail: int) -> tuple:
    """``[N, 2, F]`` pooled features of ``paths`` (the picture, its mirror) and seconds."""
    import numpy as np
    import torch

    from graft.backbones import get_spec
    from graft.data import ImageFiles, build_transform, make_loader
    from graft.model import create_backbone

    spec = get_spec(name)
    backbone, _ = create_backbone(spec, img_size=128)
    backbone.eval()
    tf = build_transform(128, spec.mean, spec.std, "none", trim=True, detail=detail)
    t0, out = time.perf_counter(), []
    with torch.no_grad():
        for b in make_loader(ImageFiles(paths, None, tf, 128), 64, False, 0, workers=1):
            x = b["images"]
            out.append(torch.stack([backbone(x), backbone(torch.flip(x, dims=[3]))], 1).numpy())
    return np.concatenate(out), time.perf_counter() - t0


def evaluate(x, y, part, xo, yo) -> dict:
    """bench_robust's logistic regression (fit_lr) on ``x``, scored on test and ``xo``."""
    clf, best, _ = fit_lr(x, y, part)
    te = part == "test"
    return {
        "in_domain": score(int((clf.predict(x[te]) == y[te]).sum()), int(te.sum())),
        "ood": score(int((clf.predict(xo) == yo).sum()), len(yo)),
        "C": best,
        "features": int(x.shape[1]),
    }


def main() -> int:
    import numpy as np

    from graft.data import scan
    from graft.detail import measure_detail

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", choices=["sprites", "emoji"], default=["sprites", "emoji"])
    ap.add_argument("--detail-size", choices=["auto", "off"], default="auto")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-robust")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results: dict = {}
    for set_name in args.sets:
        bset = BUILDERS[set_name](args.cache, False)
        data = scan(bset.data)
        ood = scan(bset.ood, classes=data.classes)
        detail = measure_detail(data.paths, 128, True) if args.detail_size == "auto" else 0
        y, part, yo = np.asarray(data.labels), np.asarray(data.given), np.asarray(ood.labels)
        feats, seconds = {}, {}
        for name in BACKBONES:
            (x, s1), (xo, s2) = (
                features(name, data.paths, detail),
                features(name, ood.paths, detail),
            )
            feats[name], seconds[name] = (x, xo), s1 + s2
        rows = results[set_name] = {"detail_size": detail, "feature_seconds": seconds, "rows": {}}
        for combo in COMBOS:
            for tta in ("plain", "flip"):
                pick = (lambda f: f[:, 0]) if tta == "plain" else (lambda f: f.mean(1))
                x = np.concatenate([pick(feats[n][0]) for n in combo], 1)
                xo = np.concatenate([pick(feats[n][1]) for n in combo], 1)
                key = f"{'+'.join(n.replace('efficientnet_', '') for n in combo)} {tta}"
                r = rows["rows"][key] = evaluate(x, y, part, xo, yo)
                r["feature_seconds"] = sum(seconds[n] for n in combo) * (1 if tta == "plain" else 2)
                print(
                    f"{set_name:8s} {key:22s} in-domain {r['in_domain']['accuracy']:.1%} "
                    f"OOD {r['ood']['accuracy']:.1%} ({r['feature_seconds']:.0f} s of features)",
                    flush=True,
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
