"""OpenVINO's model cache (graft.ovcache): a second engine on the same graph loads its
compiled shapes instead of compiling them, with the same outputs; a damaged blob is never
read; a cache folder that cannot be written, or a compile that fails with the cache, only
means no cache; old graphs are pruned; ``GRAFT_OPENVINO_CACHE=off`` writes nothing."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from graft.inference import OpenVinoEngine
from graft.ovcache import CHECKSUM, KEEP_DAYS, cache_root

pytest.importorskip("openvino")


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, empty."""
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GRAFT_OPENVINO_CACHE", raising=False)
    return tmp_path / "cache" / "openvino"


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)


def graph(trained_run: Path) -> Path:
    return trained_run / "model.onnx"


def from_cache(engine: OpenVinoEngine, n: int) -> bool:
    """Whether OpenVINO read batch shape ``n`` from the cache rather than compiling it."""
    return bool(engine.requests[n].get_compiled_model().get_property("LOADED_FROM_CACHE"))


def blobs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.blob"))


def test_the_next_engine_loads_what_the_first_compiled(
    trained_run: Path, root: Path, batch: np.ndarray
) -> None:
    plain = OpenVinoEngine(graph(trained_run)).run(batch)
    first = OpenVinoEngine(graph(trained_run), cache=True)
    np.testing.assert_allclose(first.run(batch), plain, atol=1e-6)
    assert not from_cache(first, 2)
    [blob] = blobs(root)
    assert blob.parent.name == "2"  # one folder per graph, one per batch shape
    assert blob.with_name(blob.name + CHECKSUM).is_file()
    second = OpenVinoEngine(graph(trained_run), cache=True)
    np.testing.assert_allclose(second.run(batch), plain, atol=1e-6)
    assert from_cache(second, 2)
    assert blobs(root) == [blob]


def test_a_damaged_blob_is_compiled_again_not_read(
    trained_run: Path, root: Path, batch: np.ndarray
) -> None:
    """OpenVINO itself would load these zeroed bytes and answer wrongly."""
    plain = OpenVinoEngine(graph(trained_run)).run(batch)
    OpenVinoEngine(graph(trained_run), cache=True).run(batch)
    [blob] = blobs(root)
    data = bytearray(blob.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1000] = bytes(1000)
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    again = OpenVinoEngine(graph(trained_run), cache=True)
    np.testing.assert_allclose(again.run(batch), plain, atol=1e-6)
    assert not from_cache(again, 2)
    third = OpenVinoEngine(graph(trained_run), cache=True)  # the blob written again, good
    third.run(batch)
    assert from_cache(third, 2)


def test_a_cache_that_cannot_be_written_is_no_cache(
    trained_run: Path,
    tmp_path: Path,
    batch: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(blocked))  # ROOT/openvino cannot be made
    plain = OpenVinoEngine(graph(trained_run)).run(batch)
    with caplog.at_level(logging.DEBUG, logger="graft.ovcache"):
        engine = OpenVinoEngine(graph(trained_run), cache=True)
        np.testing.assert_allclose(engine.run(batch), plain, atol=1e-6)
    assert engine.cache is None
    assert "model cache off" in caplog.text


def test_a_compile_that_fails_with_the_cache_runs_without_it(
    trained_run: Path,
    root: Path,
    batch: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = OpenVinoEngine(graph(trained_run), cache=True)
    real = engine.core.compile_model

    class FussyCore:
        def compile_model(self, model, device, config):  # type: ignore[no-untyped-def]
            if "CACHE_DIR" in config:
                raise RuntimeError("cannot read the cache")
            return real(model, device, config)

    engine.core = FussyCore()  # type: ignore[assignment]
    with caplog.at_level(logging.DEBUG, logger="graft.ovcache"):
        out = engine.run(batch)
    assert out.shape[0] == 2 and np.isfinite(out).all()
    assert "compile with the cache failed" in caplog.text


def test_off_writes_nothing(
    trained_run: Path, root: Path, batch: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAFT_OPENVINO_CACHE", "off")
    assert cache_root() is None
    OpenVinoEngine(graph(trained_run), cache=True).run(batch)
    assert not root.exists()


@pytest.mark.parametrize(
    ("value", "where"), [("on", "default"), ("1", "default"), ("~/ov", "home")]
)
def test_a_folder_in_the_variable_is_where_the_cache_goes(
    value: str, where: str, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GRAFT_OPENVINO_CACHE", value)
    expected = root if where == "default" else tmp_path / "home" / "ov"
    assert cache_root() == expected


def test_graphs_unused_for_a_month_go_when_the_cache_is_written(
    trained_run: Path, root: Path, batch: np.ndarray
) -> None:
    old, recent = root / "0123456789abcdef", root / "fedcba9876543210"
    for folder, days in ((old, KEEP_DAYS + 1), (recent, KEEP_DAYS - 1)):
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "x.blob").write_bytes(b"blob")
        when = time.time() - days * 86400
        os.utime(folder, (when, when))
    OpenVinoEngine(graph(trained_run), cache=True).run(batch)
    assert not old.exists() and recent.is_dir()
    assert len(blobs(root)) == 2  # the recent graph's and the one just compiled


def test_a_folder_the_user_named_loses_nothing_of_theirs_to_pruning(
    trained_run: Path, tmp_path: Path, batch: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRAFT_OPENVINO_CACHE may name a folder that holds other things: old folders of the
    user's, even one named like a graph or holding a blob among other files, stay."""
    named = tmp_path / "models"
    monkeypatch.setenv("GRAFT_OPENVINO_CACHE", str(named))
    photos = named / "my_photos_2019"
    lookalike = named / "0123456789abcdef"
    mixed = named / "fedcba9876543210"
    for folder, name in ((photos, "keep.txt"), (lookalike, "notes.txt"), (mixed / "1", "a.txt")):
        folder.mkdir(parents=True)
        (folder / name).write_text("mine")
    (mixed / "1" / "x.blob").write_bytes(b"blob")
    when = time.time() - (KEEP_DAYS + 60) * 86400
    for folder in (photos, lookalike, mixed):
        os.utime(folder, (when, when))
    OpenVinoEngine(graph(trained_run), cache=True).run(batch)
    assert (photos / "keep.txt").is_file() and (lookalike / "notes.txt").is_file()
    assert (mixed / "1" / "a.txt").is_file()
    assert [b for b in blobs(named) if mixed not in b.parents]  # the cache works there
