"""Issue 16: the linear-probe head, learning-rate schedules and WiSE-FT."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, history_rows
from graft import TrainConfig, fit
from graft.errors import UsageError
from graft.probe import choose_point, probe_path
from graft.schedule import StepSchedule, lr_factor
from graft.wise import mix

# ----------------------------------------------------------------------------- schedules


def test_constant_schedule_is_flat() -> None:
    assert [lr_factor("constant", s, 10) for s in range(10)] == [1.0] * 10


def test_cosine_warms_up_then_decays_to_zero() -> None:
    total, warmup = 100, 0.1  # warm-up over steps 0..9
    f = [lr_factor("cosine", s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[10] == pytest.approx(1.0)  # the peak, where the warm-up ends
    assert f[55] == pytest.approx(0.5)  # half-way through the decay
    assert 0 < f[99] < 1e-3  # the last step still learns a little
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # decays monotonically
    assert lr_factor("cosine", 1, 2, 0.05) > 0  # a 2-step stage: no step at rate 0


def test_onecycle_starts_low_peaks_at_a_quarter_and_ends_near_zero() -> None:
    total = 101
    f = [lr_factor("onecycle", s, total, 0.05) for s in range(total)]
    assert f[0] == pytest.approx(1 / 25)
    assert f[25] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
    assert f[100] == pytest.approx(1e-5)


def test_step_schedule_sets_each_group_from_its_own_base_rate() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 1e-3}], lr=1e-4)
    sched = StepSchedule(opt, "cosine", steps_per_epoch=5, epochs=4, warmup=0.1)
    seen = []
    for epoch in (1, 2, 3, 4):
        for batch in range(5):
            sched.at(epoch, batch)
            seen.append([g["lr"] for g in opt.param_groups])
    for step, (low, high) in enumerate(seen):
        factor = lr_factor("cosine", step, 20, 0.1)
        assert low == pytest.approx(1e-4 * factor) and high == pytest.approx(1e-3 * factor)
    # a schedule rebuilt for a resumed run (the optimizer restored with the last rates)
    # sets the same rate at the same step: it depends on the step, not on its history
    again = StepSchedule(opt, "cosine", steps_per_epoch=5, epochs=4, warmup=0.1)
    again.at(3, 2)
    assert [g["lr"] for g in opt.param_groups] == seen[12]


def test_unknown_schedule_and_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("linear", 1, 10)
    for bad in ({"schedule": "linear"}, {"warmup": 1.5}, {"wise": "half"}, {"wise": "1.5"}):
        with pytest.raises(UsageError, match="--"):
            TrainConfig(**bad)  # type: ignore[arg-type]
    assert TrainConfig(wise="0.5").wise_alpha == 0.5 and TrainConfig(wise="auto").wise_alpha is None


# ----------------------------------------------------------------------------- WiSE-FT


def test_mix_gives_the_endpoints_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(50, 7, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(50, 7, generator=g) * 1e3, "n": torch.tensor(5)}
    assert torch.equal(mix(a, b, 0.0)["w"], a["w"])
    assert torch.equal(mix(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(mix(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"], atol=1e-3)
    assert mix(a, b, 0.5)["n"] == 5  # counters are not interpolated


@pytest.mark.parametrize("alpha", ["0", "1"])
def test_wise_at_the_ends_keeps_the_frozen_stage_or_the_fine_tuned_model(
    tmp_path: Path, shapes_dir: Path, alpha: str
) -> None:
    # (no refit: the weights are the mix itself)
    options = {"fine_tune_epochs": 2, "patience": 0, "wise": alpha, "refit": False}
    cfg = TrainConfig(**{**FAST, **options})
    out = tmp_path / "run"
    summary = fit(cfg, shapes_dir, out).summary
    assert summary["wise"]["alpha"] == float(alpha)
    assert summary["best"]["stage"] == "wise"
    kept = load_file(str(out / "model.safetensors"))
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    # 0: the weights fine-tuning started from (the frozen-stage model); 1: its last epoch
    prefix = "anchor." if alpha == "0" else "model."
    ends = {k[len(prefix) :]: v for k, v in ckpt.items() if k.startswith(prefix)}
    assert ends and all(torch.equal(kept[k], v) for k, v in ends.items())
    other = "model." if alpha == "0" else "anchor."
    assert any(not torch.equal(kept[k[len(other) :]], v) for k, v in ckpt.items()
               if k.startswith(other))  # fmt: skip
    assert "WiSE-FT" in summary["kept"]


def test_wise_at_zero_keeps_the_frozen_stage_probe_and_refits_it(
    tmp_path: Path, shapes_dir: Path
) -> None:
    cfg = TrainConfig(**{**FAST, "fine_tune_epochs": 2, "patience": 0, "wise": "0"})
    summary = fit(cfg, shapes_dir, tmp_path / "run").summary
    assert summary["refit"] is not None and "solved again" in summary["kept"]
    kept = load_file(str(tmp_path / "run" / "model.safetensors"))
    ckpt = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    anchor = {k[7:]: v for k, v in ckpt.items() if k.startswith("anchor.")}
    changed = {k for k, v in anchor.items() if not torch.equal(kept[k], v)}
    assert changed and all(k.startswith("head.") for k in changed), changed


def test_wise_auto_tries_every_share_and_keeps_the_lowest_validation_loss(
    tmp_path: Path, shapes_dir: Path
) -> None:
    cfg = TrainConfig(**{**FAST, "fine_tune_epochs": 2, "patience": 0, "wise": "auto"})
    summary = fit(cfg, shapes_dir, tmp_path / "run").summary
    tried = summary["wise"]["tried"]
    assert [t["alpha"] for t in tried] == [0.0, 0.25, 0.5, 0.75, 1.0]
    lowest = min(t["val_loss"] for t in tried)
    if summary["wise"]["alpha"] is not None:
        assert summary["best"]["val_loss"] == pytest.approx(lowest)
    else:  # an earlier epoch beat every mix
        assert summary["best"]["val_loss"] < lowest


# ----------------------------------------------------------------------------- the probe


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping classes in 20 dimensions, on very different scales (as pooled
    features are: the probe must standardise)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(3, 20)) * 0.8
    y = rng.integers(0, 3, n)
    x = centres[y] + rng.normal(size=(n, 20))
    x = x * np.logspace(-2, 1, 20)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_probe_reaches_a_tuned_logistic_regression_on_validation() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs(240, 0)
    xv, yv = _blobs(1000, 1)
    # scikit-learn with C tuned on the same validation set, by the same criterion (the
    # validation loss): the best regularised logistic regression on these features
    fits = [
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x, y)
        for c in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10, 100)
    ]
    sk = min(fits, key=lambda f: log_loss(yv, f.predict_proba(xv)))
    sk_loss, sk_acc = log_loss(yv, sk.predict_proba(xv)), sk.score(xv, yv)
    points = list(probe_path(x[None], y))
    val_losses, val_accs = [], []
    for p in points:
        logits = xv @ p.weight.T + p.bias
        val_losses.append(torch.nn.functional.cross_entropy(logits, yv).item())
        val_accs.append((logits.argmax(1) == yv).float().mean().item())
    chosen = choose_point(val_losses, 1e-3)
    assert val_accs[chosen] >= sk_acc - 0.005, (val_accs, sk_acc)
    assert val_losses[chosen] <= sk_loss + 2e-3, (val_losses, sk_loss)
    # the L-BFGS solution is the optimum: its training loss matches scikit-learn's at the
    # same strength (C = 1 / (l2 * n))
    l2 = points[chosen].l2
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1 / (l2 * len(y)), max_iter=5000))
    ref.fit(x, y)
    ref_loss = torch.nn.functional.cross_entropy(
        torch.tensor(ref.decision_function(x), dtype=torch.float32), y
    ).item()
    assert points[chosen].train_loss == pytest.approx(ref_loss, rel=0.02, abs=1e-3)


def test_choose_point_prefers_the_strongest_l2_within_min_delta() -> None:
    assert choose_point([0.9, 0.30, 0.2995, 0.2990, 0.31], 1e-3) == 1
    assert choose_point([0.9, 0.30, 0.2995, 0.2990, 0.31], 0.0) == 3


def test_probe_stage_writes_one_row_per_l2_and_is_deterministic(
    tmp_path: Path, shapes_dir: Path
) -> None:
    cfg = TrainConfig(**{**FAST, "head_solver": "probe", "fine_tune_epochs": 0})
    a = fit(cfg, shapes_dir, tmp_path / "a")
    b = fit(cfg, shapes_dir, tmp_path / "b")
    rows = history_rows(tmp_path / "a")
    assert rows and all(r["stage"] == "frozen" and float(r["lr"]) == 0 for r in rows)
    l2s = [float(r["l2"]) for r in rows]
    assert l2s == sorted(l2s, reverse=True) and all(math.isfinite(v) for v in l2s)
    wa, wb = (
        load_file(str(a.run_dir / "model.safetensors")),
        load_file(str(b.run_dir / "model.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((a.run_dir / "summary.json").read_text())
    assert summary["test"]["accuracy"] > 0.8  # the shapes are easy
    # the frozen-stage probe is kept, so it was solved again on train + validation at the
    # L2 validation chose; without the refit, the same run differs only in the head
    kept_l2 = next(float(r["l2"]) for r in rows if int(r["step"]) == summary["best"]["step"])
    refit = summary["refit"]
    assert refit["l2"] == kept_l2 and refit["validation_images"] > 0
    assert "solved again on training + validation" in summary["kept"]
    c = fit(TrainConfig(**{**cfg.__dict__, "refit": False}), shapes_dir, tmp_path / "c")
    assert json.loads((c.run_dir / "summary.json").read_text())["refit"] is None
    wc = load_file(str(c.run_dir / "model.safetensors"))
    changed = {k for k in wa if not torch.equal(wa[k], wc[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed
    meta_a, meta_c = (_metadata(r / "model.safetensors") for r in (a.run_dir, c.run_dir))
    assert meta_a["temperature"] == meta_c["temperature"]
    assert meta_a["unknown_threshold"] == meta_c["unknown_threshold"]


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_refit_from_a_solution_reaches_the_solution_on_all_rows() -> None:
    """The refit starts from the train-only solution and ends where a solve from zeros on
    train + validation ends (the problem is convex): same predictions, loss within 1e-4."""
    x, y = _blobs(240, 0)
    xv, yv = _blobs(60, 1)
    first = next(probe_path(x[None], y, path=(1e-2,)))
    both_x, both_y = torch.cat([x, xv])[None], torch.cat([y, yv])
    warm = next(probe_path(both_x, both_y, path=(1e-2,), start=first))
    cold = next(probe_path(both_x, both_y, path=(1e-2,)))
    assert warm.train_loss == pytest.approx(cold.train_loss, abs=1e-4)
    logits = [both_x[0] @ p.weight.T + p.bias for p in (warm, cold)]
    assert torch.equal(logits[0].argmax(1), logits[1].argmax(1))
    assert warm.iterations <= cold.iterations
    assert not torch.allclose(warm.weight, first.weight)  # the validation rows moved it


def test_dense_head_keeps_adam_epochs(tmp_path: Path, shapes_dir: Path) -> None:
    cfg = TrainConfig(**{**FAST, "head": "dense:16", "fine_tune_epochs": 0, "patience": 0})
    fit(cfg, shapes_dir, tmp_path / "r")
    rows = history_rows(tmp_path / "r")
    assert len(rows) == FAST["epochs"] and "l2" not in rows[0]


def test_probe_solves_on_at_most_max_rows_clean_views_first() -> None:
    x, y = _blobs(40, 3)
    views = torch.stack([x, x + 100.0, x - 100.0])  # views 1 and 2 far off: easy to spot
    few = next(probe_path(views, y, max_rows=40))  # exactly the clean views
    clean = next(probe_path(x[None], y))
    assert torch.equal(few.weight, clean.weight) and torch.equal(few.bias, clean.bias)
    some = next(probe_path(views, y, max_rows=60, seed=1))
    again = next(probe_path(views, y, max_rows=60, seed=1))
    assert torch.equal(some.weight, again.weight)  # seeded
    assert not torch.allclose(some.weight, clean.weight)  # and the extra views took part


def test_schedule_and_wise_survive_an_interruption_bit_for_bit(
    tmp_path: Path, shapes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after the first fine-tuning epoch, then --resume: the same rates at
    every step, the same epochs and the same WiSE-FT mix, to the last bit."""
    import graft.stages
    from conftest import cli_args
    from graft.cli import main

    cfg = {**FAST, "fine_tune_epochs": 3, "patience": 0, "schedule": "cosine",
           "warmup": 0.2, "wise": "auto"}  # fmt: skip
    whole = tmp_path / "whole"
    fit(TrainConfig(**cfg), shapes_dir, whole)
    saved = graft.stages.save_checkpoint

    def save_then_stop(path, model, optimizer, generators, rng, meta, best, *rest):
        saved(path, model, optimizer, generators, rng, meta, best, *rest)
        if meta["stage"] == "fine-tune":
            raise KeyboardInterrupt

    run = tmp_path / "interrupted"
    monkeypatch.setattr(graft.stages, "save_checkpoint", save_then_stop)
    assert main(["train", str(shapes_dir), "--out", str(run), "--quiet", *cli_args(cfg)]) == 130
    monkeypatch.setattr(graft.stages, "save_checkpoint", saved)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    a, b = history_rows(run), history_rows(whole)
    assert [(r["stage"], r["lr"], r["train_loss"], r["val_loss"]) for r in a] == [
        (r["stage"], r["lr"], r["train_loss"], r["val_loss"]) for r in b
    ]
    rates = [float(r["lr"]) for r in b if r["stage"] == "fine-tune"]
    assert rates[0] > rates[1] > rates[2] >= 0  # decaying (cosine), not the constant 1e-5
    ra = json.loads((run / "summary.json").read_text())
    rb = json.loads((whole / "summary.json").read_text())
    assert ra["wise"] == rb["wise"] and ra["test"] == rb["test"]
    wa, wb = load_file(str(run / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_combinations_that_cannot_work_are_refused_and_library_values_normalised() -> None:
    with pytest.raises(UsageError, match="--head-solver probe solves a linear head"):
        TrainConfig(head="dense:8", head_solver="probe")
    for stages in ({"epochs": 0}, {"fine_tune_epochs": 0}):
        with pytest.raises(UsageError, match="needs both stages"):
            TrainConfig(wise="auto", **stages)
    assert TrainConfig(wise=0.5).wise == "0.5"  # a number from the library (a grid search)
    assert TrainConfig(wise=" auto ").wise == "auto"
    assert math.copysign(1, TrainConfig(wise="-0").wise_alpha) == 1.0  # not "-0 x fine-tuned"


def test_a_run_from_before_the_probe_resumes_with_adam(tmp_path: Path) -> None:
    import argparse

    from graft.cli import _resume_config

    run = tmp_path / "old"
    run.mkdir()
    saved = TrainConfig().to_dict()
    del saved["head_solver"], saved["schedule"], saved["warmup"], saved["wise"]
    (run / "config.json").write_text(json.dumps(saved))
    args = argparse.Namespace(resume=str(run), out=None, force=False)
    config = _resume_config(args)
    assert config.head_solver == "adam" and config.wise == "off"
