"""How many strongly augmented views of each validation image the familiarity threshold needs
(graft.familiarity.SHIFT_VIEWS, 4): the threshold and what it does with the first V of the
same 4 views, and its 5-95% range over the validation images (bootstrap, 500 rounds).

    python benchmarks/bench_openset.py --case demo --case fashion --case digits   # features
    python benchmarks/openset_views.py demo fashion digits --json OUT

Reads the features bench_openset.py cached for each case (its `strong val` set: 4 views per
validation image, seed 0) and scores them as graft does: cosine similarity to the nearest
training feature (k = KNN_K) of a class-balanced bank of at most BANK_CAP rows, the
threshold keeping 95% of the reference, less THRESHOLD_SLACK.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_openset  # noqa: E402
import openset_data  # noqa: E402

from graft.familiarity import BANK_CAP, KNN_K, THRESHOLD_SLACK  # noqa: E402


def views_rows(name: str, keep: float = 0.95, rounds: int = 500) -> dict:
    sets, _ = bench_openset.case_features(openset_data.CASES[name]())
    train_f, _, train_y = sets["train"]
    bank = train_f[bench_openset.balanced_sample(train_y, BANK_CAP)]
    scored = {n: bench_openset.knn_scores(bank, f)[KNN_K] for n, (f, _, _) in sets.items()}
    others = np.concatenate([scored[n] for n in sets if n.startswith("others: ")])
    per_image = scored["strong val"].reshape(-1, bench_openset.VIEWS)
    rng = np.random.default_rng(0)
    rows = {}
    for views in range(bench_openset.VIEWS, 0, -1):
        ref = per_image[:, :views]
        threshold = float(np.quantile(ref.ravel(), 1 - keep)) - THRESHOLD_SLACK
        boot = []
        for _ in range(rounds):
            sample = ref[rng.integers(0, len(ref), len(ref))].ravel()
            t = float(np.quantile(sample, 1 - keep)) - THRESHOLD_SLACK
            boot.append((t, (others < t).mean(), (scored["test"] >= t).mean()))
        spread = np.quantile(np.array(boot), [0.05, 0.95], axis=0).round(3).T.tolist()
        row = {
            "threshold": round(threshold, 4),
            "threshold 5-95%": spread[0],
            "others rejected": round(float((others < threshold).mean()), 3),
            "others rejected 5-95%": spread[1],
            "test kept": round(float((scored["test"] >= threshold).mean()), 3),
            "test kept 5-95%": spread[2],
        }
        if "unseen" in sets:
            row["unseen kept"] = round(float((scored["unseen"] >= threshold).mean()), 3)
        rows[views] = row
    return {"validation images": len(per_image), "views": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=sorted(openset_data.CASES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {name: views_rows(name) for name in args.cases}
    for name, result in results.items():
        for views, row in result["views"].items():
            print(name, views, row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
