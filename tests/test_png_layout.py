"""Every kind of PNG qkv writes keeps all its text inside the picture: titles (long ones
wrap), token labels, colour bar label and ticks. Checked on the drawn figure with
matplotlib's own text extents, for each kind the CLI writes."""

from __future__ import annotations

import numpy as np
import pytest

from bert_model import sentence_map
from qkv.attention_map import AttentionMap
from qkv.viz import png

LONG = ("A very long sentence that goes on and on about the animal, the street, the weather "
        "and the many reasons why it was too tired to cross the street that afternoon")


def cross_map():
    """Like qkv translate's alignment: 2 decoder layers x 4 heads, output x input chars."""
    rng = np.random.default_rng(1)
    out = [*"2026-11-28", "</s>"]
    src = [*"28 novembre 2026", "</s>"]
    w = rng.random((2, 4, len(out), len(src))) ** 4
    w /= w.sum(-1, keepdims=True)
    return AttentionMap(tokens=out, weights=w, key_tokens=src, title="28 novembre 2026",
                        model="dates", layer_labels=["decoder 0", "decoder 1"])


def texts_outside(fig) -> list[str]:
    """The visible, non-empty texts of ``fig`` whose drawn box leaves the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # runs the constrained layout as savefig does
    renderer = canvas.get_renderer()
    box = fig.bbox
    bad = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            bad.append(f"{t.get_text()!r} at {e.bounds} outside {box.bounds}")
    return bad


def token_labels(fig) -> set[str]:
    return {t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()}


KINDS = {
    "grid": lambda m: (m, {}),
    "one layer": lambda m: (m, {"layer": 3}),
    "one head column": lambda m: (m, {"head": 5}),
    "one head": lambda m: (m.merge_words(), {"layer": 3, "head": 1}),
    "rollout": lambda m: (m.merge_words().rollout(), {}),
    "hide special": lambda m: (m.merge_words().drop_special(), {"layer": 0, "head": 0}),
    "translate (one layer)": lambda m: (cross_map(), {"layer": 1}),
    "translate (one head)": lambda m: (cross_map(), {"layer": 1, "head": 2}),
}


@pytest.mark.parametrize("long_title", [False, True], ids=["title", "long title"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_text_is_inside_the_png(kind, long_title):
    from dataclasses import replace

    amap, options = KINDS[kind](sentence_map())
    if long_title:
        amap = replace(amap, title=LONG)
    fig = png.figure(amap, **options)
    assert texts_outside(fig) == []
    title = fig.get_suptitle()
    if long_title:
        assert "\n" in title  # wrapped, not cut at the edges
        assert "the many reasons" in title.replace("\n", " ")


def test_rollout_and_one_head_have_token_labels():
    m = sentence_map().merge_words()
    fig = png.figure(m.rollout())
    assert set(m.tokens) <= token_labels(fig)
    assert "every layer combined" in fig.axes[0].get_title()
    fig = png.figure(cross_map(), layer=0, head=1)
    assert set(cross_map().keys) | set(cross_map().tokens) <= token_labels(fig)


def test_the_check_catches_a_cut_label():
    """texts_outside is not vacuous: a title moved off the canvas is reported."""
    fig = png.figure(sentence_map(), layer=3)
    fig.text(0.5, 1.02, "sticks out", ha="center")
    assert any("sticks out" in b for b in texts_outside(fig))
