"""Optional experiment tracking: MLflow (a local file store by default) and TensorBoard.

Off by default, and then nothing here is imported. ``--track mlflow,tensorboard`` logs the
config as parameters, every epoch's losses and accuracies (one step per epoch across both
stages), the held-out metrics, and the run's plots, report and final weights as artifacts.

- MLflow writes to ``$MLFLOW_TRACKING_URI`` when set, else to ``./mlruns`` (view it with
  ``mlflow ui --backend-store-uri ./mlruns``); the experiment is the data folder's name.
- TensorBoard writes to ``RUN/tensorboard`` (view it with ``tensorboard --logdir RUN``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import rundir
from .errors import UsageError

TRACKERS = ("mlflow", "tensorboard")
#: files of a finished run that are worth keeping beside the metrics
ARTIFACTS = (
    rundir.CONFIG,
    rundir.SUMMARY,
    rundir.HISTORY,
    "learning_curves.png",
    "confusion_matrix.png",
    "reliability.png",
    rundir.REPORT,
    rundir.MODEL,
)


def parse_track(spec: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in spec.split(",") if n.strip())
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--track {name!r} is not valid: choose from {', '.join(TRACKERS)}.")
    return names


def _flat(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}_{k}" if prefix else str(k), v, out)


class Tracker:
    """Fans each event out to the chosen backends; a no-op when none is chosen."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, experiment: str):
        self.names, self.run_dir, self.experiment = names, Path(run_dir), experiment
        self._mlflow: Any = None
        self._tb: Any = None

    def start(self) -> None:
        """Open the backends (once the run folder exists)."""
        names, experiment = self.names, self.experiment
        if "mlflow" in names:
            try:
                import mlflow
            except ImportError as exc:
                raise UsageError(
                    "--track mlflow needs MLflow: pip install 'graft[track]'."
                ) from exc
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                # The local file store needs no server or database. MLflow 3 keeps it in
                # "maintenance mode" and asks for this opt-in; a database URI set by the
                # user in MLFLOW_TRACKING_URI is used as it is.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((Path.cwd() / "mlruns").resolve().as_uri())
            mlflow.set_experiment(experiment)
            mlflow.start_run(run_name=self.run_dir.name)
            self._mlflow = mlflow
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise UsageError(
                    "--track tensorboard needs TensorBoard: pip install 'graft[track]'."
                ) from exc
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def where(self) -> list[str]:
        out = []
        if self._mlflow:
            out.append(f"MLflow {self._mlflow.get_tracking_uri()}")
        if self._tb:
            out.append(f"TensorBoard {self.run_dir / 'tensorboard'}")
        return out

    def params(self, config: dict[str, Any]) -> None:
        if self._mlflow:
            self._mlflow.log_params({k: str(v)[:500] for k, v in config.items()})
        if self._tb:
            rows = "\n".join(f"| {k} | {v} |" for k, v in config.items())
            self._tb.add_text("config", "| option | value |\n|---|---|\n" + rows)

    def epoch(self, rec: Any) -> None:
        values = {
            "train_loss": rec.train_loss,
            "train_acc": rec.train_acc,
            "val_loss": rec.val_loss,
            "val_acc": rec.val_acc,
            "lr": rec.lr,
            "epoch_seconds": rec.seconds,
        }
        if self._mlflow:
            self._mlflow.log_metrics(values, step=rec.step)
        if self._tb:
            for key, value in values.items():
                group = "loss" if "loss" in key else "accuracy" if "acc" in key else "other"
                self._tb.add_scalar(f"{group}/{key}", value, rec.step)
            self._tb.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        metrics: dict[str, float] = {}
        _flat("test", summary.get("test", {}), metrics)
        _flat("calibration", summary.get("calibration", {}), metrics)
        lo_hi = summary.get("test", {}).get("accuracy_ci95")
        if lo_hi:
            metrics["test_accuracy_ci95_low"], metrics["test_accuracy_ci95_high"] = lo_hi
        if self._mlflow:
            self._mlflow.log_metrics(metrics)
            for name in ARTIFACTS:
                if (self.run_dir / name).is_file():
                    self._mlflow.log_artifact(str(self.run_dir / name))
            self._mlflow.end_run()
        if self._tb:
            for key, value in metrics.items():
                self._tb.add_scalar(f"test/{key}", value, 0)
            if "diagnosis" in summary:
                self._tb.add_text("diagnosis", summary["diagnosis"].get("explanation", ""))
            self._tb.close()

    def abort(self) -> None:
        if self._mlflow:
            self._mlflow.end_run(status="FAILED")
        if self._tb:
            self._tb.close()


__all__ = ["TRACKERS", "Tracker", "parse_track"]
