"""build_model's head comes from the weights, for every source × num_classes (None / 0 / k) (issue 10, item 1).

Each case is compared with a direct computation on the same input: the timm model that wrote the
weights, or, for Hugging Face directories, the transformers model's own logits / CLS features.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from vitef.errors import ModelError
from vitef.models import build_model, save_timm_safetensors

transformers = pytest.importorskip("transformers")

ARCH = {"name": "vit_tiny_patch16_224", "img_size": 16, "overrides": {"patch_size": 8, "depth": 2, "embed_dim": 32}}
OV = {**ARCH["overrides"], "num_heads": 2}
HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=16)
HF["patch_size"] = 8
FRESH = 3  # a fresh head's classes, different from every checkpoint's


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _timm(classes: int, seed: int):
    torch.manual_seed(seed)
    return build_model(ARCH["name"], pretrained=False, num_classes=classes, img_size=16, **OV).eval()


def _timm_ref(model):
    """(logits or None without a head, pre-logits features) of a timm model."""
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(_x()), pre_logits=True)
        return (model(_x()) if model.num_classes else None), feats


def _card(tmp_path, model, name="card", sha=True):
    path = tmp_path / f"{name}.safetensors"
    save_timm_safetensors(model, path)
    card = {"model": {**ARCH, "overrides": OV}}
    if sha:
        card["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def _hf(tmp_path, kind: str):
    """A transformers ViT saved by transformers itself: with 5 labels, default labels (none written), no head."""
    torch.manual_seed(0)
    labels = {"labels5": {"num_labels": 5}, "default": {}, "vitmodel": {"num_labels": 5}}[kind]
    cls = transformers.ViTModel if kind == "vitmodel" else transformers.ViTForImageClassification
    model = cls(transformers.ViTConfig(**HF, **labels)).eval()
    with torch.no_grad():  # random-init LayerNorms are the identity: perturb them so loading them shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / kind)
    config = json.loads((tmp_path / kind / "config.json").read_text())
    # The case of the issue: transformers 5 writes no id2label for its default two labels.
    assert ("id2label" in config) == (kind != "default")
    with torch.no_grad():
        if kind == "vitmodel":
            return tmp_path / kind, None, model(pixel_values=_x()).last_hidden_state[:, 0]
        out = model(pixel_values=_x(), output_hidden_states=False)
        feats = model.vit(pixel_values=_x()).last_hidden_state[:, 0]
        return tmp_path / kind, out.logits, feats


def _source(tmp_path, source: str):
    """(name, pretrained, build kwargs, reference logits or None, reference features, atol) for one source."""
    if source == "timm name + weights":
        logits, feats = _timm_ref(_timm(5, 0))
        path = tmp_path / "w.safetensors"
        save_timm_safetensors(_timm(5, 0), path)
        return ARCH["name"], str(path), {"img_size": 16, **OV}, logits, feats, 1e-6
    if source == "card file":
        model = _timm(4, 0)
        return str(_card(tmp_path, model)), True, {}, *_timm_ref(model), 1e-6
    if source == "card file + run weights":
        # The README workflow: architecture from the card (4-class pretraining head), weights of a 5-class run.
        card = _card(tmp_path, _timm(4, 0))
        run = _timm(5, 1)
        save_timm_safetensors(run, tmp_path / "best.safetensors")
        return str(card), str(tmp_path / "best.safetensors"), {}, *_timm_ref(run), 1e-6
    if source == "card file + headless weights":
        card = _card(tmp_path, _timm(4, 0))
        run = _timm(0, 1)
        save_timm_safetensors(run, tmp_path / "feat.safetensors")
        return str(card), str(tmp_path / "feat.safetensors"), {}, *_timm_ref(run), 1e-6
    if source.startswith("hf "):
        path, logits, feats = _hf(tmp_path, source.split()[1])
        return str(path), True, {}, logits, feats, 1e-4
    raise AssertionError(source)


SOURCES = [
    "timm name + weights",
    "card file",
    "card file + run weights",
    "card file + headless weights",
    "hf labels5",
    "hf default",
    "hf vitmodel",
]


@pytest.mark.parametrize("num_classes", [None, 0, FRESH])
@pytest.mark.parametrize("source", SOURCES)
def test_head_from_weights_matches_direct_computation(tmp_path, source, num_classes):
    name, pretrained, kwargs, logits, feats, atol = _source(tmp_path, source)
    torch.manual_seed(123)
    model = build_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        out = model(_x())
        own_feats = model.forward_head(model.forward_features(_x()), pre_logits=True)
    # The trunk is always the checkpoint's.
    assert (own_feats - feats).abs().max().item() <= atol
    if num_classes is None and logits is not None:
        assert out.shape == logits.shape
        assert (out - logits).abs().max().item() <= atol  # the checkpoint's own head
    elif num_classes is None or num_classes == 0:
        assert model.num_classes == 0 and out.shape == feats.shape  # no head: pre-logits features
        assert (out - feats).abs().max().item() <= atol
    else:
        # A fresh k-class head (timm's init) on the checkpoint's features.
        assert out.shape == (2, FRESH)
        direct = feats @ model.head.weight.T + model.head.bias
        assert (out - direct).abs().max().item() <= atol


def test_hf_vitmodel_dir_with_run_weights_keeps_the_runs_head(tmp_path):
    """A run finetuned from a headless transformers directory: its config names the dir, its weights a 5-class head."""
    path, _, _ = _hf(tmp_path, "vitmodel")
    run = _timm(5, 1)  # same shapes as the transformers model
    save_timm_safetensors(run, tmp_path / "best.safetensors")
    model = build_model(str(path), pretrained=str(tmp_path / "best.safetensors")).eval()
    for m in run.modules():  # the direct computation with the transformers architecture's LayerNorm eps
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-12
    with torch.no_grad():
        assert (model(_x()) - run(_x())).abs().max().item() <= 1e-6
    assert model.num_classes == 5 and model.blocks[0].norm1.eps == 1e-12  # the transformers architecture
    assert build_model(str(path), pretrained=str(tmp_path / "best.safetensors"), num_classes=0).num_classes == 0


def test_fresh_head_of_the_checkpoints_size_is_reinitialised(tmp_path):
    model = _timm(5, 0)
    card = _card(tmp_path, model)
    torch.manual_seed(7)
    fresh = build_model(str(card), num_classes=5)
    assert fresh.num_classes == 5 and not torch.equal(fresh.head.weight, model.head.weight)
    assert torch.equal(fresh.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


@pytest.mark.parametrize(
    ("kind", "expected"), [("labels5", 5), ("default", 2), ("vitmodel", 0)], ids=["id2label", "default", "vitmodel"]
)
def test_random_init_head_as_the_source_describes_it(tmp_path, kind, expected):
    path, _, _ = _hf(tmp_path, kind)
    assert build_model(str(path), pretrained=False).num_classes == expected
    assert build_model(str(path), pretrained=False, num_classes=0).num_classes == 0
    assert build_model(str(path), pretrained=False, num_classes=FRESH).num_classes == FRESH


def test_random_init_of_a_card_file_keeps_its_head_size_and_timm_keeps_its_default(tmp_path):
    card = _card(tmp_path, _timm(4, 0))
    assert build_model(str(card), pretrained=False).num_classes == 4
    assert build_model(ARCH["name"], pretrained=False, img_size=16, **OV).num_classes == 1000
    assert build_model(ARCH["name"], pretrained=False, num_classes=0, img_size=16, **OV).num_classes == 0


def test_negative_num_classes():
    with pytest.raises(ModelError, match="num_classes=-1 must be >= 0"):
        build_model(ARCH["name"], pretrained=False, num_classes=-1)


# -- the sha256 a card records is checked (issue 10, item 9) -------------------------------------------------


def test_card_sha256_is_checked(tmp_path):
    model = _timm(4, 0)
    card = _card(tmp_path, model)
    build_model(str(card))  # matches
    # Same size, one tensor changed: a damaged or swapped file.
    save_timm_safetensors(_timm(4, 1), card)
    with pytest.raises(ModelError) as e:
        build_model(str(card))
    msg = str(e.value)
    assert f"'{card}' does not match the sha256 recorded in its card '{card.with_suffix('.json')}'" in msg
    assert hashlib.sha256(card.read_bytes()).hexdigest() in msg and "re-export" in msg
    # Random init does not read the weights, so it does not check them; other weights replace them.
    assert build_model(str(card), pretrained=False).num_classes == 4
    save_timm_safetensors(model, tmp_path / "run.safetensors")
    build_model(str(card), pretrained=str(tmp_path / "run.safetensors"))


def test_card_without_sha256_loads(tmp_path):
    model = _timm(4, 0)
    card = _card(tmp_path, model, sha=False)
    with torch.no_grad():
        assert torch.equal(build_model(str(card)).eval()(_x()), model(_x()))
