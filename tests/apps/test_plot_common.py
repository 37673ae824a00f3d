"""apps.plots.common: one colour per registry name, and the one atomic figure saver."""

from __future__ import annotations

import matplotlib.pyplot as plt

from apps.plots import analysis as plots_analysis
from apps.plots.common import COMPONENT_COLORS, OTHER_COLOR, component_color, save_figure
from vitef.models.components import DISPLAY_ORDER, RANK_ORDER


def test_every_registry_name_has_its_own_colour():
    assert list(COMPONENT_COLORS) == list(DISPLAY_ORDER)
    assert len(set(COMPONENT_COLORS.values()) | {OTHER_COLOR}) == len(COMPONENT_COLORS) + 1
    assert component_color("fc1+fc2") == OTHER_COLOR
    # The analysis figures use the same order (and therefore the same colours) as every other figure.
    assert plots_analysis.ORDER == list(RANK_ORDER)


def test_save_figure_writes_each_format_and_closes(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    written = save_figure(fig, tmp_path / "sub" / "fig.anything", formats=("png", "svg"))
    assert written == [tmp_path / "sub" / "fig.png", tmp_path / "sub" / "fig.svg"]
    assert all(p.stat().st_size > 0 for p in written) and not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig.png", "fig.svg"]  # no temporaries left
