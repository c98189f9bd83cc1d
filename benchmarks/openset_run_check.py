"""A trained run's "unknown" answers, end to end, as the exported model gives them: the share
of each set of other images answered "unknown", the run's own artwork still named, and the
held-out split still answered, at the run's own threshold and at the thresholds the other
references would have set.

    python benchmarks/openset_run_check.py runs/demo [--json OUT]

Needs the demo's data (`make demo`) and bench_openset's others (`python
benchmarks/bench_openset.py --case demo` builds them under .cache/bench-openset/).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from graft.cache import item_seed
    from graft.familiarity import SHIFT_VIEWS, THRESHOLD_SLACK
    from graft.loading import transform_for
    from graft.model import load_model
    from graft.predict import Predictor
    from graft.runtime import load_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--own", type=Path, default=ROOT / ".cache/demo/artwork-1-4-7-25-150")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, predictor = load_model(args.run), Predictor.from_run(args.run)
    info, classes = model.info, list(model.info.classes)
    cache = ROOT / ".cache/bench-openset/demo"
    sets = {k: sorted((cache / k).glob("*.png")) for k in ("others-artwork", "others-sprites")}
    sets |= {
        k: sorted((ROOT / ".cache/bench-openset" / k).glob("*.png")) for k in ("photos", "textures")
    }
    sets["others-artwork-152-251"] = sorted(
        (ROOT / ".cache/demo/others-artwork-152-251").glob("*.png")
    )
    familiarity = {k: predictor.predict_scores(v)[1] for k, v in sets.items() if v}
    own = sorted(args.own.rglob("*.png"))
    own_probs, own_fam, _ = predictor.predict_scores(own)
    own_right = np.array([classes[i] for i in own_probs.argmax(1)]) == [p.parent.name for p in own]
    config = json.loads((args.run / "config.json").read_text())
    rows = list(csv.DictReader(open(args.run / "split.csv", encoding="utf-8")))
    root = Path(config["data_root"])
    val = [root / r["path"] for r in rows if r["subset"] == "val"]
    test = [root / r["path"] for r in rows if r["subset"] == "test"]
    val_fam, test_fam = predictor.predict_scores(val)[1], predictor.predict_scores(test)[1]
    strong = transform_for(info.preprocessing, "strong")
    shifted = []
    with torch.no_grad():
        for view in range(1, SHIFT_VIEWS + 1):
            batch = []
            for path in val:  # seeded per image and view, as graft train does
                seed = item_seed(str(path), view, config["seed"])
                torch.manual_seed(seed)
                random.seed(seed)
                batch.append(strong(load_image(path)))
            shifted.append(model.familiarity(model.backbone(torch.stack(batch))).numpy())

    def at(scores: np.ndarray) -> float:
        return float(np.quantile(scores, 0.05, method="lower")) - THRESHOLD_SLACK

    thresholds = {
        "the run's own": info.familiarity_threshold,
        "validation under strong augmentation": at(np.concatenate(shifted)),
        "plain validation": at(val_fam),
        "the own artwork": at(own_fam),
    }
    result = {}
    for name, t in thresholds.items():
        result[name] = {
            "threshold": t,
            **{f"{k} rejected": float((v < t).mean()) for k, v in familiarity.items()},
            "own artwork named": int(((own_fam >= t) & own_right).sum()),
            "held-out answered": float((test_fam >= t).mean()),
        }
        print(name, json.dumps(result[name]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
