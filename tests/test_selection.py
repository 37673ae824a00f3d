"""vitef.selection: budgets, the pick, and every criterion against a direct computation on a tiny ViT."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import random_vit

from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.models.components import block_module, count_units, embed, unit_of
from vitef.selection import (
    CRITERIA,
    SelectConfig,
    Selection,
    backbone_parameters,
    budget_label,
    budget_limit,
    candidate_units,
    compact_units,
    fresh_head,
    gradient_norms,
    pick_units,
    ranking,
    read_selection,
    score_units,
    select,
    write_selection,
)


def _model(seed: int = 0):
    # Noisy LayerNorms: timm's γ = 1, β = 0 would hide whether the LN scores read them.
    return random_vit(seed, norm_noise=0.3).eval()


def _batches(sizes=(5, 3), classes=3, seed=1):
    """Labelled batches of unequal sizes (the gradient mean must weight them per image)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def _cfg(criterion: str, **over) -> SelectConfig:
    return build_config(SelectConfig, {"criterion": criterion, **over})


# ---------------------------------------------------------------------------------------------------
# Budgets and the pick
# ---------------------------------------------------------------------------------------------------


def test_budgets_are_fractions_or_unit_counts():
    assert budget_limit(0.1, 1000) == ("params", 100)
    assert budget_limit(0.1234, 1000) == ("params", 123)  # floor: never above the fraction
    assert budget_limit(3, 1000) == ("units", 3)
    assert budget_limit(1.0, 1000) == ("units", 1)
    assert budget_label(0.1) == "10%" and budget_label(0.005) == "0.5%" and budget_label(3) == "3 units"
    for bad, match in [(0, "must be a fraction"), (-0.1, "must be a fraction"), (math.nan, "must be a fraction"),
                       (2.5, r"neither a fraction.*budget=2 units or budget=0.025")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            budget_limit(bad, 1000)
    with pytest.raises(ConfigError, match="budget=2.5"):
        _cfg("random", budget=2.5)


def test_pick_takes_the_best_units_that_fit_and_never_exceeds_the_budget():
    sizes = {"a": 50, "b": 30, "c": 30, "d": 10, "e": 10}
    scores = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5}
    # 70 of 100: a (50) fits, b and c (30) do not, d and e (10) fill the rest.
    pick = pick_units(scores, sizes, 0.7, 100)
    assert pick.units == ["a", "d", "e"] and pick.params == 70 and pick.skipped == ["b", "c"]
    assert pick.kind == "params" and pick.limit == 70
    # fill=false stops at the first unit that does not fit.
    stop = pick_units(scores, sizes, 0.7, 100, fill=False)
    assert stop.units == ["a"] and stop.skipped == ["b"]
    # A count budget takes the top units whatever their size.
    assert pick_units(scores, sizes, 2, 100).units == ["a", "b"]
    for budget in (0.1, 0.25, 0.33, 0.9):
        assert pick_units(scores, sizes, budget, 100).params <= budget * 100
    with pytest.raises(ConfigError, match=r"fewer than the smallest unit \(10\): raise budget to at least 0.1"):
        pick_units(scores, sizes, 0.05, 100)
    with pytest.raises(ConfigError, match=r"first-ranked unit a \(50\).*fill=true"):
        pick_units(scores, sizes, 0.3, 100, fill=False)
    with pytest.raises(ConfigError, match="budget=6 units, but the model has 5"):
        pick_units(scores, sizes, 6, 100)


def test_ties_keep_unit_order_and_nan_ranks_last():
    units = ["ln1.0", "mha.0", "ln1.1", "mha.1"]
    scores = {"ln1.0": 1.0, "mha.0": math.nan, "ln1.1": 2.0, "mha.1": 1.0}
    assert ranking(scores, units) == ["ln1.1", "ln1.0", "mha.1", "mha.0"]
    assert ranking({u: 0.0 for u in units}, units) == units
    assert ranking({**scores, "mha.0": math.inf}, units)[0] == "mha.0"


def test_compact_units():
    assert compact_units(["mha.3", "mha.4", "mha.5", "fc1.0", "ln1.2", "mha.0"], depth=6) == [
        "ln1.2",
        "mha.0",
        "mha.3-5",
        "fc1.0",
    ]
    assert compact_units([f"ln2.{i}" for i in range(4)] + ["fc2.1", "fc2.3"], depth=4) == ["ln2", "fc2.1", "fc2.3"]


def test_candidates_and_backbone():
    model = _model()
    units = candidate_units(model)
    assert units == [f"{c}.{i}" for i in range(2) for c in ("ln1", "mha", "ln2", "fc1", "fc2")]
    counts = count_units(model)
    assert backbone_parameters(model) == sum(counts.values()) - counts["head"]
    assert backbone_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if unit_of(n) != "head")


# ---------------------------------------------------------------------------------------------------
# Criteria against direct computations
# ---------------------------------------------------------------------------------------------------


def test_plasticity_scores_are_the_mean_ratio_per_block_and_component():
    model = _model()
    torch.manual_seed(3)
    source = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    target = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    scores, _ = score_units(model, _cfg("plasticity", batches=2), source=source, target=target)
    # Direct: every component of every block on the embedded pair; FC2 on [e, 0]; ratio of Frobenius norms.
    x, y = torch.cat(source), torch.cat([t[0] for t in target[:2]])  # cfg.batches=2 batches of each stream
    with torch.no_grad():
        ex, ey = embed(model, x), embed(model, y)
        den = (ex - ey).flatten(1).norm(dim=1)
        for layer in range(2):
            for comp in ("ln1", "mha", "ln2", "fc1", "fc2"):
                f = block_module(model, layer, comp)
                if comp == "fc2":
                    pad = f.in_features - ex.shape[-1]
                    fx, fy = f(F.pad(ex, (0, pad))), f(F.pad(ey, (0, pad)))
                else:
                    fx, fy = f(ex), f(ey)
                expected = ((fx - fy).flatten(1).norm(dim=1) / den).mean()
                assert scores[f"{comp}.{layer}"] == pytest.approx(float(expected), rel=1e-4), (comp, layer)


def test_hidden_mode_scores_differ_from_embedding():
    model = _model()
    torch.manual_seed(3)
    source, target = [torch.randn(4, 3, 16, 16)], [torch.randn(4, 3, 16, 16)]
    emb, _ = score_units(model, _cfg("plasticity"), source=source, target=target)
    hid, _ = score_units(model, _cfg("plasticity", mode="hidden"), source=source, target=target)
    assert emb["ln1.0"] == pytest.approx(hid["ln1.0"], rel=1e-5)  # block 0's LN1 input is e(x) in both modes
    assert emb["mha.1"] != pytest.approx(hid["mha.1"], rel=1e-3)


def _direct_gradients(model, batches, classes, seed):
    """The mean cross-entropy over every image at once, through a copy with the seeded fresh head."""
    m = copy.deepcopy(model).eval()
    m.head = fresh_head(m.head.in_features, classes, seed)
    for p in m.parameters():
        p.requires_grad_(True)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    F.cross_entropy(m(images), labels).backward()
    g2, t2 = {}, {}
    for name, p in m.named_parameters():
        u = unit_of(name)
        g2[u] = g2.get(u, 0.0) + float(p.grad.double().pow(2).sum())
        t2[u] = t2.get(u, 0.0) + float(p.detach().double().pow(2).sum())
    return {u: math.sqrt(v) for u, v in g2.items()}, {u: math.sqrt(v) for u, v in t2.items()}


def test_gradient_criteria_equal_a_direct_computation():
    model = _model()
    batches = _batches()
    g, t = _direct_gradients(model, batches, classes=4, seed=7)
    raw, details = score_units(model, _cfg("grad_norm", seed=7), target=batches, num_classes=4)
    rgn, _ = score_units(model, _cfg("rgn", seed=7), target=batches, num_classes=4)
    assert set(raw) == set(candidate_units(model))
    for u in raw:
        assert raw[u] == pytest.approx(g[u], rel=1e-4), u
        assert details["param_norm"][u] == pytest.approx(t[u], rel=1e-9), u
        assert rgn[u] == pytest.approx(g[u] / t[u], rel=1e-4), u
    # The seed draws the head: another seed, other gradients; the same seed, the same ones.
    again, _ = score_units(model, _cfg("grad_norm", seed=7), target=batches, num_classes=4)
    other, _ = score_units(model, _cfg("grad_norm", seed=8), target=batches, num_classes=4)
    assert again == raw and other["fc2.1"] != pytest.approx(raw["fc2.1"], rel=1e-3)
    # cfg.batches caps the batches read.
    first, _ = score_units(model, _cfg("grad_norm", seed=7, batches=1), target=batches, num_classes=4)
    g1, _ = _direct_gradients(model, batches[:1], classes=4, seed=7)
    assert first["mha.0"] == pytest.approx(g1["mha.0"], rel=1e-4)


def test_gradient_criteria_leave_the_model_as_it_was():
    model = _model()
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("blocks.0."))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.head
    rng = torch.get_rng_state()
    gradient_norms(model, _batches(), num_classes=4, seed=0)
    assert model.head is head and model.training
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("blocks.0.")
    }
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # the head is drawn from its own generator
    with pytest.raises(ConfigError, match=r"labelled batches"):
        gradient_norms(model, [torch.randn(2, 3, 16, 16)], num_classes=4)


def test_fresh_head_is_pytorchs_default_distribution_and_seeded():
    a, b, c = fresh_head(64, 5, 0), fresh_head(64, 5, 0), fresh_head(64, 5, 1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and not torch.equal(a.weight, c.weight)
    assert a.weight.abs().max() <= 1 / 8 and a.bias.abs().max() <= 1 / 8


def test_bound_scores_equal_a_direct_computation():
    model = _model()
    batches = _batches((4, 4))
    scores, _ = score_units(model, _cfg("bound", sigma=0.5), target=batches)
    with torch.no_grad():
        e = embed(model, torch.cat([b[0] for b in batches])).double()
    r = float(e.pow(2).sum(-1).mean(-1).sqrt().mean())  # mean over images of the RMS token norm
    n = e.shape[1]
    for layer in range(2):
        blk = model.blocks[layer]
        assert scores[f"ln1.{layer}"] == pytest.approx(float(blk.norm1.weight.detach().abs().max()) / 0.5)
        assert scores[f"ln2.{layer}"] == pytest.approx(float(blk.norm2.weight.detach().abs().max()) / 0.5)
        for comp, lin in (("fc1", blk.mlp.fc1), ("fc2", blk.mlp.fc2)):
            s = torch.linalg.svdvals(lin.weight.detach().double())[0]
            assert scores[f"{comp}.{layer}"] == pytest.approx(float(s)), comp
        heads, d = blk.attn.num_heads, blk.attn.qkv.in_features
        dh = d // heads
        w = blk.attn.qkv.weight.detach().double()
        wo = blk.attn.proj.weight.detach().double()
        total = 0.0
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            q, k, v = w[:d][rows], w[d : 2 * d][rows], w[2 * d :][rows]
            a = torch.linalg.svdvals(q.T @ k)[0] / math.sqrt(dh)
            o = torch.linalg.svdvals(wo[:, rows])[0]
            vn = torch.linalg.svdvals(v)[0]
            total += float(o * vn * torch.sqrt(3 * n + (12 * n + 3) * r**4 * a**2))
        assert scores[f"mha.{layer}"] == pytest.approx(total, rel=1e-6)


def test_controls():
    model = _model()
    units = candidate_units(model)
    rand, _ = score_units(model, _cfg("random", seed=5))
    assert list(rand.values()) == pytest.approx(list(np.random.default_rng(5).random(len(units))))
    assert score_units(model, _cfg("random", seed=5))[0] == rand
    assert score_units(model, _cfg("random", seed=6))[0] != rand
    paper, _ = score_units(model, _cfg("paper"))
    assert paper == {u: {"mha": 5, "fc1": 4, "fc2": 3, "ln2": 2, "ln1": 1}[u.split(".")[0]] for u in units}
    # Paper order, ties by block: MHA of every block before any FC1.
    sel = select(model, _cfg("paper", budget=3))
    assert sel.picked == ["mha.0", "mha.1", "fc1.0"] and sel.trainable == ["mha", "fc1.0"]


# ---------------------------------------------------------------------------------------------------
# Selection, config and files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_scores_every_unit_within_a_ten_percent_budget(criterion):
    model = _model()
    torch.manual_seed(0)
    source = [torch.randn(4, 3, 16, 16)]
    sel = select(model, _cfg(criterion, budget=0.1), source=source, target=_batches(), num_classes=3)
    assert sel.units == candidate_units(model) and set(sel.scores) == set(sel.units)
    assert all(not math.isnan(s) for s in sel.scores.values())
    assert 0 < sel.picked_params <= 0.1 * backbone_parameters(model) and sel.picked
    again = select(model, _cfg(criterion, budget=0.1), source=source, target=_batches(), num_classes=3)
    assert again.scores == sel.scores and again.picked == sel.picked  # deterministic under the seed


def test_selection_json_round_trip(tmp_path):
    model = _model()
    sel = select(model, _cfg("rgn", budget=0.2), target=_batches(), num_classes=3)
    sel.meta = {"model": "tiny", "dataset": "x"}
    sel.scores["ln1.0"] = math.inf  # non-finite scores survive as strings
    write_selection(tmp_path, sel)
    back = read_selection(tmp_path)
    assert back.scores == sel.scores and back.picked == sel.picked and back.params == sel.params
    assert back.details == sel.details and back.meta == sel.meta and back.trainable == sel.trainable
    assert isinstance(back, Selection) and back.to_json() == sel.to_json()
    table = back.table()
    assert list(table.columns[:7]) == ["unit", "layer", "component", "params", "score", "rank", "picked"]
    assert table["picked"].sum() == len(sel.picked) and sorted(table["rank"]) == list(range(1, len(table) + 1))
    with pytest.raises(ConfigError, match="does not exist: write it with `python -m apps.vit.select`"):
        read_selection(tmp_path / "nowhere")
    (tmp_path / "selection.json").write_text('{"units": 3}')
    with pytest.raises(ConfigError, match="is not a selection"):
        read_selection(tmp_path)


def test_config_validation():
    assert SelectConfig().enabled is False
    cfg = _cfg("Auto-RGN", source="digits_subset-01234")
    assert cfg.criterion == "rgn" and cfg.enabled and cfg.label() == "rgn"
    assert _cfg("plasticity", mode="hidden").label() == "plasticity-hidden"
    for over, match in [
        ({"criterion": "fisher"}, r"criterion='fisher' is unknown: choose one of plasticity, rgn"),
        ({"criterion": "plasticity", "mode": "pairs"}, "not a plasticity mode"),
        ({"criterion": "rgn", "batches": 0}, "batches=0 must be >= 1"),
        ({"criterion": "bound", "sigma": 0}, "sigma=0"),
        ({"criterion": "plasticity", "source": ""}, "needs source="),
        ({"criterion": "rgn", "source": "nope"}, "source: "),
        ({"criterion": "rgn", "precision": "fp8"}, "fp8"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config(SelectConfig, over)
    model = _model()
    with pytest.raises(ConfigError, match="reads target batches: pass target="):
        score_units(model, _cfg("rgn"))
    with pytest.raises(ConfigError, match="reads source images"):
        score_units(model, _cfg("plasticity"), target=_batches())


def test_an_impossible_budget_fails_before_scoring():
    from vitef.selection import check_budget

    model = _model()
    check_budget(model, 0.1)
    with pytest.raises(ConfigError, match="fewer than the smallest unit"):
        check_budget(model, 0.0001)
    with pytest.raises(ConfigError, match="budget=11 units, but the model has 10"):
        select(model, _cfg("rgn", budget=11))  # no target given: the budget error comes first


FAMILIES = {  # small random-init Eva (DINOv3, EVA-02 with SwiGLU) and Beit backbones at 16 px
    "dinov3": ("vit_small_patch16_dinov3", dict(depth=2, embed_dim=48, num_heads=2)),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=2, patch_size=8)),
    "beit": ("beit_base_patch16_224", dict(depth=2, embed_dim=48, num_heads=2, patch_size=8)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("criterion", ["plasticity", "bound", "rgn"])
def test_every_criterion_scores_every_unit_of_eva_and_beit(family, criterion):
    from vitef.models import build_model

    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, num_classes=3, img_size=16, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = [torch.randn(4, 3, 16, 16)]
    sel = select(model, _cfg(criterion, budget=0.2), source=source, target=_batches(), num_classes=3)
    assert sel.units == candidate_units(model) and len(sel.units) == 2 * 5
    assert all(math.isfinite(s) for s in sel.scores.values())
    assert 0 < sel.picked_params <= 0.2 * backbone_parameters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # scoring leaves the weights


def test_bound_criterion_with_query_biases_is_larger_for_mha_only():
    from vitef.models import build_model
    from vitef.selection import bound_scores

    name, kwargs = FAMILIES["eva02"]
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, num_classes=3, img_size=16, **kwargs).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_bias.normal_(0, 0.5)  # pretrained EVA-02 has non-zero query biases; timm starts at 0
    target = _batches()
    plain = bound_scores(model, target)
    biased = bound_scores(model, target, mha_bias=True)
    assert plain.keys() == biased.keys()
    for unit, value in plain.items():
        if unit.startswith("mha."):
            assert biased[unit] > value
        else:
            assert biased[unit] == value
    assert build_config(SelectConfig, {"criterion": "bound", "mha_bias": True}).mha_bias
