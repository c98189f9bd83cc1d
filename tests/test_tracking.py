"""--track mlflow,tensorboard: config, every epoch, the test metrics and the artifacts are
logged; without the flag neither library is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, cli_args
from graft.cli import main


def test_training_logs_to_mlflow_and_tensorboard(
    shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    cfg = {**FAST, "epochs": 2, "fine_tune_epochs": 1}
    argv = ["train", str(shapes_dir), "--out", str(run), "--quiet", *cli_args(cfg)]
    assert main([*argv, "--track", "mlflow,tensorboard"]) == 0
    history = (run / "history.csv").read_text().strip().splitlines()[1:]

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    found = mlflow.search_runs(experiment_names=["shapes"], output_format="list")
    assert len(found) == 1
    logged = found[0]
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["backbone"] == "efficientnet_lite0"
    assert 0.0 <= logged.data.metrics["test_accuracy"] <= 1.0
    client = mlflow.MlflowClient()
    val_loss = client.get_metric_history(logged.info.run_id, "val_loss")
    assert len(val_loss) == len(history)  # one point per epoch, both stages
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"model.safetensors", "learning_curves.png", "summary.json"} <= artifacts

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("loss/val_loss")) == len(history)
    assert events.Scalars("test/test_accuracy")


def test_bad_tracker_name_and_no_import_cost(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--track", "wandb"]) == 2
    assert "--track 'wandb'" in capsys.readouterr().err
    code = (
        "import sys, graft; from graft.train import fit; from graft.tracking import Tracker;"
        "print(any(m in sys.modules for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
