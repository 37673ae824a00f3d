"""vitef.utils owns the precisions: one table, one validation, one autocast helper and one place that sets the
float32 backend flags (TF32) for every entry point, restoring the caller's flags afterwards."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny import random_vit

from vitef.errors import ConfigError
from vitef.evaluation import evaluate
from vitef.plasticity import measure
from vitef.probe import extract_features
from vitef.utils import (
    PRECISIONS,
    TF32_PRECISIONS,
    _restore_tf32_state,
    _tf32_state,
    autocast_context,
    check_precision,
    precision_flags,
    precision_scope,
    set_precision_flags,
    uses_tf32,
)

TF32_ON = {"float32_matmul_precision": "high", "cuda_matmul_allow_tf32": True, "cudnn_allow_tf32": True}
STRICT = {"float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False}
NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture(autouse=True)
def restore_process_flags():
    """Each test may set process-wide flags on purpose; the next test starts from torch's defaults again."""
    saved = _tf32_state()
    yield
    _restore_tf32_state(saved)


def test_every_precision_is_valid_and_others_name_the_key():
    assert list(PRECISIONS) == ["fp32", "tf32", "bf16", "fp16"]
    for name in PRECISIONS:
        assert check_precision(name) == name
    with pytest.raises(
        ConfigError, match=r"model\.precision='fp8' is not a known precision: use one of fp32, tf32, bf16, fp16$"
    ):
        check_precision("fp8", "model.precision")
    assert TF32_PRECISIONS <= set(PRECISIONS)
    assert [uses_tf32(p) for p in PRECISIONS] == [False, True, False, False]


def test_autocast_context_follows_the_table():
    assert isinstance(autocast_context(torch.device("cpu"), "fp32"), contextlib.nullcontext)
    assert isinstance(autocast_context("cpu", "tf32"), contextlib.nullcontext)  # float32 weights and activations
    layer = torch.nn.Linear(4, 4)
    with autocast_context("cpu", "bf16"):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision='int8'"):
        autocast_context("cpu", "int8")
    # The evaluation module keeps the helper importable under its old address.
    from vitef.evaluation import autocast_context as from_evaluation

    assert from_evaluation is autocast_context


def test_precision_scope_sets_the_flags_inside_and_restores_them_after():
    before = precision_flags()
    assert before["cudnn_allow_tf32"] is True  # torch's default, which fp32 must not keep: it is strict
    with precision_scope("tf32"):
        assert precision_flags() == TF32_ON
        assert torch.get_float32_matmul_precision() == "high"
        with precision_scope("fp32"):  # scopes nest: the inner one wins inside it
            assert precision_flags() == STRICT
        assert precision_flags() == TF32_ON
    assert precision_flags() == before
    for name in ("fp32", "bf16", "fp16"):  # autocast leaves some ops in float32: those stay strict
        with precision_scope(name):
            assert precision_flags() == STRICT
        assert precision_flags() == before


def test_precision_scope_restores_on_error_and_fp32_is_strict_whatever_the_process_set():
    set_precision_flags("tf32")  # e.g. a notebook that turned TF32 on for everything
    with pytest.raises(RuntimeError, match="boom"), precision_scope("fp32"):
        assert precision_flags() == STRICT
        raise RuntimeError("boom")
    assert precision_flags() == TF32_ON
    with pytest.raises(ConfigError, match="precision='tf16'"), precision_scope("tf16"):
        pass
    assert precision_flags() == TF32_ON


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no per-backend fp32_precision")
def test_the_per_backend_strings_of_new_torch_agree_and_are_restored():
    # A process-wide TF32 default set through the new API: fp32 must still be strict for matmuls and convolutions
    # (the legacy cuDNN switch alone would leave convolutions inheriting "tf32").
    torch.backends.fp32_precision = "tf32"
    saved = _tf32_state()["fp32_precision"]
    with precision_scope("fp32"):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert precision_flags()["cuda_matmul_allow_tf32"] is False
        assert precision_flags()["cudnn_allow_tf32"] is False
    with precision_scope("tf32"):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert precision_flags() == TF32_ON  # the legacy readers (torch.compile's guards) agree
    assert _tf32_state()["fp32_precision"] == saved


@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_library_entry_points_compute_under_their_precision_and_restore_the_callers_flags(precision):
    # Evaluation (train/eval apps), plasticity (analysis app) and probe features (probing app) each set the flags
    # of their `precision` for their forward passes and leave the caller's as they were.
    model = random_vit()
    seen: list[dict] = []
    model.patch_embed.register_forward_hook(lambda *_: seen.append(precision_flags()))
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=2)
    caller = "fp32" if precision == "tf32" else "tf32"
    set_precision_flags(caller)
    before = precision_flags()
    evaluate(model, loader, torch.device("cpu"), precision=precision)
    measure(model, [images[:2]], [images[2:]], precision=precision, mode="hidden")
    measure(model, [images[:2]], [images[2:]], precision=precision)
    extract_features(model, loader, precision=precision)
    expected = TF32_ON if precision == "tf32" else STRICT
    assert len(seen) == 2 + 1 + 1 + 2 and all(flags == expected for flags in seen), seen
    assert precision_flags() == before


def test_benchmark_variants_name_loop_precision_compile_and_component():
    from benchmarks.train import CPU_VARIANTS, CUDA_VARIANTS, Variant, parse_variant, summaries

    assert parse_variant("ours-tf32") == Variant("ours", "tf32", False, ("all",))
    assert parse_variant("plain-bf16-compile") == Variant("plain", "bf16", True, ("all",))
    assert parse_variant("ours-ln1") == Variant("ours", "fp32", False, ("ln1",))  # the old short name
    assert parse_variant("ours-fp16-compile-attn") == Variant("ours", "fp16", True, ("mha",))
    for bad in ("mine-fp32", "ours-fp8", "ours-bf16-ln1-mha", "ours-compile-xx"):
        with pytest.raises(ConfigError, match=f"variants: '{bad}' is not <ours|plain>-<precision>"):
            parse_variant(bad)
    assert all(parse_variant(v) for v in CPU_VARIANTS + CUDA_VARIANTS)
    lines = summaries({"ours-fp32": 2.0, "ours-tf32": 1.0, "plain-fp32": 2.0}, 1.0, 1.0)
    assert any(line.startswith("tf32 speed-up over fp32 (ours):") and line.endswith("2.00x") for line in lines)
    assert "overhead of the app's step vs plain loop, fp32: +0.0%" in lines
