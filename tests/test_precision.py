"""vitef.utils owns the precisions: one table, one validation, one autocast helper for every entry point."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vitef.errors import ConfigError
from vitef.utils import PRECISIONS, autocast_context, check_precision


def test_every_precision_is_valid_and_others_name_the_key():
    for name in PRECISIONS:
        assert check_precision(name) == name
    with pytest.raises(ConfigError, match=r"model\.precision='fp8' is not a known precision: use one of fp32, bf16"):
        check_precision("fp8", "model.precision")


def test_autocast_context_follows_the_table():
    assert isinstance(autocast_context(torch.device("cpu"), "fp32"), contextlib.nullcontext)
    layer = torch.nn.Linear(4, 4)
    with autocast_context("cpu", "bf16"):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision='int8'"):
        autocast_context("cpu", "int8")
    # The evaluation module keeps the helper importable under its old address.
    from vitef.evaluation import autocast_context as from_evaluation

    assert from_evaluation is autocast_context
