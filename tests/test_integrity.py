"""Integrity: wherever a run stores a hash or a length, graft checks it and refuses a
damaged or edited file with a clear error (and exit code) before writing anything.

Each test copies the session's ``trained_run`` (and, where images change, the data) into
``tmp_path`` first, then tampers with the copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from graft.cli import main

# --------------------------------------------------------------------------- helpers


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run(trained_run: Path, shapes_dir: Path, tmp_path: Path) -> Path:
    """A copy of the trained run whose data root is a copy of the data (free to change)."""
    data = tmp_path / "data" / "shapes"
    shutil.copytree(shapes_dir, data)
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    config = json.loads((out / "config.json").read_text())
    config["data_root"] = str(data)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _interrupted(run: Path) -> Path:
    """The run as if killed before it finished: no summary.json, so --resume continues it."""
    (run / "summary.json").unlink()
    return run


def _command(kind: str, run: Path) -> list[str]:
    if kind == "resume":
        _interrupted(run)
        return ["train", "--resume", str(run), "--quiet"]
    return ["evaluate", str(run), "--json"]


def _refuses(argv: list[str], run: Path, code: int, capsys, *fragments: str) -> str:
    """Run the CLI; assert its exit code, that the message holds ``fragments`` and that
    nothing in ``run`` changed. Returns the message."""
    before = _snapshot(run)
    assert main(argv) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert "unexpected error" not in err
    assert _snapshot(run) == before
    return err


def _split_lines(run: Path) -> list[str]:
    return (run / "split.csv").read_text().splitlines(keepends=True)


def _data_root(run: Path) -> Path:
    return Path(json.loads((run / "config.json").read_text())["data_root"])


def _first(run: Path, subset: str) -> str:
    """The path of the first image of ``subset`` in split.csv."""
    for line in _split_lines(run)[1:]:
        if line.split(",")[2] == subset:
            return line.split(",")[0]
    raise AssertionError(subset)


# --------------------------------------------------------------------------- 1. split.csv


@pytest.mark.parametrize("kind", ["evaluate", "resume"])
def test_a_truncated_split_is_refused(run: Path, kind: str, capsys) -> None:
    lines = _split_lines(run)
    half = len(lines) // 2
    (run / "split.csv").write_text("".join(lines[: half + 1]))
    argv = _command(kind, run)
    _refuses(argv, run, 6, capsys, f"split.csv in {run} is damaged: {half} rows", "recorded")


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("sha256", "a" * 63, "sha256 of 63 characters"),
        ("class", "dog", "class 'dog'"),
        ("subset", "holdout", "subset 'holdout'"),
        ("path", "/etc/passwd", "not one inside the data folder"),
        ("path", "../elsewhere.png", "not one inside the data folder"),
    ],
)
def test_a_bad_row_of_split_csv_is_refused(
    run: Path, column: str, value: str, says: str, capsys
) -> None:
    lines = _split_lines(run)
    header = lines[0].strip().split(",")
    cells = lines[5].rstrip("\n").split(",")
    cells[header.index(column)] = value
    lines[5] = ",".join(cells) + "\n"
    (run / "split.csv").write_text("".join(lines))
    _refuses(_command("evaluate", run), run, 6, capsys, "split.csv", "line 6", says)


def test_a_split_without_its_columns_or_with_a_short_row_is_refused(run: Path, capsys) -> None:
    lines = _split_lines(run)
    (run / "split.csv").write_text("path,class\n" + "".join(lines[1:]))
    _refuses(_command("evaluate", run), run, 6, capsys, "lacks the column(s) subset, sha256")
    lines[3] = lines[3].split(",", 1)[0] + "\n"
    (run / "split.csv").write_text("".join(lines))
    _refuses(_command("evaluate", run), run, 6, capsys, "line 4 does not have the 5 columns")


def test_an_edited_split_is_refused_by_its_recorded_digest(run: Path, capsys) -> None:
    from graft.split import data_from_split, write_split

    # A run whose config.json records what write_split returns: split.csv's rows and SHA-256
    data, split = data_from_split(run, None)
    text = (run / "split.csv").read_text()
    record = write_split(run / "split.csv", data, split.subsets, split.groups)
    assert (run / "split.csv").read_text() == text and record["rows"] == len(data.paths)
    config = json.loads((run / "config.json").read_text())
    config["split_csv"] = record
    (run / "config.json").write_text(json.dumps(config))
    assert main(_command("evaluate", run)) == 0
    capsys.readouterr()
    lines = text.splitlines(keepends=True)
    cells = lines[1].rstrip("\n").split(",")
    lines[1] = ",".join([*cells[:4], "another-group"]) + "\n"  # same rows, same subsets
    (run / "split.csv").write_text("".join(lines))
    _refuses(_command("evaluate", run), run, 6, capsys, "differs from what config.json recorded")


@pytest.mark.parametrize("kind", ["evaluate", "resume"])
def test_a_changed_image_is_refused(run: Path, kind: str, capsys) -> None:
    name = _first(run, "test")
    other = _first(run, "train")
    shutil.copy(_data_root(run) / other, _data_root(run) / name)
    _refuses(_command(kind, run), run, 3, capsys, "1 of the", "changed since", name)


@pytest.mark.parametrize("kind", ["evaluate", "resume"])
def test_a_moved_data_folder_is_refused_before_anything_is_written(
    run: Path, kind: str, capsys
) -> None:
    root = _data_root(run)
    moved = root.parent.parent / "moved"
    root.parent.rename(moved)
    hint = "--resume" if kind == "resume" else "--data-root NEW_ROOT"
    _refuses(_command(kind, run), run, 3, capsys, str(root), "no longer exists", hint)


def test_a_missing_image_is_named(run: Path, capsys) -> None:
    name = _first(run, "test")
    (_data_root(run) / name).unlink()
    _refuses(_command("evaluate", run), run, 3, capsys, "no longer holds 1 of the", name)


def test_evaluate_finds_moved_images_under_a_new_data_root(run: Path) -> None:
    from graft.evaluate import evaluate_run

    root = _data_root(run)
    moved = root.parent.parent / "moved"
    root.parent.rename(moved)
    result = evaluate_run(run, data_root=moved / root.name)
    assert result["n"] == sum(1 for line in _split_lines(run) if ",test," in line)


# --------------------------------------------------------------------------- 2. feature cache


def _cache(tmp_path: Path, said: list[str]):
    from graft.cache import FeatureCache

    return FeatureCache(tmp_path / "cache", {"backbone": "test"}, warn=said.append)


def test_a_garbage_cache_shard_is_discarded_and_recomputed(tmp_path: Path) -> None:
    said: list[str] = []
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(6)]
    want = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    computed: list[list[int]] = []

    def compute(idx: list[int]) -> torch.Tensor:
        computed.append(idx)
        return want[idx]

    assert torch.equal(_cache(tmp_path, said).get_or_compute(0, shas, compute), want)
    (shard,) = (tmp_path / "cache").rglob("*.safetensors")
    # Keep the header (hashes, checksum, shape), replace the data with garbage: NaNs.
    raw = bytearray(shard.read_bytes())
    raw[-want.numel() * 4 :] = torch.full_like(want, float("nan")).numpy().tobytes()
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(1, 1))  # a new stamp even on a coarse clock
    got = _cache(tmp_path, said).get_or_compute(0, shas, compute)
    assert torch.equal(got, want)
    assert computed == [list(range(6)), list(range(6))]
    assert len(said) == 1 and "does not match its checksum" in said[0]
    # recomputed and stored again: a third pass reuses it
    assert torch.equal(_cache(tmp_path, said).get_or_compute(0, shas, compute), want)
    assert len(computed) == 2


def test_a_failing_cache_write_warns_once_and_goes_on(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    said: list[str] = []
    cache = _cache(tmp_path, said)
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(5)]
    rows = torch.randn(5, 3)
    got = cache.get_or_compute(0, shas, lambda idx: rows[idx], chunk=2)
    assert torch.equal(got, rows)
    assert len(said) == 1 and "No space left" in said[0], said
    assert "GRAFT_CACHE_DIR" in said[0]


def test_an_unwritable_cache_dir_does_not_fail_training(
    shapes_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(blocker / "cache"))
    argv = ["train", str(shapes_dir), "--out", str(tmp_path / "run"), "--img-size", "32"]
    argv += ["--epochs", "1", "--fine-tune-epochs", "0", "--views", "1", "--workers", "0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    # through the run's Reporter (stderr) or, without one, as a Python warning
    said = capsys.readouterr().err + " ".join(str(w.message) for w in caught)
    said = " ".join(said.split())  # the console wraps long lines
    assert "feature cache" in said and "Going on without storing" in said, said


# --------------------------------------------------------------------------- 3. weights metadata


def _tamper_model(path: Path, **changes: object) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    state = load_file(str(path))
    for key, value in changes.items():
        if key == "tensors":
            state.update(value)  # type: ignore[arg-type]
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0),
        ("temperature", "NaN"),
        ("img_size", 5000),
        ("img_size", "64.5"),
        ("classes", []),
        ("classes", ["circle", "circle", "square"]),
        ("mean", [0.5, 0.5]),
        ("std", [0.5, 0.0, 0.5]),
        ("unknown_threshold", 2),
        ("dropout", 1.5),
        ("head", "dense:lots"),
        ("backbone", "resnet9000"),
        ("trim", "yes"),
    ],
)
def test_tampered_model_metadata_is_refused(run: Path, field: str, value: object, capsys) -> None:
    _tamper_model(run / "model.safetensors", **{field: value})
    _refuses(
        ["evaluate", str(run)],
        run,
        4,
        capsys,
        f"model.safetensors in {run} has invalid metadata: {field}=",
        "changed after training",
    )


def test_model_classes_must_match_the_head(run: Path, capsys) -> None:
    _tamper_model(run / "model.safetensors", classes=["a", "b", "c", "d"])
    # evaluate reads the metadata before any model is built (graft.fast): the classes no
    # longer match the run's config.json, so the run folder was changed (exit 6)
    _refuses(["evaluate", str(run)], run, 6, capsys, "disagree on the classes")


def test_non_finite_weights_are_refused(run: Path, capsys) -> None:
    from safetensors.torch import load_file

    bias = load_file(str(run / "model.safetensors"))["head.1.bias"]
    _tamper_model(run / "model.safetensors", tensors={"head.1.bias": bias * float("inf")})
    _refuses(["evaluate", str(run)], run, 4, capsys, "NaN or infinite values in head.1.bias")


def _tamper_checkpoint(path: Path, state: dict | None = None, nan: bool = False) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["state"])
    tensors = load_file(str(path))
    meta.update(state or {})
    if nan:
        name = next(k for k in tensors if k.startswith("model.head."))
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"state": json.dumps(meta)})


@pytest.mark.parametrize(
    ("state", "nan", "says"),
    [
        ({"epoch": "two"}, False, "epoch='two'"),
        ({"stage": "warm-up"}, False, "stage 'warm-up'"),
        ({"history": [{"loss": 1}]}, False, "record 1 is not an epoch record"),
        ({"best": None}, False, "best=None"),
        (None, True, "NaN or infinite values in model.head."),
    ],
)
def test_a_tampered_checkpoint_is_refused_before_resuming(
    run: Path, state: dict | None, nan: bool, says: str, capsys
) -> None:
    _tamper_checkpoint(run / "checkpoint.safetensors", state, nan)
    _refuses(_command("resume", run), run, 6, capsys, "checkpoint", "is damaged", says)


# --------------------------------------------------------------------------- 4. run files' shapes


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("summary.json", "[1, 2]"),
        ("summary.json", '{"diagnosis": 3}'),
        ("config.json", '{"backbone": 7}'),
        ("evaluation.json", '"high"'),
        ("evaluation.json", '{"accuracy": "high"}'),
        ("audit.json", "{not json"),
        ("audit.json", '{"straddling_pairs": {"a": 1}, "threshold": []}'),
        ("eval-other/evaluation.json", "{}"),
    ],
)
def test_report_names_a_run_file_of_the_wrong_shape(
    run: Path, name: str, content: str, capsys
) -> None:
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).write_text(content)
    if name.startswith("eval-"):  # as if `graft evaluate` had written it
        from graft.rundir import RunDir

        RunDir(run).claim([Path(name).parent.name])
    where = f"{Path(name).name} in {(run / name).parent}"
    _refuses(["report", str(run)], run, 6, capsys, where)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("config.json", "[]", "not a JSON object"),
        ("config.json", '{"classes": ["circle", "square", "triangle"]}', "data_root is None"),
        ("config.json", '{"data_root": "/x", "classes": "circle"}', "classes is 'circle'"),
        ("config.json", "{truncated", "unreadable"),
        ("summary.json", "{truncated", "unreadable"),
        ("summary.json", '{"split": {"train": "most"}}', "its split sizes are"),
        ("audit.json", "[]", "its image count is None"),
    ],
)
def test_evaluate_names_a_damaged_run_file(
    run: Path, name: str, content: str, says: str, capsys
) -> None:
    (run / name).write_text(content)
    _refuses(["evaluate", str(run)], run, 6, capsys, name, says)


def test_evaluate_refuses_classes_that_disagree_with_the_model(run: Path, capsys) -> None:
    config = json.loads((run / "config.json").read_text())
    config["classes"] = ["circle", "triangle", "square"]
    (run / "config.json").write_text(json.dumps(config))
    _refuses(["evaluate", str(run)], run, 6, capsys, "disagree on the classes")


def test_resume_refuses_a_damaged_summary_or_audit(run: Path, capsys) -> None:
    (run / "audit.json").write_text('{"images": "many"}')
    argv = _command("resume", run)
    _refuses(argv, run, 6, capsys, f"audit.json in {run} is damaged: its image count is 'many'")


# --------------------------------------------------------------------------- 5. GRAFT_ENGINE


def test_an_unknown_engine_is_refused(
    trained_run: Path, unseen_dir: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("GRAFT_ENGINE", "bogus")
    image = next(unseen_dir.rglob("*.png"))
    assert main(["predict", str(trained_run), str(image)]) == 2
    err = capsys.readouterr().err
    assert "GRAFT_ENGINE='bogus'" in err and "openvino, onnxruntime or torch" in err
