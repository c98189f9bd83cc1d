"""TrainConfig: one validation for every option, from the CLI or the library."""

from __future__ import annotations

import math

import pytest

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
