"""The CLI, run in-process: output formats, files written and exit codes."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import FAST, cli_args
from graft.cli import build_parser, config_from_args, main
from graft.config import TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


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


# ------------------------------------------------------------ options from TrainConfig fields


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def config_options(command: str) -> dict[str, list[argparse.Action]]:
    """The options of ``command`` that set a TrainConfig field, by field name."""
    found: dict[str, list[argparse.Action]] = {}
    for action in subparser(command)._actions:
        if action.dest in FIELDS:
            found.setdefault(action.dest, []).append(action)
    return found


def test_every_train_option_is_a_config_field_with_help():
    options = config_options("train")
    assert set(options) == set(FIELDS)  # every field has an option, and nothing else sets one
    for name, actions in options.items():
        for action in actions:
            assert action.help and action.help.strip(), f"--{name} has no help"
        assert FIELDS[name].metadata["group"]


def test_train_help_shows_the_config_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = re.sub(r"-\n\s+", "-", capsys.readouterr().out)  # words wrapped at a hyphen
    blocks = re.split(r"\n(?=  -)", text)
    defaults = TrainConfig()
    checked = 0
    for name, f in FIELDS.items():
        flag = f.metadata["flag"] or "--" + name.replace("_", "-")
        block = " ".join(next(b for b in blocks if b.split()[0].rstrip(",") == flag).split())
        # a None default is chosen later (weight decay: by optimizer); the help says how
        value = None if f.default is None else getattr(defaults, name)
        if f.metadata["flag"]:  # a switch: its default is the field's, shown as no value
            assert "(default:" not in block
        elif value not in (None, ""):
            assert f"(default: {value})" in block, block
            checked += 1
    assert checked == 34  # the others: 7 fields default to None, track to "", 2 switches
    sections = {s.split(":\n")[0]: s for s in text.split("\n\n")}
    assert "--patience" in sections["both stages"] and "--min-delta" in sections["both stages"]
    assert "--epochs" in sections["stage 1: frozen backbone"]
    assert "--patience" not in sections["stage 2: fine-tuning"]


def test_train_without_options_is_the_default_config():
    args = build_parser().parse_args(["train", "ROOT", "--out", "X"])
    assert config_from_args(args) == TrainConfig()
    args = build_parser().parse_args(["train", "ROOT", "--out", "X", *cli_args(FAST)])
    assert config_from_args(args) == TrainConfig(**FAST)


def test_flag_forms_set_their_fields():
    flags = ["--no-pretrained", "--offline", "--no-trim", "--no-cache", "--unfreeze", "all"]
    args = build_parser().parse_args(["train", "ROOT", "--out", "X", *flags])
    config = config_from_args(args)
    assert (config.pretrained, config.allow_download, config.trim) == (False, False, False)
    assert config.cache_dir == "" and config.unfreeze == "all"
    args = build_parser().parse_args(["train", "R", "--trim", "--cache-dir", "/c", "--lr", "0.1"])
    config = config_from_args(args)
    assert config.trim is True and config.cache_dir == "/c" and config.lr == 0.1


@pytest.mark.parametrize("command", ["scan", "lr-find"])
def test_scan_and_lr_find_share_train_defaults(command):
    train = config_options("train")
    options = config_options(command)
    assert {"backbone", "img_size", "cache_dir"} <= set(options)
    for name, actions in options.items():
        for mine, theirs in zip(actions, train[name], strict=True):
            assert mine.option_strings == theirs.option_strings
            assert mine.default == theirs.default == FIELDS[name].default
            assert mine.type is theirs.type
    argv = [command, "ROOT"]
    assert config_from_args(build_parser().parse_args(argv)) == TrainConfig()
    if command == "lr-find":
        assert {"seed", "head", "batch_size", "weights", "allow_download", "trim"} <= set(options)
        args = build_parser().parse_args([*argv, "--seed", "7", "--offline", "--no-trim"])
        assert config_from_args(args) == TrainConfig(seed=7, allow_download=False, trim=False)


def test_scan_refuses_a_bad_option_value_before_reading_anything(capsys, tmp_path):
    code, _, err = run(["scan", tmp_path / "none", "--img-size", "8"], capsys)
    assert code == 2 and "--img-size 8 is not valid" in err


def test_help_and_usage_errors_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from graft.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['predict', '--help'], ['train', '-x']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "heavy = {'torch', 'torchvision', 'timm', 'numpy', 'rich'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_malloc_is_tuned_once_arguments_are_parsed(monkeypatch, tmp_path, capsys):
    import graft._malloc

    calls = []
    monkeypatch.setattr(graft._malloc, "tune_malloc", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        main(["report"])  # an argument error: no work starts
    assert calls == []
    assert main(["report", str(tmp_path)]) == 6
    assert calls == [1]


def test_predict_csv_has_the_columns_of_the_out_csv(trained_run, unseen_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    images = [*sorted(unseen_dir.rglob("*.png"))[:3], bad]
    code, printed, _ = run(["predict", trained_run, *images, "--csv", "--top-k", 2], capsys)
    assert code == 7
    out = tmp_path / "preds.csv"
    assert run(["predict", trained_run, *images, "--out", out, "--top-k", 2], capsys)[0] == 7
    shown = list(csv.reader(io.StringIO(printed)))
    with open(out, newline="") as fh:
        written = list(csv.reader(fh))
    assert (
        shown[0]
        == written[0][:8]
        == [
            "path",
            "label",
            "error",
            "familiarity",
            "class_1",
            "probability_1",
            "class_2",
            "probability_2",
        ]
    )
    assert shown[0] == written[0]
    # the same rows (scores may differ in the last digit between batchings)
    assert [r[:3] + r[4:5] + r[6:7] for r in shown] == [r[:3] + r[4:5] + r[6:7] for r in written]
    assert all(len(r) == 8 for r in shown + written)
    labels = [r[1] for r in shown[1:]]
    assert labels[-1] == "" and all(labels[:3])  # the answer or "unknown"; none for bad.png


def test_an_unfinished_run_is_used_with_a_warning(
    tmp_path: Path, trained_run: Path, shapes_dir: Path, capsys
) -> None:
    """An interrupted run's model.safetensors is its last kept epoch, uncalibrated:
    predict, evaluate and export say so (and how to finish it); a finished run says nothing."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = next(shapes_dir.rglob("*.png"))
    assert main(["predict", str(trained_run), str(image)]) == 0
    assert "did not finish" not in capsys.readouterr().err
    (run / "summary.json").unlink()
    for argv in (["predict", str(run), str(image)], ["export", str(run)]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "has no summary.json: its training did not finish" in err, err
        assert f"graft train --resume {run}" in err


def test_an_interrupted_train_says_whether_and_how_it_can_continue(tmp_path: Path) -> None:
    import graft.cli
    from graft.rundir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    args = argparse.Namespace(command="train", out=str(run), resume=None)
    assert "Nothing was kept" in graft.cli._how_to_continue(args)
    RunDir(run).checkpoint.write_bytes(b"")  # an epoch had finished
    assert f"graft train --resume {run}" in graft.cli._how_to_continue(args)
    args = argparse.Namespace(command="train", out=None, resume=str(run))
    assert f"graft train --resume {run}" in graft.cli._how_to_continue(args)
    predicting = argparse.Namespace(command="predict", out="x.csv")
    assert "kept in x.csv; the same command continues it" in graft.cli._how_to_continue(predicting)
    assert graft.cli._how_to_continue(argparse.Namespace(command="evaluate", out="x")) == ""
    spaced = tmp_path / "my runs" / "ü 1"  # typed as printed, it must name this one folder
    RunDir(spaced).path.mkdir(parents=True)
    RunDir(spaced).checkpoint.write_bytes(b"")
    hint = graft.cli._how_to_continue(argparse.Namespace(command="train", out=str(spaced)))
    command = hint.split("`")[1]
    assert shlex.split(command) == ["graft", "train", "--resume", str(spaced)]


def test_ctrl_c_during_train_exits_130_with_the_resume_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import graft.cli
    from graft.rundir import RunDir

    run = tmp_path / "run"

    def interrupted(args) -> int:
        run.mkdir()
        RunDir(run).checkpoint.write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setitem(graft.cli.COMMANDS, "train", interrupted)
    assert main(["train", str(tmp_path), "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert "graft train: interrupted." in err and f"graft train --resume {run}" in err


def test_a_closed_output_pipe_is_not_reported_as_a_bug(trained_run: Path) -> None:
    """`graft evaluate RUN | head -1`: the reader goes away before graft has printed; rich
    alone would exit 1 (graft's code for its own bugs). graft exits 141, as SIGPIPE would,
    without a word on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft", "evaluate", str(trained_run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before graft prints anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "bug" not in err and "Traceback" not in err
