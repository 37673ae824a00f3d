"""Low-data tasks ``fewshot-<k>:<dataset>`` (PROTOCOL.md §7, the authors' cifar100ld): k training images per class,
drawn after NumPy's seed 42 from the dataset's train pool, val from the rest, the dataset's test split."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
import yaml
from conftest import write_class_folders, write_pet
from tiny import tiny_train

from apps.vit import train as train_app
from vitef import results as R
from vitef.config import build_config
from vitef.data import build_dataset, canonical_name, num_classes, parse_name
from vitef.errors import ConfigError, DataError

FORM = "fewshot-<k>:<dataset>"


@pytest.fixture
def no_md5(monkeypatch):
    """Bypass only torchvision's md5 checks (generated files cannot match the official checksums)."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)


def write_cifar100(root: Path, per_class: int, n_test: int, seed: int = 0) -> np.ndarray:
    """torchvision's 'cifar-100-python/' (pickled dicts of (N, 3072) uint8 rows and fine labels), ``per_class``
    training images of each of the 100 classes in a shuffled order. The first two bytes of each row are the
    image's index (base 256), so a loaded image names its source. Returns the training labels."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)

    def dump(path: Path, labels: np.ndarray) -> None:
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        index = np.arange(len(labels))
        data[:, 0], data[:, 1] = index // 256, index % 256  # red channel, first two pixels of the top row
        path.write_bytes(pickle.dumps({"data": data, "fine_labels": labels.tolist()}))

    labels = rng.permutation(np.repeat(np.arange(100), per_class))
    dump(base / "train", labels)
    dump(base / "test", rng.integers(0, 100, n_test))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return labels


def source_index(dataset, i: int) -> int:
    img = dataset.raw_image(i)  # (3, 32, 32) uint8
    return int(img[0, 0, 0]) * 256 + int(img[0, 0, 1])


def expected_split(labels: np.ndarray, k: int, seed: int) -> tuple[list[int], list[int]]:
    """The protocol written out plainly: shuffle the pool by np.random.seed(42), keep the first k of each class,
    then the 20 % of an 80/20 cut of the rest by the run seed."""
    np.random.seed(42)
    order = np.random.permutation(len(labels))
    taken: dict[int, int] = {}
    train = []
    for i in order:
        if taken.get(labels[i], 0) < k:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            train.append(int(i))
    rest = np.array(sorted(set(range(len(labels))) - set(train)))
    perm = np.random.default_rng(seed).permutation(len(rest))
    return sorted(train), sorted(rest[perm[int(0.8 * len(rest)) :]].tolist())


def test_cifar100_ld_at_paper_scale_names_the_right_split_sizes(tmp_path, no_md5):
    # The authors' cifar100ld: 1,000 training images; the rest of the 50k train pool gives a 9,800 val (20 % of
    # 49,000), the official 10k test stays.
    labels = write_cifar100(tmp_path, per_class=500, n_test=10_000)
    kw = dict(root=tmp_path, size=32, normalize="none", seed=0)
    train, val, test = (build_dataset("fewshot-10:cifar100", s, **kw) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1_000, 9_800, 10_000)
    assert train.num_classes == val.num_classes == test.num_classes == 100
    np.testing.assert_array_equal(np.bincount(train.targets, minlength=100), np.full(100, 10))
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    np.testing.assert_array_equal(test.indices, np.arange(10_000))
    # Labels follow images: the image at each train position is the pool image its index names.
    for i in (0, 1, 500, 999):
        assert source_index(train, i) == train.indices[i] and train.targets[i] == labels[train.indices[i]]


def test_k_per_class_equals_the_protocol_and_is_seeded(tmp_path, no_md5):
    labels = write_cifar100(tmp_path, per_class=12, n_test=50)
    kw = dict(root=tmp_path, size=32, normalize="none")
    train, val, test = (build_dataset("fewshot-10:cifar100", s, seed=3, **kw) for s in ("train", "val", "test"))
    want_train, want_val = expected_split(labels, 10, seed=3)
    assert train.indices.tolist() == want_train and val.indices.tolist() == want_val
    assert (len(train), len(val), len(test)) == (1_000, 40, 50)  # 200 left: 160 / 40
    assert np.bincount(train.targets, minlength=100).tolist() == [10] * 100
    assert not set(want_train) & set(want_val)
    # Seeded: the same seed gives the same splits; another run seed keeps the k-shot train set (NumPy seed 42,
    # as the authors') and draws another val from the rest.
    again = build_dataset("fewshot-10:cifar100", "val", seed=3, **kw)
    np.testing.assert_array_equal(again.indices, val.indices)
    other_train, other_val = (build_dataset("fewshot-10:cifar100", s, seed=4, **kw) for s in ("train", "val"))
    np.testing.assert_array_equal(other_train.indices, train.indices)
    assert other_val.indices.tolist() == expected_split(labels, 10, seed=4)[1] != want_val
    # k = the smallest class takes every image of it: nothing of that class is left for val.
    full = build_dataset("fewshot-12:cifar100", "train", seed=3, **kw)
    assert len(full) == 1_200 and len(build_dataset("fewshot-12:cifar100", "val", seed=3, **kw)) == 0


def test_k_larger_than_the_smallest_class_is_refused(tmp_path, no_md5):
    write_cifar100(tmp_path, per_class=12, n_test=50)
    with pytest.raises(DataError, match=r"'fewshot-13:cifar100': k=13 is larger than the smallest class .*12 images.*"
                       r"fewshot-<k>:<dataset> with k <= 12"):  # fmt: skip
        build_dataset("fewshot-13:cifar100", "train", root=tmp_path, size=32)


def test_digits_subset_pool_and_test_split():
    kw = dict(size=16, digits_size=16, normalize="none", seed=0)
    train, val, test = (build_dataset("fewshot-10:digits_subset-56789", s, **kw) for s in ("train", "val", "test"))
    full = [build_dataset("digits_subset-56789", s, **kw) for s in ("train", "val", "test")]
    pool = len(full[0]) + len(full[1])  # the train pool: train + val of the full task (572 + 144)
    assert (len(train), len(val)) == (50, (pool - 50) - int(0.8 * (pool - 50)))
    assert np.bincount(train.targets).tolist() == [10] * 5 and train.num_classes == 5
    pool_indices = set(full[0].indices.tolist()) | set(full[1].indices.tolist())
    assert set(train.indices.tolist()) | set(val.indices.tolist()) <= pool_indices
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    np.testing.assert_array_equal(test.indices, full[2].indices)  # test unchanged


def test_names_classes_and_results_labels():
    assert canonical_name("fewshot-010:digits_subset-97865") == "fewshot-10:digits_subset-56789"
    assert canonical_name("FewShot-5:cifar10_c-snow-5") == "fewshot-5:cifar10_c-corruption-snow-severity-5"
    assert num_classes("fewshot-10:cifar100") == 100 and num_classes("fewshot-3:digits_subset-56789") == 5
    spec = parse_name("fewshot-10:corrupt:snow-5:digits")  # a corrupted dataset's low-data task
    assert spec.kind == "fewshot" and spec.applied == (("snow", 5),)
    assert R.dataset_label("fewshot-10:cifar100") == "CIFAR-100 10-shot"
    assert R.dataset_label("fewshot-10:cifar10_c-corruption-snow-severity-5") == "C10-C snow 10-shot"
    assert R.dataset_key("fewshot-10:cifar10_c-corruption-snow-severity-5") == "fewshot-10:cifar10_c-snow"
    names = ["pet", "fewshot-10:pet", "fewshot-10:cifar100", "fewshot-5:pet", "cifar100", "zzz", "cifar10"]
    assert R.order_datasets(names) == ["cifar10", "cifar100", "fewshot-10:cifar100", "pet", "fewshot-5:pet",
                                       "fewshot-10:pet", "zzz"]  # fmt: skip


BAD = [
    ("fewshot-0:cifar10", r"k=0: write fewshot-<k>:<dataset> with k >= 1"),
    ("fewshot-x:cifar10", r"write fewshot-<k>:<dataset>: k images per class"),
    ("fewshot-10:nope", r"write fewshot-<k>:<dataset> with <dataset> a dataset name: unknown dataset 'nope'"),
    ("fewshot-10", r"write fewshot-<k>:<dataset>: k images per class"),
    ("fewshot:10:cifar10", r"unknown dataset 'fewshot:10:cifar10'\. Write fewshot-<k>:<dataset>"),
    ("fewshot-5:fewshot-10:cifar10", r"fewshot-<k>:<dataset> with <dataset> a full dataset"),
]


@pytest.mark.parametrize(("name", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_forms_name_the_form(tmp_path, name, match):
    with pytest.raises(DataError, match=match):
        canonical_name(name)
    # The train app's config turns it into a ConfigError on dataset_name, before anything is written.
    with pytest.raises(ConfigError, match=r"dataset_name: .*" + match):
        build_config(train_app.TrainConfig, tiny_train(dataset_name=name), {"root": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


def test_did_you_mean_a_fewshot_name():
    with pytest.raises(DataError, match=r"unknown dataset 'fewshot10:cifar100'\. Did you mean 'fewshot-10:cifar100'"):
        canonical_name("fewshot10:cifar100")


def test_decoded_image_cache_stores_the_wrapped_pool_once(tmp_path):
    folder = tmp_path / "images"
    write_class_folders(folder, ["a", "b", "c"], per_class=8)  # one pool of 24 files: imagefolder's 3-way split
    kw = dict(size=16, normalize="none", cache=tmp_path / "cache", seed=0)
    few = build_dataset(f"fewshot-2:imagefolder:{folder}", "train", **kw)
    assert len(few) == 6 and np.bincount(few.targets).tolist() == [2, 2, 2]
    full = build_dataset(f"imagefolder:{folder}", "train", **kw)  # the same cache entry: no second one
    entries = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].startswith("imagefolder") and "fewshot" not in entries[0]
    assert few.raw_image(0).equal(full.source.image(int(few.indices[0])))
    # A class the pool lacks (Pet's 37 breeds, 3 written) cannot give k images.
    write_pet(tmp_path / "data", trainval=24, test=6)
    with pytest.raises(DataError, match=r"'fewshot-2:pet': class 3 has no image in the train pool"):
        build_dataset("fewshot-2:pet", "train", root=tmp_path / "data", size=16)


def test_train_app_trains_and_evaluates_a_fewshot_task_offline(tmp_path, run_inprocess):
    cfg = tiny_train(dataset_name="fewshot-10:digits_subset-56789", steps=4, eval_period=2, batch_size=16)
    path = tmp_path / "fewshot.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_inprocess("apps.vit.train", f"config={path}", f"root={tmp_path / 'out'}", "log_dir=run", "device=cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "out" / "runs" / "run"
    result = json.loads((run / "eval.json").read_text())
    assert result["dataset"] == "fewshot-10:digits_subset-56789" and result["n"] == 180  # digits_subset test
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset_name"] == "fewshot-10:digits_subset-56789"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val_acc" in row] == [2, 4]
    # k larger than the smallest class: exit status 2 and one line naming the form.
    r = run_inprocess("apps.vit.train", f"config={path}", f"root={tmp_path / 'out2'}", "device=cpu",
                      "dataset_name=fewshot-200:digits_subset-56789")  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: ") and FORM in r.stderr
