"""`graft predict --out FILE`: results stream to JSON Lines or CSV, and a second call with
the same file continues an interrupted one without repeating or losing a row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from graft.cli import main


@pytest.fixture(scope="module")
def images(unseen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stream")
    for i, f in enumerate(sorted(unseen_dir.rglob("*.*"))):
        (folder / f"{i:02d}-{f.name}").write_bytes(f.read_bytes())
    (folder / "zz-broken.png").write_bytes(b"\x89PNG broken")
    return folder


def test_jsonl_stream_resumes_after_a_torn_write(trained_run: Path, images: Path, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert main(["predict", str(trained_run), str(images), "--out", str(whole)]) == 7
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len(rows) == 10 and sum("error" in r for r in rows) == 1
    assert all(r["label"] for r in rows if "error" not in r)

    # An interrupted call: four complete rows and half of the fifth.
    cut = tmp_path / "cut.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:4]) + lines[4][:17])
    assert main(["predict", str(trained_run), str(images), "--out", str(cut)]) == 7
    again = [json.loads(line) for line in cut.read_text().splitlines()]
    assert sorted(again, key=lambda r: r["path"]) == sorted(rows, key=lambda r: r["path"])


def test_csv_stream_and_guards(trained_run: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run), str(images), "--out", str(out), "--top-k", "2"]) == 7
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and {"class_2", "probability_2"} <= set(rows[0])
    assert main(["predict", str(trained_run), str(images), "--out", str(out), "--top-k", "2"]) == 0
    assert "10 image(s) were already in" in capsys.readouterr().err
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 10  # nothing repeated
    assert main(["predict", str(trained_run), str(images), "--out", str(out), "--top-k", "3"]) == 2
    assert main(["predict", str(trained_run), str(images), "--out", str(tmp_path / "x.txt")]) == 2
