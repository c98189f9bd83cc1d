"""Markdown tables from bench_openset.py's JSON (``--tables FILE``)."""

from __future__ import annotations

KNN = "knn k={k} bank={bank}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x < 0.995 or x == 1 else f"{100 * x:.1f}%"


def _knn_key(case: dict, k: int, bank: str) -> str | None:
    head = KNN.format(k=k, bank=bank) + " ("
    return next((s for s in case["scores"] if s.startswith(head)), None)


def _cells(case: dict, score: str, ref: str) -> list[str]:
    entry = case["scores"][score]
    row = entry[f"threshold from {ref}"]
    per = row["rejected"]
    rejected = _pct(row["all others rejected"])
    if len(per) > 1:
        rejected += " (" + " / ".join(_pct(v) for v in per.values()) + ")"
    named = f"{row['unseen named']}/{case['sizes']['unseen']}" if "unseen named" in row else "-"
    own = entry["auroc"].get("unseen vs others-artwork")
    return [
        f"{entry['auroc']['all others']:.3f}",
        "-" if own is None else f"{own:.3f}",
        rejected,
        _pct(row["test kept"]),
        _pct(row["test accuracy answered"]),
        named,
    ]


COLS = (
    "AUROC test vs others | AUROC own vs others' artwork | others rejected"
    " | test kept | test acc. answered | own artwork named"
)


def _table(head: str, rows: list[list[str]]) -> str:
    n = head.count("|") + 1
    lines = [f"| {head} |", "| " + " | ".join(["---"] * n) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def overview(results: dict) -> str:
    rows = []
    for name, case in results.items():
        sizes = case["sizes"]
        others = ", ".join(f"{k[8:]} {v}" for k, v in sizes.items() if k.startswith("others: "))
        unseen = "-"
        if "unseen" in sizes:
            unseen = f"{sizes['unseen']} ({_pct(case['unseen accuracy'])} right)"
        rows.append([name, str(case["classes"]),
                     f"{sizes['train']} / {sizes['val']} / {sizes['test']}",
                     _pct(case["test accuracy"]), unseen, others])  # fmt: skip
    head = "case | classes | train / val / test | test accuracy | own artwork | others"
    return _table(head, rows)


def by_score(results: dict, refs: tuple[str, ...] = ("val", "strong val")) -> str:
    rows = []
    for name, case in results.items():
        knn = _knn_key(case, 10, "all")
        for score in ("msp", "energy", "mahalanobis", "relative mahalanobis", knn):
            for ref in refs:
                label = "kNN k=10, bank all" if score == knn else score
                rows.append([name, label, ref, *_cells(case, score, ref)])  # type: ignore[arg-type]
    return _table(f"case | score | threshold from | {COLS}", rows)


def by_k(results: dict, ref: str = "strong val") -> str:
    rows = []
    for name, case in results.items():
        for k in (1, 5, 10, 20):
            key = _knn_key(case, k, "all")
            if key:
                rows.append([name, str(k), *_cells(case, key, ref)])
    return _table(f"case | k (bank all, threshold `{ref}`) | {COLS}", rows)


def by_bank(results: dict, k: int = 10, ref: str = "strong val") -> str:
    rows = []
    for name, case in results.items():
        dim = case["feature dim"]
        for score in case["scores"]:
            if not score.startswith(f"knn k={k} bank="):
                continue
            n = int(score.rsplit("(", 1)[1].rstrip(")"))
            bank = score.split("bank=")[1].split(" ")[0]
            size = f"{bank} ({n} rows, {n * dim * 4 / 2**20:.1f} MB fp32)"
            rows.append([name, size, *_cells(case, score, ref)])
    return _table(f"case | bank (k={k}, threshold `{ref}`) | {COLS}", rows)


def by_ref(results: dict, k: int = 10) -> str:
    """kNN at ``k`` under each threshold reference, with how much the threshold moves."""
    rows = []
    for name, case in results.items():
        key = _knn_key(case, k, "all")
        for ref in ("val", "light val", "strong val", "domain val", "unseen"):
            row = case["scores"][key].get(f"threshold from {ref}") if key else None
            if row:
                boot = row["bootstrap 5-95%"]
                lo, hi = boot["others kept"]
                spread = [f"{_pct(1 - hi)}-{_pct(1 - lo)}", "-".join(map(_pct, boot["test kept"]))]
                own = boot.get("unseen kept")
                spread.append("-".join(map(_pct, own)) if own else "-")
                spread.append(_pct(row["new-class estimate rejected"]))
                rows.append([name, ref, *_cells(case, key, ref), *spread])  # type: ignore[arg-type]
    head = f"case | threshold from (kNN k={k}, bank all) | {COLS}"
    head += " | 5-95% over resampled references: others rejected | test kept | own artwork kept"
    head += " | leave-one-class-out val rejected"
    return _table(head, rows)


def markdown(results: dict) -> str:
    parts = [
        ("Cases", overview(results)),
        ("Scores side by side", by_score(results)),
        ("kNN: k", by_k(results)),
        ("kNN: bank cap, k=10", by_bank(results)),
        ("kNN: bank cap, k=1", by_bank(results, k=1)),
        ("Threshold reference, k=10", by_ref(results)),
        ("Threshold reference, k=1", by_ref(results, k=1)),
    ]
    return "\n\n".join(f"### {title}\n\n{table}" for title, table in parts)
