"""User-facing failures of ``python -m apps.vit.data_info`` (in-process, as ``cli_main`` runs it): documented
message and exit status 2."""

from __future__ import annotations

import numpy as np
from conftest import write_cifar, write_cifar_c


def test_bad_name(run_inprocess):
    r = run_inprocess("apps.vit.data_info", "name=cifar-10")
    assert r.returncode == 2
    assert "error: unknown dataset 'cifar-10'" in r.stderr and "imagefolder:<path>" in r.stderr


def test_missing_dataset(run_inprocess, tmp_path):
    r = run_inprocess("apps.vit.data_info", "name=domainnet-clipart", env={"VITEF_DATA": str(tmp_path)})
    assert r.returncode == 2
    assert f"looked at '{tmp_path}/domainnet/clipart'" in r.stderr and "https://ai.bu.edu/M3SDA/" in r.stderr


def test_corrupt_files(run_inprocess, tmp_path):
    base = write_cifar_c(tmp_path, "snow", n=20)
    np.save(base / "labels.npy", np.zeros(7, dtype=np.uint8))  # wrong length
    r = run_inprocess("apps.vit.data_info", "name=cifar10_c-snow-5", f"data.root={tmp_path}", "splits=[test]")
    assert r.returncode == 2 and "labels.npy' is corrupt or truncated" in r.stderr
    write_cifar(tmp_path)  # the real layout but not the official bytes: the checksum check rejects it
    r = run_inprocess("apps.vit.data_info", "name=cifar10", f"data.root={tmp_path}", "data.download=false")
    assert r.returncode == 2 and "is corrupt or truncated (torchvision's integrity check failed" in r.stderr
