"""vitef.distributed: single-process fallback, and a real two-process gloo group under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from vitef import distributed
from vitef.evaluation import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_fallback(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info, device = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    assert device == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(t.clone()), t)
    assert torch.equal(distributed.all_reduce_mean(t.clone()), t)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(5) == 5
    assert distributed.is_main() and distributed.world_size() == 1
    distributed.barrier()
    distributed.destroy_distributed()


def test_env_info_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = distributed.env_info()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 1, 4, False)


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from timm.models.vision_transformer import VisionTransformer
    from torch.utils.data import DataLoader, TensorDataset
    from vitef import distributed
    from vitef.evaluation import evaluate

    info, device = distributed.init_distributed("cpu")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(23, 3, 16, 16, generator=g), torch.randint(0, 4, (23,), generator=g))
    result = evaluate(model, DataLoader(data, batch_size=5), device)
    total = distributed.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    ranks = distributed.all_gather_object(info.rank)
    if info.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump({"acc": result.acc, "loss": result.loss, "n": result.n, "sum": total.item(), "ranks": ranks,
                       "world": info.world_size}, f)
    distributed.destroy_distributed()
    """
)


def test_two_process_gloo_evaluation_is_exact(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["sum"] == 3.0 and got["ranks"] == [0, 1]

    # The same model and data in this process: the strided shards partition the 23 samples exactly.
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(23, 3, 16, 16, generator=g), torch.randint(0, 4, (23,), generator=g))
    ref = evaluate(model, DataLoader(data, batch_size=5), torch.device("cpu"))
    assert got["n"] == ref.n == 23
    assert got["acc"] == ref.acc
    assert abs(got["loss"] - ref.loss) < 1e-6
