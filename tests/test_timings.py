"""Every phase of a run is timed in summary.json, and the phases add up to the total."""

from __future__ import annotations

import json
from pathlib import Path

from graft.finish import PHASES, describe_timings


def test_the_phases_of_a_run_add_up_to_its_total(trained_run: Path) -> None:
    timings = json.loads((trained_run / "summary.json").read_text())["timings"]
    for phase in ("scan", "build", "audit", "cache", "frozen", "fine-tune", "calibration"):
        assert timings[f"{phase}_seconds"] > 0, phase
    for phase in ("evaluation", "export", "report"):
        assert timings[f"{phase}_seconds"] > 0, phase
    parts = sum(timings.get(f"{name}_seconds", 0.0) for name in PHASES)
    total = timings["total_seconds"]
    assert abs(parts - total) <= 0.05 * total, (parts, total, timings)
    # the export a run leaves is the one predict runs without torch
    stamp = json.loads((trained_run / "model.onnx.json").read_text())
    assert len(stamp["weights_sha256"]) == 64 and (trained_run / "model.onnx").is_file()


def test_the_breakdown_is_printed_in_the_order_of_the_run() -> None:
    text = describe_timings(
        {"total_seconds": 10.0, "scan_seconds": 1.0, "cache_seconds": 6.0, "export_seconds": 0.01}
    )
    assert text.replace("\u00a0", " ") == "Time 10.0 s: scan 1.0 s, cache 6.0 s."
    resumed = describe_timings({"total_seconds": 3.0, "frozen_seconds": 2.0}, resumed=True)
    assert resumed.replace("\u00a0", " ") == "Time of this continuation 3.0 s: frozen 2.0 s."
