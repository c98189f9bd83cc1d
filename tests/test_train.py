from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FAST, make_dataset
from graft import RunExistsError, TrainConfig, fit
from graft.errors import SplitError, UsageError
from graft.model import create_backbone


def test_run_folder_describes_itself(trained_run: Path, shapes_dir: Path) -> None:
    for name in (
        "config.json",
        "split.csv",
        "history.csv",
        "model.safetensors",
        "summary.json",
        "skipped.csv",
        "learning_curves.png",
        "class_counts.png",
        "confusion_matrix.png",
        "evaluation.json",
    ):
        assert (trained_run / name).is_file(), name
    config = json.loads((trained_run / "config.json").read_text())
    assert config["backbone"] == "efficientnet_lite0" and config["img_size"] == 64
    assert config["seed"] == 42 and config["versions"]["torch"].startswith("2.14.1")
    assert config["data_root"] == str(shapes_dir.resolve())
    with safe_open(str(trained_run / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["classes"]) == ["circle", "square", "triangle"]
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["img_size"]) == 64
    skipped = list(csv.DictReader(open(trained_run / "skipped.csv")))
    assert [Path(r["path"]).name for r in skipped] == ["broken.jpg"]
    for png in ("learning_curves.png", "class_counts.png", "confusion_matrix.png"):
        with Image.open(trained_run / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_split_file_has_every_usable_image_once(trained_run: Path) -> None:
    rows = list(csv.DictReader(open(trained_run / "split.csv")))
    assert len(rows) == 44 == len({r["path"] for r in rows})
    assert {r["subset"] for r in rows} == {"train", "val", "test"}
    assert "circle/more/deeper/nested.png" in {r["path"] for r in rows}


def test_history_covers_both_stages_and_the_model_learns(trained_run: Path) -> None:
    rows = list(csv.DictReader(open(trained_run / "history.csv")))
    assert list(rows[0]) == [
        "stage",
        "epoch",
        "step",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "l2",  # stage 1 is the linear probe's L2 path (graft.probe)
    ]
    stages = [r["stage"] for r in rows]
    assert stages[0] == "frozen" and stages[-1] == "fine-tune"
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    assert {float(r["lr"]) for r in rows if r["stage"] == "fine-tune"} == {1e-5}
    path = [float(r["l2"]) for r in rows if r["stage"] == "frozen"]
    assert path == sorted(path, reverse=True) and len(set(path)) == len(path)
    assert all(r["l2"] == "nan" for r in rows if r["stage"] == "fine-tune")
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.75, summary["test"]
    assert summary["diagnosis"]["verdict"] in {
        "good fit",
        "overfitting",
        "underfitting",
        "still improving",
        "inconclusive",  # a handful of validation images
    }
    assert summary["best"]["step"] >= 1
    assert float(rows[0]["train_loss"]) > float(rows[-1]["train_loss"])


def test_existing_run_folder_is_never_overwritten_without_force(
    trained_run: Path, shapes_dir: Path
) -> None:
    before = (trained_run / "model.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="--force"):
        fit(TrainConfig(**FAST), shapes_dir, trained_run)
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_force_replaces_only_graft_files(tmp_path: Path, shapes_dir: Path) -> None:
    config = TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0})
    out = tmp_path / "run"
    out.mkdir()
    (out / "my-notes.txt").write_text("keep me")
    (out / "history.csv").write_text("old")
    # not a graft run: even its graft-named files are the user's
    with pytest.raises(RunExistsError, match="not a graft run folder"):
        fit(config, shapes_dir, out, force=True)
    assert (out / "history.csv").read_text() == "old"
    (out / "history.csv").unlink()
    fit(config, shapes_dir, out, force=True)  # a folder of my notes only: used
    fit(config, shapes_dir, out, force=True)  # a graft run: replaced
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert (out / "history.csv").read_text().startswith("stage,")


def _backbone_state(run: Path) -> dict[str, torch.Tensor]:
    return {
        k[len("backbone.") :]: v
        for k, v in load_file(str(run / "model.safetensors")).items()
        if k.startswith("backbone.")
    }


def test_frozen_stage_changes_only_the_head(tmp_path: Path, shapes_dir: Path) -> None:
    out = tmp_path / "frozen"
    fit(TrainConfig(**{**FAST, "fine_tune_epochs": 0}), shapes_dir, out)
    pretrained, _ = create_backbone("efficientnet_lite0")
    reference = pretrained.state_dict()
    saved = _backbone_state(out)
    assert saved.keys() == reference.keys()
    changed = [k for k in saved if not torch.equal(saved[k], reference[k])]
    assert changed == [], f"frozen stage modified {changed[:5]}"  # incl. BN running stats


def test_partial_fine_tune_changes_only_the_last_blocks_and_keeps_bn_stats(
    tmp_path: Path, shapes_dir: Path
) -> None:
    out = tmp_path / "partial"
    fit(
        TrainConfig(
            **{
                **FAST,
                "epochs": 1,
                "fine_tune_epochs": 2,
                "unfreeze": "1",
                "fine_tune_lr": 1e-3,
                "patience": 0,
            }
        ),
        shapes_dir,
        out,
    )
    reference = create_backbone("efficientnet_lite0")[0].state_dict()
    saved = _backbone_state(out)
    changed = {k for k in saved if not torch.equal(saved[k], reference[k])}
    assert changed, "fine-tuning changed nothing"
    assert all(k.startswith("blocks.8.") for k in changed), sorted(changed)[:5]
    assert not any("running_" in k for k in changed)


def test_full_fine_tune_on_images_with_dense_head_and_strong_augmentation(
    tmp_path: Path, shapes_dir: Path
) -> None:
    out = tmp_path / "full"
    result = fit(
        TrainConfig(
            **{
                **FAST,
                "epochs": 2,
                "fine_tune_epochs": 1,
                "unfreeze": "all",
                "head": "dense:32",
                "augment": "strong",
                "optimizer": "adamw",
                "fine_tune_lr": 1e-4,
            }
        ),
        shapes_dir,
        out,
    )
    assert "last 9/9 blocks" in result.summary["plan"]
    assert "freshly decoded" in result.summary["plan"]
    saved = load_file(str(out / "model.safetensors"))
    assert saved["head.0.weight"].shape == (32, 1280)
    changed = _backbone_state(out)["blocks.0.0.weight"]
    assert not torch.equal(
        changed, create_backbone("efficientnet_lite0")[0].state_dict()["blocks.0.0.weight"]
    )


def test_class_weights_auto_follow_imbalance(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "imb", per_class={"circle": 24, "square": 8, "triangle": 8})
    result = fit(
        TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0}), data, tmp_path / "run"
    )
    assert result.summary["class_weights"].startswith("inverse frequency")
    balanced = fit(
        TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0, "class_weights": "none"}),
        data,
        tmp_path / "run2",
    )
    assert balanced.summary["class_weights"] == "off"


def test_same_seed_same_history(tmp_path: Path, shapes_dir: Path) -> None:
    cfg = {**FAST, "epochs": 2, "fine_tune_epochs": 1}
    runs = [fit(TrainConfig(**cfg), shapes_dir, tmp_path / f"r{i}") for i in range(2)]
    strip = [[(r.stage, r.train_loss, r.val_loss) for r in run.history] for run in runs]
    assert strip[0] == strip[1]


def test_early_stopping_stops_a_stage(tmp_path: Path, shapes_dir: Path) -> None:
    result = fit(
        TrainConfig(**{**FAST, "epochs": 30, "fine_tune_epochs": 0, "patience": 1, "lr": 0.5}),
        shapes_dir,
        tmp_path / "es",
    )
    assert len(result.history) < 30


def test_small_drops_in_loss_are_not_progress(tmp_path: Path, shapes_dir: Path) -> None:
    # Every epoch after the first lowers the loss by less than min_delta: the stage stops
    # after 1 + patience epochs, and the kept epoch is still the lowest loss among them.
    cfg = {**FAST, "epochs": 8, "fine_tune_epochs": 0, "patience": 2, "min_delta": 100.0}
    cfg["head_solver"] = "adam"  # epochs (the probe's own path is tests/test_robust.py)
    result = fit(TrainConfig(**cfg), shapes_dir, tmp_path / "md")
    assert [r.epoch for r in result.history] == [1, 2, 3]
    lowest = min(result.history, key=lambda r: r.val_loss)
    assert result.summary["best"]["step"] == lowest.step


def test_too_small_dataset_is_a_split_error(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", per_class={"circle": 10, "square": 2})
    with pytest.raises(SplitError, match="'square'"):
        fit(TrainConfig(**FAST), data, tmp_path / "run")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"backbone": "resnet"}, "--backbone"),
        ({"head": "dense"}, "--head"),
        ({"unfreeze": "some"}, "--unfreeze"),
        ({"test_size": 0.7}, "--test-size"),
        ({"epochs": 0, "fine_tune_epochs": 0}, "Nothing to train"),
        ({"augment": "heavy"}, "--augment"),
        ({"min_delta": -0.1}, "--min-delta"),
    ],
)
def test_bad_options_are_named(bad: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        TrainConfig(**bad)


def test_vgg16_trains_end_to_end_from_a_local_weights_file(
    tmp_path: Path, shapes_dir: Path, vgg16_weights: Path
) -> None:
    from graft import ImageClassifier

    out = tmp_path / "vgg"
    result = fit(
        TrainConfig(
            **{
                **FAST,
                "backbone": "vgg16",
                "weights": str(vgg16_weights),
                "img_size": 32,
                "epochs": 1,
                "fine_tune_epochs": 1,
                "allow_download": False,
            }
        ),
        shapes_dir,
        out,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["weights_source"] == str(vgg16_weights)
    assert "last 2/5 blocks" in result.summary["plan"]
    clf = ImageClassifier.load(out)
    assert clf.predict_proba([next(shapes_dir.glob("circle/*.png"))]).shape == (1, 3)


def test_unseen_folder_is_watched_every_epoch_and_reported_apart(
    shapes_dir: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    from graft.data import build_transform

    out = tmp_path / "run"
    cfg = TrainConfig(**FAST, unseen=str(unseen_dir), augment="domain", l2sp=0.01)
    result = fit(cfg, shapes_dir, out)
    with open(out / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.history)
    assert all(0.0 <= float(r["unseen_acc"]) <= 1.0 for r in rows)
    unseen = result.summary["unseen"]
    assert unseen["n"] == 9 and set(unseen["by_stage"]) == {"frozen", "fine-tune"}
    assert (out / f"eval-{unseen_dir.name}" / "evaluation.json").is_file()
    assert "In-domain vs out-of-domain" in (out / "report.html").read_text()
    # the domain augmentation makes varied, finite views
    tf = build_transform(64, (0.5,) * 3, (0.5,) * 3, "domain")
    image = Image.open(next(shapes_dir.rglob("*.png"))).convert("RGB")
    views = torch.stack([tf(image) for _ in range(6)])
    assert views.shape == (6, 3, 64, 64) and torch.isfinite(views).all()
    assert views.std(0).mean() > 0.05


def test_fine_tuning_that_does_not_help_is_not_kept(shapes_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**{**FAST, "fine_tune_lr": 1e-12, "fine_tune_head_lr": 1e-12})
    result = fit(cfg, shapes_dir, tmp_path / "run")
    assert result.summary["best"]["stage"] == "frozen"
    assert "fine-tuning did not improve the validation loss" in result.summary["kept"]
    with pytest.raises(UsageError, match="--l2sp"):
        TrainConfig(l2sp=-1)


def test_backbone_auto_probes_every_available_backbone(shapes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto"
    result = fit(TrainConfig(**{**FAST, "fine_tune_epochs": 0}, backbone="auto"), shapes_dir, out)
    choice = result.summary["backbone_choice"]
    lites = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert set(choice["scores"]) >= lites and "vgg16" in choice["skipped"]  # no VGG weights here
    assert all(0 <= s["val_acc"] <= 1 for s in choice["scores"].values())
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == choice["chosen"] in choice["scores"]
    best = max(s["val_acc"] for s in choice["scores"].values())
    assert choice["scores"][choice["chosen"]]["val_acc"] == best


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_optimizer_is_fused_on_cpu_and_steps_like_the_plain_one(name: str) -> None:
    from graft.loop import make_optimizer

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make_optimizer([*params, frozen], name, 1e-2, 1e-4)
        assert opt.param_groups[0]["fused"] is True and len(opt.param_groups[0]["params"]) == 2
        opt.param_groups[0]["fused"] = fused or None  # the plain loop, for comparison
        grads = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        results.append(params)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_kept_epoch_is_the_lowest_loss_however_small(tmp_path: Path) -> None:
    """Losses of 1e-6 .. 1e-7 on easy data: each lower one is kept, noise (1 ppm) is not."""
    from graft.checkpoint import Best
    from graft.rundir import EpochRecord

    class Model(torch.nn.Linear):
        def save(self, path: Path) -> None:
            path.write_bytes(b"weights")

    best = Best(Model(2, 2), tmp_path / "best.safetensors")  # type: ignore[arg-type]
    for step, loss in enumerate([1.0e-6, 4.0e-7, 4.0e-7 * (1 - 1e-9), 1.3e-7, 2.0e-7], 1):
        best.update(EpochRecord("fine-tune", step, step, 0.0, 1.0, loss, 1.0, 1e-5, 1.0))
    assert best.step == 4 and best.loss == 1.3e-7
