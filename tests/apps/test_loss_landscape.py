"""The loss landscape end to end on a tiny random ViT and the bundled digits (offline): `python -m
apps.vit.loss_landscape` computes the arrays, `python -m apps.plots.loss_landscape` draws them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import yaml
from tiny import TINY_ARCH, TINY_DATA, TINY_MODEL

from vitef.config import cli_main

# The tests' tiny model with 4 px patches (16 tokens): the landscape sees more than a class token and 4 patches.
TINY = {
    "model": {**TINY_MODEL, "checkpoint": None, "overrides": {**TINY_ARCH, "patch_size": 4}},
    "dataset": "digits",
    "data": TINY_DATA,
    "steps": 4,
    "batch_size": 8,
    "eval_images": 24,
    "grid_size": 5,
    "rate_grid_size": 4,
    "power_iters": 50,
    "progress": False,
    "device": "cpu",
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _draw(capsys, *argv) -> tuple[int, str, str]:
    """``python -m apps.plots.loss_landscape argv`` in process (the same entry point): exit code, stdout, stderr."""
    from apps.plots.loss_landscape import LandscapePlotConfig, main

    code = 0
    try:
        cli_main(LandscapePlotConfig, main, argv=list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_computes_arrays_then_draws_figure(run_app, tiny_config, tmp_path, capsys):
    out = tmp_path / "landscape"
    res = run_app("apps.vit.loss_landscape", f"config={tiny_config}", "component=fc1", "lr=0.05", f"out_dir={out}")
    assert res.returncode == 0, res.stderr
    for name in ("landscape.npz", "landscape.json", "config.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp"))  # computing draws nothing
    with np.load(out / "landscape.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    summary = json.loads((out / "landscape.json").read_text())
    meta = summary["summary"]
    assert summary["config"]["component"] == "fc1" and summary["config"]["optim"]["lr"] == 0.05
    assert arrays["loss"].shape == (5, 5) and np.all(np.isfinite(arrays["loss"]))
    assert arrays["trajectory"].shape == (5, 2)  # steps + 1 points
    np.testing.assert_allclose(arrays["trajectory"][-1], 0.0, atol=1e-6)
    # Odd grid: the centre is θ*, whose loss the summary reports separately.
    assert arrays["loss"][2, 2] == pytest.approx(meta["loss_at_theta_star"], rel=1e-5)
    # Trajectory scale: the trajectory fills 80% of the half-width.
    assert np.abs(arrays["trajectory"]).max() == pytest.approx(0.8 * 0.5, rel=1e-5)
    assert arrays["rate"].shape == (4, 4) and np.all(np.isfinite(arrays["rate"]))
    assert meta["sigma1"] >= meta["sigma2"] > 0 and meta["layer"] == 1
    # FC1 is linear: its rate along u is σ1 at every nonzero perturbation size.
    along_u = arrays["rate_along_u"]
    np.testing.assert_allclose(along_u[np.isfinite(along_u)], meta["sigma1"], rtol=1e-3)
    assert meta["num_parameters"] == 2 * (32 * 128 + 128)
    assert "FC1" in res.stdout and f"apps.plots.loss_landscape landscape_dir={out}" in res.stdout

    # The plot app reads the folder only and writes PNG + PDF where it is told.
    figs = tmp_path / "figs"
    code, stdout, err = _draw(capsys, f"landscape_dir={out}", f"out_dir={figs}")
    assert code == 0, err
    assert (figs / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (figs / "landscape.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in figs.iterdir()) == ["landscape.pdf", "landscape.png"]
    assert "landscape.png" in stdout

    # Defaults: <root>/landscapes/<component> is read and <root>/figures/loss_landscape/<component> written.
    root = tmp_path / "root"
    shutil.copytree(out, root / "landscapes" / "fc1")
    assert _draw(capsys, "component=fc1", f"root={root}")[0] == 0
    assert (root / "figures" / "loss_landscape" / "fc1" / "landscape.pdf").is_file()

    # A folder of before the split (arrays and figure together) is still redrawn by `plot out_dir=...`.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    assert _draw(capsys, "plot", "component=fc1", f"root={tmp_path / 'none'}", f"out_dir={old}")[0] == 0
    assert (old / "landscape.png").is_file() and not (tmp_path / "none").exists()


def test_plot_app_never_computes_and_says_what_to_run(capsys, tmp_path):
    # The command of before the split (compute + draw) fails with the compute command to run first.
    code, _, err = _draw(capsys, "component=mha", f"root={tmp_path}")
    assert code == 2 and "Traceback" not in err
    assert "landscapes/mha/landscape.npz does not exist" in err
    assert "python -m apps.vit.loss_landscape component=mha" in err
    for argv, needle in [
        (["steps=40"], "python -m apps.vit.loss_landscape steps=..."),
        (["lr=0.01"], "python -m apps.vit.loss_landscape lr=..."),
        (["command=run"], "python -m apps.vit.loss_landscape component=mha"),
        (["component=mlp"], "unknown component 'mlp'"),
    ]:
        code, _, err = _draw(capsys, *argv, f"root={tmp_path}")
        assert code == 2 and needle in err, (argv, err)
    assert not any(tmp_path.iterdir())


def test_plot_app_lists_every_compute_key():
    # The plot app cannot import apps.vit, so it keeps the compute app's keys as a list: keep it complete.
    from apps.plots.loss_landscape import COMPUTE_KEYS, LandscapePlotConfig
    from apps.vit.loss_landscape import LandscapeConfig

    plot_keys = {f.name for f in dataclasses.fields(LandscapePlotConfig)}
    compute_keys = {f.name for f in dataclasses.fields(LandscapeConfig)} | set(LandscapeConfig.ALIASES)
    assert set(COMPUTE_KEYS) == compute_keys - plot_keys


def test_bad_component_exits_2(run_inprocess, tiny_config, tmp_path):
    res = run_inprocess(
        "apps.vit.loss_landscape", f"config={tiny_config}", "component=mlp", f"out_dir={tmp_path / 'x'}"
    )
    assert res.returncode == 2
    assert "unknown component 'mlp'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["component=head"], "per-block component"),
        (["steps=1"], "steps=1 must be >= 2"),
        (["scale=log"], "scale='log' is unknown"),
        (["range=0"], "grid_range=0.0 must be > 0"),
        (["layer=7"], "layer=7 is out of range"),
        (["plot"], "only computes (command=run); draw with python -m apps.plots.loss_landscape landscape_dir="),
    ],
)
def test_bad_input_fails_clearly(capsys, tiny_config, tmp_path, args, message):
    # In process (same entry point as `python -m`), to keep the suite fast.
    from apps.vit.loss_landscape import LandscapeConfig, main

    with pytest.raises(SystemExit) as exc:
        cli_main(LandscapeConfig, main, argv=[*args, f"config={tiny_config}", f"out_dir={tmp_path / 'x'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not (tmp_path / "x" / "landscape.npz").exists()


def test_help(capsys):
    from apps.vit.loss_landscape import LandscapeConfig, main

    with pytest.raises(SystemExit) as exc:
        cli_main(LandscapeConfig, main, argv=["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "grid_range" in out and "component" in out and "range" in out
