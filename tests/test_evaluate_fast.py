"""``graft evaluate`` on a run's current ONNX export (graft.fast): torch never imported, and
everything it writes the same as the PyTorch path's within 1e-4; the PyTorch path whenever
the export cannot be trusted or torch is asked for (stale or missing export,
``GRAFT_ENGINE=torch``, TTA), which makes the export again for the next call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import graft.model
from graft.evaluate import EVALUATION, evaluate_files, evaluate_run
from graft.modelinfo import current_onnx

#: what every evaluation writes beside evaluation.json (familiarity.png with --others)
PLOTS = {"confusion_matrix.png", "reliability.png", "top_losses.png"}


@pytest.fixture(scope="module")
def run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's run that this module's evaluations may write into."""
    return Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("evfast") / "run"))


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Noise images (none of the classes) and one file that is not an image."""
    folder = tmp_path_factory.mktemp("others")
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return folder


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two evaluation.json contents differ: numbers by more than 1e-4, anything else
    at all (``output_dir`` aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a, keys_b = set(a) - {"output_dir"}, set(b) - {"output_dir"}
        out = [f"{where}: keys {sorted(keys_a ^ keys_b)}"] if keys_a != keys_b else []
        for key in sorted(keys_a & keys_b):
            out += differences(a[key], b[key], f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{where}: {len(a)} items != {len(b)}"] if len(a) != len(b) else []
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            out += differences(x, y, f"{where}[{i}]")
        return out
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return [] if abs(a - b) <= 1e-4 else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def written(folder: Path) -> dict[str, Any]:
    """The files an evaluation wrote in ``folder`` and its evaluation.json."""
    return {
        "files": sorted(p.name for p in folder.iterdir()),
        "evaluation": json.loads((folder / EVALUATION).read_text()),
    }


def test_without_torch_it_writes_what_the_pytorch_path_writes(
    run: Path,
    unseen_dir: Path,
    others: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The held-out split with --others, and another folder: in a fresh process torch is
    never imported, and evaluation.json (every metric, the probabilities of the top losses,
    the --others separation) matches GRAFT_ENGINE=torch within 1e-4."""
    assert current_onnx(run / "model.safetensors") is not None  # training left it
    fast, slow = tmp_path / "fast", tmp_path / "torch"
    code = (
        "import json, sys\n"
        "from graft.evaluate import evaluate_run\n"
        f"evaluate_run({str(run)!r}, out_dir={str(fast / 'split')!r}, others={str(others)!r})\n"
        f"evaluate_run({str(run)!r}, {str(unseen_dir)!r}, out_dir={str(fast / 'folder')!r})\n"
        "heavy = ('torch', 'timm', 'torchvision')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRAFT_ENGINE"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout) == [], "graft evaluate imported torch"

    monkeypatch.setenv("GRAFT_ENGINE", "torch")
    evaluate_run(run, out_dir=slow / "split", others=others)
    evaluate_run(run, unseen_dir, out_dir=slow / "folder")
    for part, plots in (("split", PLOTS | {"familiarity.png"}), ("folder", PLOTS)):
        got, want = written(fast / part), written(slow / part)
        assert got["files"] == want["files"] == sorted(plots | {EVALUATION})
        assert differences(got["evaluation"], want["evaluation"]) == [], part
    assert got["evaluation"]["n"] == 9  # the folder: every image scored
    split = written(fast / "split")["evaluation"]
    assert split["others"]["n_others"] == 4 and len(split["others"]["failed"]) == 1


def test_the_command_imports_no_torch_and_prints_what_it_wrote(
    run: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "ev"
    cmd = [sys.executable, "-X", "importtime", "-m", "graft.cli", "evaluate", str(run)]
    env = {k: v for k, v in os.environ.items() if k != "GRAFT_ENGINE"}
    done = subprocess.run(
        [*cmd, str(unseen_dir), "--out", str(out_dir), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "timm", "torchvision"}
    printed = json.loads(done.stdout)
    assert printed["output_dir"] == str(out_dir) and printed["tta"] is False
    assert differences(printed, json.loads((out_dir / EVALUATION).read_text())) == []


@pytest.mark.parametrize("why", ["stale", "GRAFT_ENGINE=torch", "tta"])
def test_the_pytorch_path_answers_when_the_export_cannot_or_must_not(
    run: Path, tmp_path: Path, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case loads the PyTorch model (and agrees with the export within 1e-4); a stale
    export (its stamp names other weights) is made again, so the next evaluation needs no
    torch. A missing one takes the same path (graft.fast.current_onnx: None for both)."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    weights = copy / "model.safetensors"
    if why == "stale":  # a stamp naming other weights
        (copy / "model.onnx.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    elif why == "GRAFT_ENGINE=torch":
        monkeypatch.setenv("GRAFT_ENGINE", "torch")
    loaded: list[Path] = []
    real = graft.model.load_model

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(graft.model, "load_model", spy)
    result = evaluate_run(copy, out_dir=tmp_path / "torch", tta=why == "tta")
    assert loaded == [weights]
    assert current_onnx(weights) is not None  # made (or kept) for the next call
    monkeypatch.delenv("GRAFT_ENGINE", raising=False)
    fast = evaluate_run(copy, out_dir=tmp_path / "fast")
    assert loaded == [weights], "the export, current again, was not used"
    if why == "tta":
        assert result["tta"] is True and set(result["tta_effect"]) >= {"accuracy_with"}
        return
    assert differences(fast, result) == []


def test_evaluate_files_scores_the_model_it_is_given(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training evaluates its kept PyTorch model through evaluate_files: it must score that
    model, not the run's export on disk. A head with its sign flipped ranks the classes
    backwards, so its accuracy collapses where the run's own is high."""
    import torch

    monkeypatch.setenv("GRAFT_ENGINE", "torch")  # the model itself, no export to make

    from graft.split import data_from_split

    data, _ = data_from_split(run, None, subsets=("test",), purpose="evaluate")
    model = graft.model.load_model(run / "model.safetensors")
    classes = list(model.info.classes)
    own = evaluate_files(model, data.paths, data.labels, classes)
    with torch.no_grad():
        for weight in model.head.parameters():
            weight.mul_(-1)
    flipped = evaluate_files(model, data.paths, data.labels, classes)
    assert own["accuracy"] >= 0.6 > flipped["accuracy"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_confusion_matrix_and_scores_are_scikit_learns(seed: int) -> None:
    """graft.metrics computes them itself (importing sklearn.metrics costs about 1.1 s);
    scikit-learn is the reference, absent classes and never-predicted ones included."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from graft.metrics import confusion_and_scores

    rng = np.random.default_rng(seed)
    k = 6
    y = rng.integers(0, k - 1, 200)  # class 5 never occurs
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, k - 2, 200))  # 4, 5 rarely
    matrix, p, r, f, s = confusion_and_scores(y, pred, k)
    assert np.array_equal(matrix, confusion_matrix(y, pred, labels=list(range(k))))
    expected = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    for mine, theirs in zip((p, r, f, s), expected, strict=True):
        assert np.allclose(mine, theirs, atol=1e-12)
