"""Atomic writes: all or nothing, usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from vitef.utils import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file_with_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_compile_cache_scope_sets_the_folder_and_always_sets_back_the_callers(tmp_path, monkeypatch):
    from vitef.utils import COMPILE_CACHE_ENV, compile_cache_dir, compile_cache_scope

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    with compile_cache_scope(None) as nothing:  # empty: nothing changes
        assert nothing is None and COMPILE_CACHE_ENV not in os.environ
    with pytest.raises(RuntimeError, match="boom"):
        with compile_cache_scope(tmp_path / "a" / "b") as path:
            assert path == (tmp_path / "a" / "b").resolve() and path.is_dir()
            assert os.environ[COMPILE_CACHE_ENV] == str(path) == compile_cache_dir()
            raise RuntimeError("boom")
    assert COMPILE_CACHE_ENV not in os.environ  # unset before: unset after, even on error
    monkeypatch.setenv(COMPILE_CACHE_ENV, "/callers/own")
    with compile_cache_scope(tmp_path / "c"):
        assert os.environ[COMPILE_CACHE_ENV] == str((tmp_path / "c").resolve())
    assert os.environ[COMPILE_CACHE_ENV] == "/callers/own"
    monkeypatch.delenv(COMPILE_CACHE_ENV)
    assert os.path.basename(compile_cache_dir()).startswith("torchinductor_")  # torch's own default folder


def test_compile_cache_benchmark_refuses_a_comparison_without_a_warm_run():
    from benchmarks.compile_cache import CompileCacheConfig
    from vitef.config import build_config
    from vitef.errors import ConfigError

    with pytest.raises(ConfigError, match=r"runs=1: at least 2 \(one with the cache empty, one with it filled\)"):
        build_config(CompileCacheConfig, {"runs": 1})
    assert build_config(CompileCacheConfig, {}).train_config == "apps/vit/configs/digits_pretrained.yaml"
