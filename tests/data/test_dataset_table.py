"""The dataset table is the one place a dataset is declared: names, messages, classes, loaders and results
tables all derive from it, so a dataset registered from this file alone works everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vitef import results as R
from vitef.data import (
    DatasetEntry,
    build_dataset,
    build_loader,
    canonical_name,
    dataset_entries,
    num_classes,
    parse_name,
    register_dataset,
    unregister_dataset,
    valid_names,
)
from vitef.data.base import ArraySource, three_way_split
from vitef.data.table import split_table
from vitef.errors import DataError

N_IMAGES = 60


def _tiny_pool(n_classes: int) -> ArraySource:
    """``N_IMAGES`` 6x6 RGB images whose pixels encode their label (generated, nothing on disk)."""
    labels = np.arange(N_IMAGES) % n_classes
    images = np.repeat((40 * labels).astype(np.uint8)[:, None, None, None], 3, axis=3)
    return ArraySource(np.broadcast_to(images, (N_IMAGES, 6, 6, 3)).copy(), labels)


def _load_tiny(spec, split, *, root, seed, download):
    k = int(spec.variant) if spec.variant else 4
    return _tiny_pool(k), three_way_split(N_IMAGES, split), k


def _parse_k(name: str, arg: str) -> dict:
    if not arg.isdigit() or not 2 <= int(arg) <= 5:
        raise DataError(f"dataset name {name!r}: write tinyk-<2..5>")
    return {"variant": str(int(arg)), "canonical": str(int(arg))}


@pytest.fixture
def tiny():
    """Two entries registered for one test: ``tinyset`` (plain, alias ``tiny_set``) and ``tinyk-<k>``."""
    plain = DatasetEntry(
        key="tinyset",
        load=_load_tiny,
        classes=4,
        splits="fixed seed-42 80/20 splits of 60 generated images.",
        label="Tiny",
        order=2.5,  # between CIFAR-10-C (2) and DomainNet (3)
        aliases=("tiny_set",),
        examples=("tinyset",),
    )
    with_arg = DatasetEntry(
        key="tinyk",
        load=_load_tiny,
        classes=lambda spec, root: int(spec.variant),
        splits="as tinyset, with k classes.",
        label="TinyK",
        parse=_parse_k,
        usage="tinyk-<2..5>",
        examples=("tinyk-3",),
    )
    register_dataset(plain)
    register_dataset(with_arg)
    yield plain, with_arg
    unregister_dataset("tinyset")
    unregister_dataset("tinyk")


def test_registered_dataset_is_a_name(tiny):
    assert "tinyset" in valid_names() and "tinyk-<2..5>" in valid_names()
    assert valid_names()[-1].startswith("corrupt:")  # the wrapper stays last, after every entry
    assert parse_name("tinyset").kind == "tinyset"
    assert canonical_name("Tiny_Set") == "tinyset"  # alias and case
    assert canonical_name("tinyk-03") == "tinyk-3"
    spec = parse_name("corrupt:gaussian_noise-5:tinyk-2")
    assert spec.kind == "tinyk" and spec.applied == (("gaussian_noise", 5),)
    assert spec.canonical == "corrupt:gaussian_noise-5:tinyk-2"
    with pytest.raises(DataError, match=r"write tinyk-<2\.\.5>"):
        parse_name("tinyk-9")


def test_registered_dataset_in_errors(tiny):
    with pytest.raises(
        DataError, match=r"unknown dataset 'tinyste'\. Did you mean 'tinyset'\?.*tinyset;.*tinyk-<2\.\.5>"
    ):
        parse_name("tinyste")
    with pytest.raises(DataError, match=r"unknown dataset 'tinyk'\. Write tinyk-<2\.\.5>"):
        parse_name("tinyk")
    with pytest.raises(DataError, match="unknown dataset 'cifar11'.*tinyset"):
        parse_name("cifar11")


def test_registered_dataset_classes_and_loader(tiny):
    assert num_classes("tinyset") == 4 and num_classes("tinyk-3") == 3
    loader = build_loader("tinyk-3", "train", batch_size=8, size=6, normalize="none", device="cpu")
    assert loader.num_classes == 3
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 6, 6)
    np.testing.assert_allclose(x[:, 0, 0, 0].numpy(), (40 * y.numpy()) / 255, atol=1e-6)  # labels follow images
    sizes = [len(build_dataset("tinyset", s, size=6)) for s in ("train", "val", "test")]
    assert sizes == [38, 10, 12]


def test_registered_dataset_in_results_tables(tiny):
    names = ["pet", "tinyk-2", "domainnet-clipart", "tinyset", "cifar10_c-snow-5", "zzz", "cifar10"]
    order = R.order_datasets(names)
    assert order == ["cifar10", "cifar10_c-snow-5", "tinyset", "domainnet-clipart", "pet", "tinyk-2", "zzz"]
    assert R.dataset_label("tinyset") == "Tiny" and R.dataset_label("tinyk-2") == "TinyK 2"
    cells = pd.DataFrame({"dataset": ["tinyset", "cifar10"], "trainable": ["mha", "mha"], "mean": [0.5, 0.6]})
    assert R.order_datasets(cells["dataset"].unique()) == ["cifar10", "tinyset"]


def test_unregistered_dataset_is_gone(tiny):
    unregister_dataset("tinyset")
    try:
        with pytest.raises(DataError, match="unknown dataset 'tinyset'"):
            parse_name("tinyset")
        assert "tinyset" not in valid_names() and R.dataset_label("tinyset") == "tinyset"
    finally:
        register_dataset(tiny[0])


def test_register_rejects_clashes(tiny):
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(tiny[0])
    with pytest.raises(ValueError, match="order=2.5 is already the order of 'tinyset'"):
        register_dataset(DatasetEntry(key="other", load=_load_tiny, classes=2, splits="", order=2.5))
    with pytest.raises(ValueError, match="'tiny_set' already means dataset 'tinyset'"):
        register_dataset(DatasetEntry(key="other", load=_load_tiny, classes=2, splits="", aliases=("tiny_set",)))
    with pytest.raises(ValueError, match="lower case"):
        register_dataset(DatasetEntry(key="Bad-Name", load=_load_tiny, classes=2, splits=""))
    plain = DatasetEntry(key="tinyset", load=_load_tiny, classes=4, splits="", order=2.5)
    replaced = register_dataset(plain, replace=True)
    assert num_classes("tinyset") == 4 and replaced.aliases == ()
    with pytest.raises(DataError, match="unknown dataset 'tiny_set'"):
        parse_name("tiny_set")  # the replaced entry's alias went with it


def test_build_loader_passes_dataset_arguments_through():
    loader = build_loader("digits_subset-01", "test", batch_size=4, size=8, digits_size=8, normalize="none")
    assert next(iter(loader))[0].shape == (4, 3, 8, 8)
    with pytest.raises(TypeError, match="unknown keyword argument 'sise'. Did you mean 'size'"):
        build_loader("digits", "test", batch_size=4, sise=8)


# ---------------------------------------------------------------------------------------------------------
# The built-in table is consistent
# ---------------------------------------------------------------------------------------------------------

BUILTIN = [e for e in dataset_entries() if not e.key.startswith("tiny")]


@pytest.mark.parametrize("entry", BUILTIN, ids=lambda e: e.key)
def test_builtin_entry_is_consistent(entry):
    assert entry.examples, "every entry lists at least one valid name"
    for name in entry.examples:
        spec = parse_name(name)
        assert spec.kind == entry.key and spec.name == name
        canonical = canonical_name(name)
        assert canonical_name(canonical) == canonical  # canonical names are fixed points
        assert canonical.split(entry.sep, 1)[0] == entry.key
        if isinstance(entry.classes, int):
            assert num_classes(name) == entry.classes
    assert entry.written in valid_names()
    assert entry.splits and f"``{entry.written.partition(' (')[0]}``" in split_table()
    if entry.order is not None:
        assert entry.label and R.dataset_label(entry.examples[0]) != entry.examples[0]


def test_builtin_orders_are_unique_and_follow_the_paper():
    orders = [e.order for e in BUILTIN if e.order is not None]
    assert len(orders) == len(set(orders))
    paper = ["cifar10", "cifar100", "cifar10_c-contrast-5", "cifar10_c-snow-5", "domainnet-clipart",
             "domainnet-sketch", "flowers102", "pet"]  # fmt: skip
    assert R.order_datasets(reversed(paper)) == paper


def test_builtin_canonical_names():
    assert canonical_name("cifar10_c-snow-5") == "cifar10_c-corruption-snow-severity-5"
    assert canonical_name("digits_c-gaussian_noise-5") == "digits_c-corruption-gaussian_noise-severity-5"
    assert canonical_name("digits_subset-97865") == "digits_subset-56789"
    assert canonical_name("CIFAR100") == "cifar100" and canonical_name("domainnet-Sketch") == "domainnet-sketch"
    assert canonical_name("imagefolder:/Data/My-Set") == "imagefolder:/Data/My-Set"  # paths keep their case
    assert canonical_name("corrupt:snow-5:digits") == "corrupt:snow-5:digits"
