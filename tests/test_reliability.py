"""Reliability, round two (issue 20): bad options and inputs are refused before anything is
written, user files are never touched, a diverging run stops, and every refusal has its exit
code. Each test names the issue item it covers."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_dataset
from graft.cli import main
from graft.diagnose import diagnose
from graft.rundir import MANIFEST, EpochRecord

TINY = ["--img-size", "32", "--epochs", "1", "--fine-tune-epochs", "0", "--workers", "0"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 10 images: the size of the review's data sets."""
    return make_dataset(tmp_path_factory.mktemp("small") / "data", per_class=10)


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", str(data), "--out", str(out), *TINY, *extra])


# --------------------------------------------------------------- items 1, 13, 14, 15: options


@pytest.mark.parametrize(
    "options",
    [
        ["--l2sp", "nan"],
        ["--l2sp", "inf"],
        ["--min-delta", "nan"],
        ["--weight-decay", "-1"],
        ["--weight-decay", "nan"],
        ["--seed", "-1"],
        ["--seed", "99999999999"],
        ["--workers", "-5"],
        ["--views", "100000"],
        ["--workers", "10000"],
        ["--head", "dense:99999999999"],
        ["--groups-csv", "/nonexistent.csv"],
        ["--unseen", "/nonexistent"],
    ],
    ids=lambda o: " ".join(o),
)
def test_bad_option_is_usage_error_and_leaves_nothing(
    small: Path, tmp_path: Path, options: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert _train(small, out, *options) == 2
    err = capsys.readouterr().err
    assert options[0] in err and "bug" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "where"),
    [
        (["predict", "RUN", "x.png", "--batch-size", "-1", "--out", "x.jsonl"], "--batch-size"),
        (["predict", "RUN", "x.png", "--top-k", "0"], "--top-k"),
        (["serve", "RUN", "--port", "99999"], "--port"),
        (["serve", "RUN", "--port", "-1"], "--port"),
        (["serve", "RUN", "--max-mb", "nan"], "--max-mb"),
        (["serve", "RUN", "--max-mb", "inf"], "--max-mb"),
        (["serve", "RUN", "--max-files", "0"], "--max-files"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else a,
)
def test_other_commands_check_their_options_first(
    small: Path, tmp_path: Path, argv: list[str], where: str, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        str(small) if a == "DATA" else str(tmp_path / "nope") if a == "RUN" else a for a in argv
    ]
    os.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main(argv)
    assert stop.value.code == 2
    assert where in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_scan_options_outside_their_range_are_usage_errors(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    os.chdir(tmp_path)
    bad = (
        ["--img-size", "0"],
        ["--img-size", "5000"],
        ["--dup-threshold", "5"],
        ["--dup-threshold", "nan"],
    )
    for options in bad:
        assert main(["scan", str(small), "--no-audit", *options]) == 2
        assert options[0] in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no chart written


def test_bad_environment_variable_is_a_usage_error(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("GRAFT_CUT_CACHE_MB", "abc")
    out = tmp_path / "run"
    assert _train(small, out, "--fine-tune-epochs", "1") == 2
    assert "GRAFT_CUT_CACHE_MB" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------- item 13: nothing half-made


def _two_image_class(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "few", per_class={"circle": 10, "square": 2, "triangle": 10})


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("weights-missing", 4),
        ("vgg16-offline", 4),
        ("class-of-two", 3),
        ("one-class", 3),
    ],
)
def test_failed_start_leaves_no_run_folder(
    small: Path,
    tmp_path: Path,
    case: str,
    code: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached VGG16 weights
    data, extra = small, []
    if case == "weights-missing":
        extra = ["--weights", str(tmp_path / "missing.pth")]
    elif case == "vgg16-offline":
        extra = ["--backbone", "vgg16", "--offline"]
    elif case == "class-of-two":
        data = _two_image_class(tmp_path)
    else:
        data = tmp_path / "one"
        shutil.copytree(small / "circle", data / "circle")
    out = tmp_path / "run"
    assert _train(data, out, *extra) == code
    err = capsys.readouterr().err
    assert "bug" not in err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    if case == "one-class":
        assert "only one class" in err
    if case == "class-of-two":  # the corrected rerun needs no --force
        shutil.rmtree(data / "square")
        assert _train(data, out) == 0


def test_failed_start_keeps_what_was_in_the_folder(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # an empty-but-for-my-notes folder still needs --force; the failure must keep the notes
    assert _train(small, out, "--force", "--weights", str(tmp_path / "missing.pth")) == 4
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_out_inside_the_data_folder(small: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(small, data)
    assert _train(data, data / "runs" / "one") == 0
    capsys.readouterr()
    # item 19: a second run finds the first inside the data folder: not a class
    assert _train(data, data / "runs" / "two") == 0
    assert "Left out 'runs'" in capsys.readouterr().err
    assert main(["scan", str(data), "--no-audit", "--json", "--plot", str(tmp_path / "c.png")]) == 0
    assert '"runs"' not in capsys.readouterr().out


def test_loose_images_in_the_root_are_reported(small: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(small, data)
    Image.new("RGB", (8, 8)).save(data / "stray.png")
    assert main(["scan", str(data), "--no-audit", "--plot", str(tmp_path / "c.png")]) == 0
    assert "outside any class folder" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------- item 3: user files and --force


def test_force_replaces_only_graft_files(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(small, out) == 0
    assert main(["evaluate", str(out), str(small)]) == 0  # graft writes eval-data/
    graft_eval = [p.name for p in out.glob("eval-*")]
    assert graft_eval
    mine = {
        "notes.txt": "mine",
        "predictions/mine.csv": "a,b\n",
        "tensorboard/mylogs": "x",
        "eval-holiday/evaluation.json": "{}",
    }
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    assert _train(small, out) == 5  # exists: refused without --force
    assert _train(small, out, "--force") == 0
    for name, text in mine.items():
        assert (out / name).read_text() == text, name
    assert not any((out / n).exists() for n in graft_eval)  # the old model's results went

    owned = json.loads((out / MANIFEST).read_text())["files"]
    assert "model.safetensors" in owned and "notes.txt" not in owned


def test_force_refuses_a_folder_that_is_not_a_run(small: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("report.html", "config.txt", "class_counts.png"):
        (out / name).write_text("mine")
    assert _train(small, out, "--force") == 5
    assert "not a graft run folder" in capsys.readouterr().err
    # a folder holding none of graft's names is used: nothing of it is removed
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _train(small, other, "--force") == 0
    assert (other / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in (other / MANIFEST).read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "class_counts.png",
        "config.txt",
        "report.html",
    ]


# --------------------------------------------------------------- items 1 and 15: runs


def test_diverging_run_stops_with_its_own_exit_code(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import graft.stages as stages

    real = stages.train_one_epoch
    calls = {"n": 0}

    def diverge(*args, **kwargs):  # the second epoch's loss is NaN, as a too-high lr gives
        loss, acc = real(*args, **kwargs)
        calls["n"] += 1
        return (math.nan if calls["n"] >= 2 else loss), acc

    monkeypatch.setattr(stages, "train_one_epoch", diverge)
    out = tmp_path / "run"
    assert _train(small, out, "--epochs", "3", "--head-solver", "adam") == 9
    err = capsys.readouterr().err
    assert "diverged at epoch 2" in err and "--lr" in err
    assert not (out / "summary.json").exists()  # not a finished run
    from graft.model import load_model

    model = load_model(out / "model.safetensors")  # epoch 1's weights: finite, loadable
    assert all(t.isfinite().all() for t in model.state_dict().values())
    assert (out / "checkpoint.safetensors").exists()  # epoch 1 stays, with its history
    assert "checkpoint.safetensors" in (out / MANIFEST).read_text()


def test_resume_refuses_options_it_would_ignore(small: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(small, out) == 0
    capsys.readouterr()
    # a finished run: nothing to resume (it used to train it again)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--resume", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
    (out / "summary.json").unlink()
    assert main(["train", "--resume", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert not (tmp_path / "other").exists()


def test_groups_csv_that_names_no_image(small: Path, tmp_path: Path, capsys) -> None:
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group\n/abs/circle_000.png,a\nwrong/x.png,b\n")
    out = tmp_path / "run"
    assert _train(small, out, "--groups-csv", str(groups)) == 3
    assert "None of the 2 paths" in capsys.readouterr().err
    assert not out.exists()


def test_unfreeze_beyond_the_backbone_says_so(small: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(small, out, "--fine-tune-epochs", "1", "--unfreeze", "99") == 0
    assert "--unfreeze 99" in capsys.readouterr().err


# --------------------------------------------------------------- item 14: the system refuses


def _refuse(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/some/where")

    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_full_or_read_only_is_its_own_exit_code(
    small: Path, tmp_path: Path, code: int, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Writing model.safetensors fails as a full disk or read-only folder would make it:
    exit 8 with the reason and the path, not 'a bug in graft'."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _refuse(code))
    assert _train(small, tmp_path / "run") == 8
    err = capsys.readouterr().err
    assert "/some/where" in err and "bug" not in err


@contextlib.contextmanager
def _small_disk(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at ``path`` (``ro``, or ``size=...`` for a full disk) where this process
    may mount one; otherwise the test is skipped with the reason."""
    path.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize(("options", "words"), [("ro,size=1m", "read-only"), ("size=2m", "full")])
def test_read_only_or_full_disk_for_real(
    small: Path, tmp_path: Path, options: str, words: str, capsys
) -> None:
    with _small_disk(tmp_path / "disk", options) as disk:
        assert _train(small, disk / "run") == 8
        err = capsys.readouterr().err
        assert words in err and "bug" not in err
        if "ro" not in options:  # what was written before the disk filled is cleaned up
            assert not list(disk.glob("run/.*.tmp"))


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() == 0, reason="root ignores folder permissions"
)
def test_read_only_out_without_root(small: Path, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert _train(small, parent / "run") == 8
        assert "permission denied" in capsys.readouterr().err
    finally:
        parent.chmod(0o700)


def test_scan_from_a_read_only_folder(small: Path, tmp_path: Path, capsys) -> None:
    """scan writes its chart into the current folder by default."""
    with _small_disk(tmp_path / "disk", "ro,size=1m") as here:
        os.chdir(here)
        try:
            assert main(["scan", str(small), "--no-audit"]) == 8
        finally:
            os.chdir(tmp_path)
        assert "read-only" in capsys.readouterr().err


# --------------------------------------------------------------- items 17, 20: scan


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_scan_does_not_hang_on_a_fifo(small: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(small, data)
    os.mkfifo(data / "circle" / "pipe.png")
    assert main(["scan", str(data), "--no-audit", "--json", "--plot", str(tmp_path / "c.png")]) == 0
    assert "not a regular file" in capsys.readouterr().out


def test_scan_prints_class_names_as_they_are(small: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(small, data)
    (data / "circle").rename(data / "[bold]rich")
    assert main(["scan", str(data), "--no-audit", "--plot", str(tmp_path / "c.png")]) == 0
    assert "[bold]rich" in capsys.readouterr().out


def test_scan_warns_about_one_class(small: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "one"
    shutil.copytree(small / "circle", data / "circle")
    assert main(["scan", str(data), "--no-audit", "--plot", str(tmp_path / "c.png")]) == 0
    assert "Only one class" in capsys.readouterr().out


# --------------------------------------------------------------- item 18: honest messages


def _history(rows: list[tuple[float, float, float, float]]) -> list[EpochRecord]:
    return [
        EpochRecord("frozen", i + 1, i + 1, tl, ta, vl, va, 1e-3, 1.0)
        for i, (tl, ta, vl, va) in enumerate(rows)
    ]


def test_validation_far_above_training_is_not_a_good_fit() -> None:
    d = diagnose(_history([(1.2, 0.0, 0.4, 1.0)]), n_val=30)
    assert d.verdict == "inconclusive"


def test_too_few_validation_images_is_inconclusive() -> None:
    d = diagnose(_history([(0.5, 0.9, 0.5, 0.9), (0.4, 0.92, 0.45, 0.9)]), n_val=3)
    assert d.verdict == "inconclusive" and "3 validation image" in d.explanation
    assert diagnose(_history([(0.5, 0.9, 0.5, 0.9)] * 2), n_val=30).verdict != "inconclusive"


# --------------------------------------------------------------- item 20: small things


def test_run_files_share_one_permission(trained_run: Path) -> None:
    """model and checkpoint files used to be 0600 while the others were 0644."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in trained_run.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "checkpoint.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_evaluate_shows_no_score_for_a_class_with_no_images(
    trained_run: Path, tmp_path: Path, capsys
) -> None:
    data = make_dataset(tmp_path / "two", per_class={"circle": 3, "square": 3})
    assert main(["evaluate", str(trained_run), str(data), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "triangle" in line)
    assert "0.000" not in row and "none here" in row


def test_quiet_prints_nothing(small: Path, tmp_path: Path, capfd) -> None:
    """--quiet: only errors (scikit-learn's warnings on tiny classes used to get through)."""
    assert _train(small, tmp_path / "run", "--quiet", "--test-size", "0.1") == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_force_removes_what_a_killed_run_left_half_written(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(small, out) == 0
    leftover = out / ".checkpoint.safetensors.x1y2z3.tmp"  # kill -9 during a write
    leftover.write_bytes(b"")
    assert _train(small, out, "--force") == 0
    assert not leftover.exists()


def test_an_interrupted_force_puts_the_replaced_run_back(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # Found by the twelfth session's hostile pass: Ctrl+C early in a --force retrain left
    # the folder empty, the finished run it was replacing gone and nothing to resume.
    import graft.train

    out = tmp_path / "run"
    assert _train(small, out) == 0
    assert main(["evaluate", str(out), str(small)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # before the first checkpoint of the new run

    with monkeypatch.context() as m:
        m.setattr(graft.train, "fill_caches", interrupted)
        assert _train(small, out, "--force", "--seed", "5") == 130
    assert "back in place" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # every file of the finished run, byte for byte, nothing else
    assert main(["predict", str(out), str(next(small.rglob("*.png")))]) == 0
    # kill -9 of a replacement (nothing unwinds): the run it set aside is still the one
    # kept by the next --force that is interrupted
    aside = out / ".graft-replaced"
    aside.mkdir()
    for p in list(out.iterdir()):
        if p != aside:
            p.replace(aside / p.name)
    (out / "config.json").write_text('{"seed": 5}')  # the killed run's start
    with monkeypatch.context() as m:
        m.setattr(graft.train, "fill_caches", interrupted)
        assert _train(small, out, "--force", "--seed", "5") == 130
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # a replacement that finishes takes the folder and leaves nothing set aside
    assert _train(small, out, "--force", "--seed", "5") == 0
    assert not (out / ".graft-replaced").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 5


# --------------------------------------------------------------- the hostile pass of 1871cf6


@pytest.mark.parametrize("command", ["scan", "report", "lr-find", "grid"])
def test_outputs_never_overwrite_your_files(
    small: Path, trained_run: Path, tmp_path: Path, command: str, capsys
) -> None:
    mine = tmp_path / "mine.png" if command != "report" else tmp_path / "mine.html"
    mine.write_text("my notes, not a picture")
    argv = {
        "scan": ["scan", str(small), "--no-audit", "--plot", str(mine)],
        "report": ["report", str(trained_run), "--out", str(mine)],
        "lr-find": ["lr-find", str(small), "--out", str(mine)],
        "grid": ["predict", str(trained_run), str(small / "circle"), "--grid", str(mine)],
    }[command]
    assert main(argv) == 2
    assert "not written by graft" in capsys.readouterr().err
    assert mine.read_text() == "my notes, not a picture"
    folder = tmp_path / "folder.png"
    folder.mkdir()
    argv[argv.index(str(mine))] = str(folder)
    assert main(argv) == 2
    assert "is a folder" in capsys.readouterr().err


def test_outputs_graft_wrote_are_replaced(small: Path, tmp_path: Path) -> None:
    plot = tmp_path / "counts.png"
    assert main(["scan", str(small), "--no-audit", "--plot", str(plot)]) == 0
    assert main(["scan", str(small), "--no-audit", "--plot", str(plot)]) == 0


def test_evaluate_never_writes_into_your_folder(trained_run: Path, tmp_path: Path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "evaluation.json").write_text("my own")
    assert main(["evaluate", str(trained_run), "--out", str(mine)]) == 2
    assert (mine / "evaluation.json").read_text() == "my own"
    assert main(["evaluate", str(trained_run), "--out", str(mine / "evaluation.json")]) == 2
    assert "bug" not in capsys.readouterr().err


def test_a_model_onnx_from_other_weights_is_never_used(
    small: Path, trained_run: Path, tmp_path: Path
) -> None:
    """The ONNX graph is tied to the weights by hash, not by date."""
    from graft.predict import Predictor

    other = tmp_path / "other"
    assert _train(small, other) == 0
    images = sorted((small / "circle").iterdir())[:3]
    want = Predictor.from_run(other).predict_proba(images)[0]
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    Predictor.from_run(run).predict_proba(images)  # makes run/model.onnx
    onnx = run / "model.onnx"
    assert onnx.is_file()
    shutil.copy2(other / "model.safetensors", run / "model.safetensors")
    old = onnx.stat().st_mtime - 1000
    os.utime(run / "model.safetensors", (old, old))  # restored weights keep their old date
    got = Predictor.from_run(run).predict_proba(images)[0]
    assert abs(got - want).max() < 1e-4


def test_predict_does_not_hang_on_a_fifo(trained_run: Path, small: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(sorted((small / "circle").iterdir())[0], folder / "a.png")
    os.mkfifo(folder / "b.png")
    done = subprocess.run(
        [sys.executable, "-m", "graft", "predict", str(trained_run), str(folder), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 7, done.stderr
    assert "not a regular file" in done.stdout


def test_files_you_add_during_training_stay_yours(tmp_path: Path) -> None:
    from graft.rundir import RunDir

    run = RunDir(tmp_path / "run")
    before = run.prepare(force=False)
    for name in ("history.csv", "MYNOTES.txt", "model.safetensors"):
        (run.path / name).write_text("x")
    (run.path / "myphotos").mkdir()
    run.claim_new(before)
    owned = run.owned() or []
    assert "history.csv" in owned and "model.safetensors" in owned
    assert "MYNOTES.txt" not in owned and "myphotos" not in owned


#: no cache and many views: the frozen passes take seconds, so a signal sent when the run
#: folder appears lands before the first epoch even on a fast machine
SLOW = ["--no-cache", "--img-size", "224", "--views", "16"]


def test_sigterm_before_the_first_epoch_leaves_nothing(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft", "train", str(small), "--out", str(out), *TINY, *SLOW],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / MANIFEST).exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    if (out / "checkpoint.safetensors").exists():
        pytest.skip("the first epoch finished before the signal arrived")
    assert code == 130
    assert not out.exists(), sorted(p.name for p in out.iterdir())


#: ``python -c DRIVER MODE DATA OUT``: `graft train DATA --out OUT` (tiny) with a signal sent
#: where a test needs it, in a process of its own (the signal goes to that process alone)
DRIVER = """
import os, signal, sys, time
import numpy as np
from graft.cli import main
from graft.rundir import RunDir

mode, data, out = sys.argv[1:4]
real_seed, real_discard = np.random.seed, RunDir.discard_new

def seed(value):
    if mode == "second":  # the stop lands plainly; a second one comes during the clean-up
        real_seed(value)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    try:  # what a library's bare except does to the KeyboardInterrupt it gets
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs here, between two bytecodes
    except BaseException:
        pass
    if mode == "error":  # what a half-imported module does next
        raise RecursionError("maximum recursion depth exceeded")
    real_seed(value)

def discard(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    real_discard(self, *args, **kwargs)

np.random.seed = seed
RunDir.discard_new = discard
tiny = ["--img-size", "32", "--epochs", "1", "--fine-tune-epochs", "0", "--workers", "0"]
sys.exit(main(["train", data, "--out", out, *tiny]))
"""


def _driven(mode: str, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", DRIVER, mode, str(data), str(out)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_stop_that_library_code_swallows_still_stops_the_run(small: Path, tmp_path: Path):
    """Found by the test above, which skipped in one CI run of three: a SIGTERM landing
    while numpy.random is first imported (Cython's ``try: ... except: pass`` around its
    memoryview registration) was swallowed and the run went on to finish. The signal here
    lands inside such a block, every time: the run must still stop before its first epoch
    and leave nothing."""
    out = tmp_path / "run"
    done = _driven("swallowed", small, out)
    assert done.returncode == 130, done.stderr
    assert "interrupted. Nothing was kept" in done.stderr
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert _train(small, out) == 0  # and the same command then runs


def test_a_second_signal_during_the_clean_up_does_not_cut_it_short(small: Path, tmp_path: Path):
    """Ctrl+C twice (or `timeout`, then `kill`): the second signal landed in the clean-up
    the first had started and left a half-removed run folder that the same command then
    refused. Further signals are ignored once a stop is under way."""
    out = tmp_path / "run"
    done = _driven("second", small, out)
    assert done.returncode == 130, done.stderr
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_an_error_that_follows_a_stop_is_reported_as_the_interruption(
    small: Path, tmp_path: Path
) -> None:
    """A signal that cuts an import short leaves a half-imported module whose next use
    fails (a RecursionError inside numpy, seen with `graft export`): not 'a bug in
    graft', exit 1, but the interruption it is."""
    out = tmp_path / "run"
    done = _driven("error", small, out)
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "bug" not in done.stderr
    assert not out.exists()


def test_a_stop_while_the_report_is_written_says_the_run_finished(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The report is the last step: a run stopped there is complete, and `graft report`
    (not --resume, which has nothing to do) writes what is missing."""
    import graft.report

    def report_interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(graft.report, "write_report", report_interrupted)
    out = tmp_path / "run"
    assert _train(small, out) == 130
    err = capsys.readouterr().err
    assert f"graft report {out}" in err and "--force" not in err, err
    assert (out / "summary.json").is_file() and not (out / "report.html").exists()
    monkeypatch.undo()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_the_stop_handlers_are_put_back_and_the_request_forgotten() -> None:
    """After a command, the process's own handlers are back (a notebook's Ctrl+C, a test
    runner's) and a stop that was acted on does not stop a later call."""
    from graft import stopping

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stopping.install()
    try:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            stopping._stop(signal.SIGTERM, None)  # what the signal does
        stopping._stop(signal.SIGINT, None)  # a second one: ignored, nothing raised
        with pytest.raises(KeyboardInterrupt):
            stopping.raise_if_stopping()  # and graft's next step raises it again
        assert stopping.stop_requested() == signal.SIGTERM
    finally:
        stopping.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before
    assert stopping.stop_requested() is None
    stopping.raise_if_stopping()  # nothing raised
