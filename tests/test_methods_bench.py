"""benchmarks.methods: variant parsing, each variant trains exactly what apps.vit.train trains for its method (same
names, same starting weights, frozen ones untouched by a step), the table's exact counts and its baseline row.
No timing is asserted (performance is not tested here)."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import TINY_ARCH, TINY_MODEL, tiny_train

from apps.vit import train as train_app
from benchmarks import methods as bench
from vitef.config import build_config
from vitef.errors import ConfigError

# The tiny ViT of the app tests: 2 blocks, 32 wide, 8-px patches on 16-px images; 5 classes as digits_subset-56789.
TINY = {"model": TINY_MODEL["name"], "overrides": TINY_ARCH, "img_size": TINY_MODEL["img_size"], "num_classes": 5,
        "batch_size": 4, "steps": 1, "warmup": 0, "seed": 0}  # fmt: skip
TINY_ARGV = [f"{k}={v}" for k, v in TINY.items() if k != "overrides"] + [
    "overrides={" + ", ".join(f"{k}: {v}" for k, v in TINY_ARCH.items()) + "}"
]
# The apps.vit.train options of each variant.
APP_OPTIONS = {
    "full": {"method": "full", "trainable": ["all"]},
    "bitfit": {"method": "bitfit", "trainable": ["all"]},
    "lora": {"method": "lora", "trainable": ["all"]},
    "dora": {"method": "dora", "trainable": ["all"]},
    "ln": {"method": "full", "trainable": ["ln1", "ln2"]},
    "mha": {"method": "full", "trainable": ["mha"]},
    "select10": {"method": "full", "trainable": ["all"], "select": {"criterion": "random", "budget": 0.1}},
}
# Parameters of the tiny model, worked out by hand: embedding (patch projection 3·8·8·32 + 32, class token 32,
# positions 5·32), per block ln1 64, mha 32·96 + 96 + 32·32 + 32, ln2 64, fc1 32·128 + 128, fc2 128·32 + 32,
# head (final norm 64 + linear 32·5 + 5).
EMB, LN, MHA, FC1, FC2, HEAD = 6176 + 32 + 160, 64, 4224, 4224, 4128, 229
BACKBONE = EMB + 2 * (2 * LN + MHA + FC1 + FC2)  # 31,776
LORA = 2 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # rank 8: B·A on qkv, proj, fc1, fc2 of 2 blocks
MAGNITUDES = 2 * (96 + 32 + 128 + 32)  # DoRA: one per output row of each adapted module


def tiny_cfg(**over) -> bench.MethodsBenchConfig:
    return build_config(bench.MethodsBenchConfig, TINY, over)


def test_variants_parse_with_the_baseline_first_and_errors_name_the_choices():
    assert bench.parse_variants(["lora", "DoRA"]) == ["full", "lora", "dora"]
    assert bench.parse_variants(["mha", "full"]) == ["full", "mha"]
    assert tiny_cfg().variants == list(bench.VARIANTS) == list(APP_OPTIONS)
    choices = "choose among full, bitfit, lora, dora, ln, mha, select10"
    with pytest.raises(ConfigError, match=re.escape(f"variants: 'prompt', 'ia3' unknown: {choices}")):
        tiny_cfg(variants=["lora", "prompt", "ia3"])
    with pytest.raises(ConfigError, match=re.escape("variants=['lora', 'LoRA'] names a variant twice")):
        tiny_cfg(variants=["lora", "LoRA"])
    with pytest.raises(ConfigError, match=re.escape("variants=[] runs nothing: list some of full, bitfit")):
        tiny_cfg(variants=[])
    with pytest.raises(ConfigError, match="optimizer='adam' is unknown: choose sgd or adamw"):
        tiny_cfg(optimizer="adam")
    with pytest.raises(ConfigError, match="precision"):
        tiny_cfg(precision="fp8")


class Built(Exception):
    """Raised by the patched Stepper.build: the app's model is built and its method applied; stop there."""


def app_start(tmp_path, monkeypatch, name: str) -> list[tuple[str, torch.Tensor, bool]]:
    """What apps.vit.train trains for the variant's options: (name, value, requires_grad) of every parameter of
    the model it hands to its stepper, in order."""
    seen = []

    def capture(cls, model, plain, *args, **kwargs):
        seen.extend((n, p.detach().clone(), p.requires_grad) for n, p in plain.named_parameters())
        raise Built

    over = {"root": str(tmp_path / name), "log_dir": "run", **APP_OPTIONS[name]}
    cfg = build_config(train_app.TrainConfig, tiny_train(), over)
    with monkeypatch.context() as patched, pytest.raises(Built):  # the benchmark builds the same class's steppers
        patched.setattr(train_app.Stepper, "build", classmethod(capture))
        train_app.main(cfg)
    return seen


@pytest.mark.parametrize("name", list(APP_OPTIONS))
def test_each_variant_trains_what_the_app_trains_and_a_step_leaves_the_frozen_ones_bit_identical(
    tmp_path, monkeypatch, name
):
    app = app_start(tmp_path, monkeypatch, name)
    cfg = tiny_cfg()
    p = bench.prepare(name, cfg, torch.device("cpu"))
    ours = [(n, q.detach().clone(), q.requires_grad) for n, q in p.model.named_parameters()]
    # Same parameters (names, order), same starting values bit for bit (LoRA/DoRA: the same A draws), same flags.
    assert [n for n, _, _ in ours] == [n for n, _, _ in app]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(ours, app, strict=True))
    assert [g for _, _, g in ours] == [g for _, _, g in app]
    trainable = {n for n, _, g in ours if g}
    assert [n for n, _ in p.stepper.named_params] == [n for n, _, g in ours if g]

    bench.stepper_fn(p, cfg, torch.device("cpu"), {})()
    after = dict(p.model.named_parameters())
    changed = {n for n, before, _ in ours if not torch.equal(before, after[n])}
    # Every frozen parameter is bit-identical; every trainable one moved, except LoRA's A (B starts at zero, so A's
    # first gradient is zero).
    assert changed == {n for n in trainable if ".lora_A." not in n}
    head = {n for n in trainable if n.startswith(("norm.", "head."))}
    assert head == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    expected = {
        "full": {n for n, _, _ in ours},
        "bitfit": {n for n, _, _ in ours if n.endswith(".bias")},
        "lora": {n for n, _, _ in ours if ".lora_" in n},
        "dora": {n for n, _, _ in ours if ".lora_" in n},
        "ln": {n for n, _, _ in ours if ".norm1." in n or ".norm2." in n},
        "mha": {n for n, _, _ in ours if ".attn." in n},
        "select10": {n for n, _, _ in ours if ".norm1." in n or ".norm2." in n},  # the 10 % only fits LN units
    }[name]
    assert trainable == expected | head
    if name == "dora":
        assert sum(".lora_magnitude_vector." in n for n in trainable) == 8
    if name == "select10":
        assert p.trainable == ["ln1", "ln2"]


def test_row_bytes_are_exact_from_the_tensors():
    cfg = tiny_cfg(optimizer="adamw")
    for name, trained in (("mha", 2 * MHA + HEAD), ("dora", LORA + MAGNITUDES + HEAD)):
        p = bench.prepare(name, cfg, torch.device("cpu"))
        bench.stepper_fn(p, cfg, torch.device("cpu"), {})()
        row = bench.measure_row(p, 0.5)
        total = BACKBONE + HEAD + (LORA + MAGNITUDES if name == "dora" else 0)
        assert (row.trainable, row.weights, row.grads) == (trained, 4 * total, 4 * trained)
        # AdamW: two fp32 moments per trainable parameter, and a step count per parameter tensor.
        steps = sum(4 * (s["step"].numel()) for s in p.stepper.optimizer.state.values())
        assert row.optim == 2 * 4 * trained + steps
        assert row.backbone_share == (trained - HEAD) / BACKBONE


def test_cli_prints_one_row_per_variant_with_exact_counts_and_full_as_the_baseline(run_inprocess):
    r = run_inprocess("benchmarks.methods", *TINY_ARGV, "variants=[mha,lora,dora,bitfit]")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    assert lines[header].split()[:6] == ["variant", "ms/step", "images/s", "vs", "full", "trainable"]
    rows = [line.split() for line in lines[header + 1 : header + 6]]
    assert [row[0] for row in rows] == ["full", "mha", "lora", "dora", "bitfit"]
    assert rows[0][3] == "1.00"  # the baseline's ratio
    biases = 32 + 2 * (32 + 96 + 32 + 32 + 128 + 32)  # patch projection; per block norm1, qkv, proj, norm2, fc1, fc2
    counts = {"full": BACKBONE + HEAD, "mha": 2 * MHA + HEAD, "lora": LORA + HEAD, "dora": LORA + MAGNITUDES + HEAD,
              "bitfit": biases + HEAD}  # fmt: skip
    shares = {name: f"{100 * (n - HEAD) / BACKBONE:.2f}" for name, n in counts.items()}
    assert {row[0]: (row[4], row[5]) for row in rows} == {k: (f"{n:,}", shares[k]) for k, n in counts.items()}
    assert shares["full"] == "100.00"
    assert lines[header + 6].startswith("peak memory: ") and "process RSS" in lines[header + 6]
    assert re.fullmatch(r"dora vs lora: \d+\.\d\dx the time per step", lines[header + 7])
    assert "trainable=mha" in r.stdout and "DoRA r8 on qkv, proj, fc1, fc2" in r.stdout


def test_cli_help_and_a_bad_variant_exit_as_the_other_benchmarks(run_inprocess):
    r = run_inprocess("benchmarks.methods", "--help")
    assert r.returncode == 0 and "variants" in r.stdout and "select10" in r.stdout
    r = run_inprocess("benchmarks.methods", "variants=[lora,qlora]")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: variants: 'qlora' unknown: choose among full, bitfit, lora, dora, ln, mha, select10"
    )
