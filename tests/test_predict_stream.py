"""`graft predict --out FILE`: results stream to JSON Lines or CSV, and a second call with
the same file continues an interrupted one without repeating or losing a row."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
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
    # Continued with nothing left to do, the file still holds the broken image's error row:
    # the exit says so (7), not "all well" (0), and says how to try it again.
    assert main(["predict", str(trained_run), str(images), "--out", str(out), "--top-k", "2"]) == 7
    err = capsys.readouterr().err
    assert "10 image(s) were already in" in err
    assert "1 of the skipped file(s) could not be read by the earlier call" in err
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 10  # nothing repeated
    assert main(["predict", str(trained_run), str(images), "--out", str(out), "--top-k", "3"]) == 2
    assert main(["predict", str(trained_run), str(images), "--out", str(tmp_path / "x.txt")]) == 2


# ------------------------------------------------------------------ a file graft did not write


FOREIGN = {
    "mydata.csv": b"name,amount\nalice,10\nbob,20",  # no final newline: looks "torn"
    "notes.csv": b"path,label,error\nmine.png,cat\n",  # graft-like header, other columns
    "mydata.jsonl": b'{"a": 1}\n{"b": 2',
    "log.jsonl": b"plain text\nmore text\n",
    "table.ndjson": b'{"path": "x.png"}\n',  # a dict with a path, but not a prediction
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_file_graft_did_not_write_is_refused_untouched(
    trained_run: Path, images: Path, tmp_path: Path, name: str, capsys
) -> None:
    out = tmp_path / name
    out.write_bytes(FOREIGN[name])
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "unchanged" in err and "unexpected" not in err
    assert out.read_bytes() == FOREIGN[name]  # byte for byte


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_damaged_line_in_the_middle_is_refused_with_its_number(
    trained_run: Path, images: Path, tmp_path: Path, suffix: str, capsys
) -> None:
    out = tmp_path / f"results{suffix}"
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 7
    lines = out.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:3]) + lines[3][:12] + "\n" + "".join(lines[4:])
    out.write_text(damaged)
    capsys.readouterr()
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "damaged line 4" in err and "unexpected" not in err
    assert out.read_text() == damaged


def test_batch_size_is_checked_before_anything_is_written(
    trained_run: Path, images: Path, tmp_path: Path
) -> None:
    from graft.errors import UsageError
    from graft.predict import Predictor, stream_predictions

    predictor = Predictor.from_run(trained_run)
    paths = sorted(images.iterdir())
    for bad in (-1, 0, 2.5, True, "8"):
        with pytest.raises(UsageError, match="batch_size"):
            stream_predictions(predictor, paths, tmp_path / "x.jsonl", batch_size=bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="batch_size"):
            predictor.predict(paths, batch_size=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(UsageError, match="top_k"):
        stream_predictions(predictor, paths, tmp_path / "x.jsonl", top_k=0)
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------ the same columns everywhere


@pytest.fixture(scope="module")
def all_unknown_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the run whose threshold makes every answer "unknown"."""
    import shutil
    from dataclasses import replace

    from graft.model import load_model

    run = tmp_path_factory.mktemp("unknown") / "run"
    shutil.copytree(trained_run, run)
    (run / "model.onnx").unlink(missing_ok=True)
    model = load_model(run)
    model.info = replace(model.info, unknown_threshold=1.0)
    model.save(run / "model.safetensors")
    return run


def test_csv_to_stdout_and_to_a_file_have_the_same_columns_and_labels(
    all_unknown_run: Path, images: Path, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    assert main(["predict", str(all_unknown_run), str(images), "--csv", "--top-k", "2"]) == 7
    printed = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    out = tmp_path / "p.csv"
    assert (
        main(["predict", str(all_unknown_run), str(images), "--out", str(out), "--top-k", "2"]) == 7
    )
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        written = list(reader)
        assert list(printed[0]) == reader.fieldnames and "label" in reader.fieldnames
    assert len(printed) == len(written) == 10
    assert [r["label"] for r in printed] == [r["label"] for r in written]
    assert {r["label"] for r in printed if not r["error"]} == {"unknown"}


# ------------------------------------------------------------------ never a NaN probability


def test_weights_with_nan_are_refused_at_load(
    trained_run: Path, images: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    import torch

    from graft.errors import WeightsError
    from graft.model import load_model
    from graft.predict import Predictor

    run = tmp_path / "nan"
    shutil.copytree(trained_run, run)
    (run / "model.onnx").unlink(missing_ok=True)
    model = load_model(run)
    with torch.no_grad():
        next(model.head.parameters()).fill_(float("nan"))
    with pytest.raises(WeightsError, match="non-finite weights"):
        Predictor(model)  # a model built in memory is checked too, not only a file
    model.save(run / "model.safetensors")
    with pytest.raises(WeightsError, match=r"(?i)nan or infini"):
        Predictor.from_run(run)
    capsys.readouterr()
    assert main(["predict", str(run), str(images), "--json"]) == 4
    captured = capsys.readouterr()
    assert "NaN" not in captured.out and "retrain" in captured.err.lower()


def test_non_finite_scores_become_per_image_errors(
    trained_run: Path, images: Path, tmp_path: Path
) -> None:
    import torch

    from graft.predict import NON_FINITE, Predictor, stream_predictions

    predictor = Predictor.from_run(trained_run)
    real = predictor.runner

    def half_broken(x: torch.Tensor) -> torch.Tensor:
        p = real(x).clone()
        p[::2] = float("nan")  # every other image of the batch
        return p

    predictor.runner = half_broken  # type: ignore[assignment]
    paths = sorted(images.iterdir())
    out = tmp_path / "p.jsonl"
    stats = stream_predictions(predictor, paths, out)

    def no_nan(token: str) -> None:
        raise AssertionError(f"invalid JSON constant {token}")

    rows = [json.loads(line, parse_constant=no_nan) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and stats.failed == sum("error" in r for r in rows)
    assert sum(r.get("error") == NON_FINITE for r in rows) >= 4
    probs, failed = predictor.predict_proba(paths)
    assert all(np.isfinite(probs[i]).all() for i in range(len(paths)) if i not in failed)


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_out_path_that_cannot_be_a_file_is_a_usage_error(
    trained_run: Path, images: Path, tmp_path: Path, where: str, capsys
) -> None:
    if where == "a folder":
        out = tmp_path / "results.jsonl"
        out.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "results.jsonl"
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "unexpected" not in err


def test_a_file_begun_by_another_model_is_not_continued(
    trained_run: Path, images: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    out = tmp_path / "preds.jsonl"
    lines_of = lambda: out.read_text().splitlines()  # noqa: E731
    first = [str(trained_run), str(images), "--out", str(out)]
    # interrupted after three rows: the stamp beside the file says which model began it
    assert main(["predict", *first]) == 7
    stamp = json.loads((tmp_path / ".preds.jsonl.graft.json").read_text())
    assert len(stamp["weights_sha256"]) == 64 and stamp["tta"] is False
    out.write_text("\n".join(lines_of()[:3]) + "\n")
    capsys.readouterr()
    # the same model from a moved run folder continues it
    moved = tmp_path / "moved-run"
    shutil.copytree(trained_run, moved)
    assert main(["predict", str(moved), str(images), "--out", str(out)]) == 7
    assert len(lines_of()) == 10
    # other settings, or other weights, are refused and the file is left as it is
    before = out.read_bytes()
    assert main(["predict", *first, "--tta"]) == 2
    assert "another model or setting (tta differ" in capsys.readouterr().err
    (tmp_path / ".preds.jsonl.graft.json").write_text(
        json.dumps({**stamp, "weights_sha256": "0" * 64})
    )
    assert main(["predict", *first]) == 2
    assert "weights_sha256 differ" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_file_continued_with_its_paths_spelled_otherwise_repeats_no_row(
    trained_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a hostile pass: `graft predict RUN big --out x.csv`, interrupted, then
    continued as `graft predict RUN /abs/big --out x.csv` (or from inside the folder) wrote
    every row again. Paths are compared as the files they name: relative ones against the
    folder the file was begun in, which its stamp records."""
    out = tmp_path / "x.csv"
    monkeypatch.chdir(images.parent)
    assert main(["predict", str(trained_run), images.name, "--out", str(out)]) == 7
    rows = out.read_text().splitlines()
    cut = rows[:5]  # the header and four rows: an interrupted call
    out.write_text("\n".join(cut) + "\n")
    monkeypatch.chdir(images)  # from inside the folder now, its files as ./name
    assert main(["predict", str(trained_run), ".", "--out", str(out)]) == 7
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 7
    again = list(csv.DictReader(out.read_text().splitlines()))
    assert len(again) == len(rows) - 1, [r["path"] for r in again]
    named = {Path(r["path"]).name for r in again}
    assert len(named) == len(again)  # each file once


def test_an_interrupted_call_says_the_same_command_continues_the_file(
    trained_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import graft.predictions

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(graft.predictions, "stream_predictions", interrupted)
    out = tmp_path / "x.csv"
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"kept in {out}; the same command continues it" in err, err


def test_links_and_a_moved_folder_neither_repeat_nor_lose_a_row(
    trained_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A second hostile pass: a symbolic link to the image folder wrote every row again;
    `link/../folder` (where the system follows the link) skipped files never predicted;
    a project folder moved with its file repeated every row; and --out reached through a
    link to the file skipped the model check."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(images, project / "imgs")
    (project / "link").symlink_to(project / "imgs", target_is_directory=True)
    monkeypatch.chdir(project)
    out = project / "x.csv"

    def files_in(path: Path) -> list[str]:
        rows = list(csv.DictReader(path.read_text().splitlines()))
        return sorted(os.path.realpath(r["path"]) for r in rows)

    assert main(["predict", str(trained_run), "imgs", "--out", "x.csv"]) == 7
    whole = files_in(out)
    cut = out.read_text().splitlines()[:5]
    for spelled in ("link", "link/../imgs"):
        out.write_text("\n".join(cut) + "\n")
        assert main(["predict", str(trained_run), spelled, "--out", "x.csv"]) == 7
        assert files_in(out) == whole, spelled  # each file once, none lost

    out.write_text("\n".join(cut) + "\n")
    moved = tmp_path / "moved"
    project.rename(moved)  # the folder moves with its file; the same command continues it
    monkeypatch.chdir(moved)
    assert main(["predict", str(trained_run), "imgs", "--out", "x.csv"]) == 7
    rows = list(csv.DictReader((moved / "x.csv").read_text().splitlines()))
    assert len(rows) == len(whole) and len({r["path"] for r in rows}) == len(whole)

    (tmp_path / "out-link.csv").symlink_to(moved / "x.csv")
    before = (moved / "x.csv").read_bytes()
    capsys.readouterr()
    link = str(tmp_path / "out-link.csv")
    assert main(["predict", str(trained_run), "imgs", "--out", link, "--tta"]) == 2
    assert "another model or setting" in capsys.readouterr().err
    assert (moved / "x.csv").read_bytes() == before
