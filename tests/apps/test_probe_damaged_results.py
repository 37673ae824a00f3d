"""apps.vit.linear_probing: a damaged probes.csv in the output folder is replaced, not a traceback after the probes."""

from __future__ import annotations

import logging

import pytest

from apps.vit import linear_probing


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff not text at all",  # UnicodeDecodeError
        (",".join(linear_probing.CSV_COLUMNS) + "\n0,mha,mean,high,0.5,1,1,4,1,True,0.1,d,m\n").encode(),  # ValueError
    ],
)
def test_a_damaged_probes_csv_is_replaced_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "probes.csv"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="apps.vit.linear_probing"):
        assert linear_probing._read_rows(path) == []
    assert caplog.records[-1].getMessage().startswith(f"{path} cannot be read (")
    assert caplog.records[-1].getMessage().endswith("); it will be replaced")
