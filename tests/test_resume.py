"""Crash safety: a run killed with SIGKILL at any moment resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAST, cli_args
from conftest import history_rows as _rows
from graft import TrainConfig, fit
from graft.cli import main

CFG = {**FAST, "epochs": 4, "fine_tune_epochs": 3, "unfreeze": "all", "patience": 0}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("resume") / "whole"
    fit(TrainConfig(**CFG), shapes_dir, out)
    return out


def _kill_when(run: Path, shapes_dir: Path, condition) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graft",
            "train",
            str(shapes_dir),
            "--out",
            str(run),
            "--quiet",
            *cli_args(CFG),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if condition(_rows(run)):
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _same_result(resumed: Path, whole: Path) -> None:
    a, b = _rows(resumed), _rows(whole)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert x[key] == y[key], (key, x, y)
    ra = json.loads((resumed / "summary.json").read_text())
    rb = json.loads((whole / "summary.json").read_text())
    assert ra["test"] == rb["test"] and ra["best"] == rb["best"]
    wa, wb = (
        load_file(str(resumed / "model.safetensors")),
        load_file(str(whole / "model.safetensors")),
    )
    assert all((wa[k] == wb[k]).all() for k in wb)


def test_kill_during_fine_tuning_then_resume(
    tmp_path: Path, shapes_dir: Path, uninterrupted: Path, capsys
) -> None:
    run = tmp_path / "killed"
    _kill_when(run, shapes_dir, lambda rows: sum(r["stage"] == "fine-tune" for r in rows) >= 1)
    assert not (run / "summary.json").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _same_result(run, uninterrupted)
    assert not list(run.glob(".*.tmp"))
    # its timings are the continuation's, and say so
    assert json.loads((run / "summary.json").read_text())["timings_of"].startswith("the contin")
    assert json.loads((uninterrupted / "summary.json").read_text())["timings_of"] == "the whole run"


def test_kill_early_then_resume(tmp_path: Path, shapes_dir: Path, uninterrupted: Path) -> None:
    run = tmp_path / "killed-early"
    # as soon as the run folder has its split: during caching or the first epochs
    _kill_when(run, shapes_dir, lambda rows: (run / "config.json").is_file())
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _same_result(run, uninterrupted)


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path, uninterrupted: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--quiet"]) == 2  # nothing to resume
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    _same_result(run, uninterrupted)


def test_resume_without_a_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 6
    assert "Nothing to resume" in capsys.readouterr().err


def test_same_seed_gives_the_same_weights(
    tmp_path: Path, shapes_dir: Path, uninterrupted: Path
) -> None:
    again = tmp_path / "again"
    fit(TrainConfig(**CFG), shapes_dir, again)
    _same_result(again, uninterrupted)
