"""The CLI, run in-process: output formats, files written and exit codes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from graft.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_scan_reports_counts_skipped_files_and_draws_the_chart(shapes_dir, tmp_path, capsys):
    code, out, _ = run(["scan", shapes_dir, "--json", "--plot", tmp_path / "c.png"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["counts"] == {"circle": 15, "square": 15, "triangle": 14}
    assert [Path(s["path"]).name for s in result["skipped"]] == ["broken.jpg"]
    assert result["audit"]["exact_duplicate_files"] == 0 and result["audit"]["images"] == 44
    assert Image.open(tmp_path / "c.png").size[0] > 300
    code, out, _ = run(["scan", shapes_dir, "--plot", tmp_path / "d.png"], capsys)
    assert code == 0 and "broken.jpg" in out and "total" in out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["scan", "/no/such/folder"], 3, "Dataset folder not found: /no/such/folder"),
        (["train", "/no/such/folder", "--out", "x"], 3, "Dataset folder not found"),
        (["predict", "/no/such/run", "a.png"], 6, "No trained model"),
    ],
)
def test_errors_are_one_clear_line_with_a_distinct_exit_code(
    args, code, message, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    got, _out, err = run(args, capsys)
    assert got == code
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # a failed command leaves nothing behind


def test_usage_errors_exit_2(capsys, shapes_dir, tmp_path):
    code, _, err = run(["train", shapes_dir, "--out", tmp_path / "r", "--img-size", "8"], capsys)
    assert code == 2 and "--img-size 8 is not valid" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exc:
        main(["train", str(shapes_dir), "--out", "x", "--backbone", "resnet"])
    assert exc.value.code == 2


def test_train_evaluate_predict_round_trip(shapes_dir, unseen_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(
        [
            "train",
            shapes_dir,
            "--out",
            out,
            "--img-size",
            64,
            "--epochs",
            3,
            "--fine-tune-epochs",
            1,
            "--views",
            2,
            "--workers",
            0,
            "--head",
            "dense:64",
            "--unfreeze",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    assert "Plan:" in err and "Held-out test accuracy" in err and "Diagnosis:" in err
    code, _, err = run(["train", shapes_dir, "--out", out], capsys)
    assert code == 5 and "--force" in err

    code, out_text, _ = run(["evaluate", out, "--json"], capsys)
    held_out = json.loads((out / "summary.json").read_text())["split"]["test"]
    assert code == 0 and json.loads(out_text)["n"] == held_out >= 9

    bad = tmp_path / "bad.png"
    bad.write_text("text, not a png")
    grid = tmp_path / "grid.png"
    code, out_text, _ = run(
        ["predict", out, unseen_dir, bad, "--csv", "--top-k", 2, "--grid", grid], capsys
    )
    assert code == 7  # some files failed, the rest were predicted
    rows = list(csv.DictReader(io.StringIO(out_text)))
    assert len(rows) == 10
    assert next(r for r in rows if r["error"])["path"] == str(bad)
    good = [r for r in rows if not r["error"]]
    assert all(0 < float(r["probability_1"]) <= 1 for r in good)
    assert Image.open(grid).size[0] > 500

    code, out_text, _ = run(
        ["predict", out, *sorted(unseen_dir.rglob("*.png"))[:2], "--json"], capsys
    )
    assert code == 0
    preds = json.loads(out_text)
    assert len(preds) == 2 and len(preds[0]["top"]) == 3


def test_lr_find_command(shapes_dir, tmp_path, capsys):
    code, out, _ = run(
        [
            "lr-find",
            shapes_dir,
            "--img-size",
            64,
            "--batch-size",
            8,
            "--out",
            tmp_path / "lr.png",
            "--json",
        ],
        capsys,
    )
    assert code == 0 and json.loads(out)["suggested_lr"] > 0
    assert (tmp_path / "lr.png").is_file()
