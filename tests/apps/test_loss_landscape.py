"""`python -m apps.plots.loss_landscape` end to end on a tiny random ViT and the bundled digits (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from vitef.config import cli_main

TINY = {
    "model": {
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "checkpoint": None,
        "img_size": 16,
        "overrides": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
    "dataset": "digits",
    "data": {"num_workers": 0, "digits_size": 16},
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


def test_end_to_end_writes_figure_arrays_and_summary(run_app, tiny_config, tmp_path):
    out = tmp_path / "fig"
    res = run_app("apps.plots.loss_landscape", f"config={tiny_config}", "component=fc1", "lr=0.05", f"out_dir={out}")
    assert res.returncode == 0, res.stderr
    for name in ("landscape.png", "landscape.pdf", "landscape.npz", "landscape.json", "config.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "landscape.pdf").read_bytes()[:5] == b"%PDF-"
    assert not list(out.glob(".*.tmp"))
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
    assert "FC1" in res.stdout and "landscape.png" in res.stdout

    # `plot` redraws from the saved arrays only.
    (out / "landscape.png").unlink()
    res = run_app("apps.plots.loss_landscape", "plot", f"config={tiny_config}", f"out_dir={out}")
    assert res.returncode == 0, res.stderr
    assert (out / "landscape.png").is_file()


def test_bad_component_exits_2(run_app, tiny_config, tmp_path):
    res = run_app("apps.plots.loss_landscape", f"config={tiny_config}", "component=mlp", f"out_dir={tmp_path / 'x'}")
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
        (["plot"], "landscape.npz does not exist"),
    ],
)
def test_bad_input_fails_clearly(capsys, tiny_config, tmp_path, args, message):
    # In process (same entry point as `python -m`), to keep the suite fast.
    from apps.plots.loss_landscape import LandscapeConfig, main

    with pytest.raises(SystemExit) as exc:
        cli_main(LandscapeConfig, main, argv=[*args, f"config={tiny_config}", f"out_dir={tmp_path / 'x'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not (tmp_path / "x" / "landscape.png").exists()


def test_help(capsys):
    from apps.plots.loss_landscape import LandscapeConfig, main

    with pytest.raises(SystemExit) as exc:
        cli_main(LandscapeConfig, main, argv=["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "grid_range" in out and "component" in out and "range" in out
