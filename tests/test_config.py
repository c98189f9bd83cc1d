"""TrainConfig: one validation for every option, from the CLI or the library."""

from __future__ import annotations

import math

import pytest
import torch

from graft import TrainConfig, UsageError


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": math.nan}, "finite"),
        ({"l2sp": math.nan}, "finite"),
        ({"min_delta": math.inf}, "finite"),
        ({"weight_decay": -1.0}, "weight-decay"),
        ({"weight_decay": math.nan}, "finite"),
        ({"dropout": -math.inf}, "finite"),
        ({"lr": "0.1"}, "use a number"),
        ({"epochs": 1.5}, "whole number"),
        ({"epochs": True}, "whole number"),
        ({"img_size": "64"}, "whole number"),
        ({"trim": 1}, "True or False"),
    ],
)
def test_bad_values_are_usage_errors(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainConfig(**options)


def test_numbers_are_normalised_and_unfreeze_takes_an_int() -> None:
    config = TrainConfig(lr=1, unfreeze=3)
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.unfreeze == "3"
    assert TrainConfig(**TrainConfig().to_dict()) == TrainConfig()


def test_weight_decay_defaults_per_optimizer_and_a_given_zero_stays_zero() -> None:
    from graft.loop import make_optimizer

    assert TrainConfig().weight_decay == 0.0
    assert TrainConfig(optimizer="adamw").weight_decay == 0.01
    off = TrainConfig(optimizer="adamw", weight_decay=0)
    assert off.weight_decay == 0.0 and off.to_dict()["weight_decay"] == 0.0
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer([param], off.optimizer, 1e-3, off.weight_decay)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
