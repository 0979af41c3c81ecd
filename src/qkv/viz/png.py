"""Attention as a picture (matplotlib): the model view grid, or one head in detail.

One colour scale everywhere: weights 0..1 on a square-root (power 0.5) norm, so that the
many small weights stay visible next to the few large ones, and one colour bar says so.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from ..attention_map import AttentionMap

__all__ = ["CMAP", "figure", "save"]

CMAP = "viridis"
_FORMATS = (".png", ".svg")


def _norm():
    from matplotlib.colors import PowerNorm

    return PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def figure(amap: AttentionMap, *, layer: int | None = None, head: int | None = None):
    """A matplotlib Figure: one head when both ``layer`` and ``head`` are given, else a
    grid of thumbnails (rows = layers, columns = heads), restricted to ``layer`` or
    ``head`` when one of them is given. A map with one layer and one head (a rollout)
    is drawn as one head. In a notebook the figure shows itself as a PNG."""
    Figure = _figure_class()

    if layer is not None:
        amap.check_head(layer, 0 if head is None else head)
    if head is not None:
        amap.check_head(0 if layer is None else layer, head)
    layers = list(range(amap.num_layers)) if layer is None else [layer]
    heads = list(range(amap.num_heads)) if head is None else [head]
    if len(layers) == 1 and len(heads) == 1:  # one head (or a rollout): with its tokens
        return _one(Figure, amap, layers[0], heads[0])
    return _grid(Figure, amap, layers, heads)


@functools.lru_cache(maxsize=1)
def _figure_class():
    """matplotlib's Figure that also shows itself in a notebook (``_repr_png_``) without
    pyplot or an inline backend."""
    from matplotlib.figure import Figure

    class AttentionFigure(Figure):
        def _repr_png_(self) -> bytes:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            buf = io.BytesIO()
            FigureCanvasAgg(self).print_png(buf, metadata={"Software": "qkv"})
            return buf.getvalue()

    return AttentionFigure


def save(amap: AttentionMap, path: str | Path, *, layer: int | None = None,
         head: int | None = None, dpi: int = 110) -> Path:
    """Write :func:`figure` to ``path``; the format follows the extension (.png, .svg)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _FORMATS:
        raise ValueError(f"cannot write {path.name!r}: expected a .png or .svg file; got "
                         f"extension {ext or '(none)'!r}")
    fig = figure(amap, layer=layer, head=head)
    fig.savefig(path, format=ext[1:], dpi=dpi,
                metadata={"Software": "qkv"} if ext == ".png" else None)
    return path


def _wrap(text: str, width_in: float, fontsize: float, *, max_lines: int = 3) -> str:
    """``text`` wrapped to lines that fit ``width_in`` inches at ``fontsize`` points
    (about 0.6 em per character, a little wider than DejaVu Sans' average), at most
    ``max_lines`` lines, the last cut with "…" when the text is longer."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    lines = textwrap.wrap(text, chars, break_long_words=True, break_on_hyphens=False)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars - 1] + "…"
    return "\n".join(lines)


def _caption(amap: AttentionMap) -> str:
    what = "attention rollout" if amap.kind == "rollout" else "attention"
    name = f"{amap.model}: " if amap.model else ""
    return f"{name}{what} on “{amap.title}”" if amap.title else f"{name}{what}"


def _one(Figure, amap: AttentionMap, layer: int, head: int):
    w = amap.weights[layer, head]  # (Lq, Lk)
    lq, lk = w.shape
    side = 0.32
    width = max(4.5, 2.2 + side * lk)
    caption = _wrap(_caption(amap), width - 0.3, 9)
    lines = caption.count("\n")  # each extra title line gets its own room
    fig = Figure(figsize=(width, max(3.5, 1.8 + side * lq) + 0.18 * lines),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(w, cmap=CMAP, norm=_norm(), aspect="equal", interpolation="nearest")
    ax.set_xticks(range(lk), amap.keys, rotation=90, fontsize=9)
    ax.set_yticks(range(lq), amap.tokens, fontsize=9)
    ax.set_xlabel("attended to (keys)")
    ax.set_ylabel("attending (queries)")
    if max(lq, lk) <= 24:  # the numbers fit in the cells
        for i in range(lq):
            for j in range(lk):
                pct = round(100 * float(w[i, j]))
                if pct >= 5:
                    ax.text(j, i, str(pct), ha="center", va="center", fontsize=6.5,
                            color="black" if w[i, j] > 0.45 else "white")
    which = ("every layer combined, heads averaged" if amap.kind == "rollout"
             else f"{amap.layer_name(layer)}, {amap.head_name(head)}")
    ax.set_title(which, fontsize=11)
    fig.suptitle(caption, fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.8, ticks=[0, 0.05, 0.25, 0.5, 1])
    bar.set_label("weight (numbers in %)", fontsize=8)
    return fig


def _grid(Figure, amap: AttentionMap, layers: list[int], heads: list[int]):
    nr, nc = len(layers), len(heads)
    cell = 1.05
    width = max(4.5, 1.2 + cell * nc + 0.9)
    # one row of thumbnails is still tall enough for the colour bar and its label
    fig = Figure(figsize=(width, max(3.2, 1.3 + cell * nr)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nr, nc, squeeze=False))
    im = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            im = ax.imshow(amap.weights[layer, head], cmap=CMAP, norm=_norm(),
                           aspect="auto", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_linewidth(0.4)
            if r == 0:
                ax.set_title(amap.head_name(head), fontsize=8, pad=3)
            if c == 0:
                ax.set_ylabel(amap.layer_name(layer), fontsize=8)
    def fit(text: str, lines: int = 2) -> str:
        return _wrap(text, width - 0.3, 8.5, max_lines=lines)

    order = ([f"rows attend to columns, in token order: {' '.join(amap.tokens)}"]
             if amap.is_self else [f"rows (queries): {' '.join(amap.tokens)}",
                                   f"columns (keys): {' '.join(amap.keys)}"])
    fig.suptitle("\n".join([fit(_caption(amap), 3)] + [fit(o) for o in order]), fontsize=8.5)
    bar = fig.colorbar(im, ax=axes, shrink=0.9 if nr == 1 else 0.6,
                       ticks=[0, 0.05, 0.25, 0.5, 1], pad=0.01)
    bar.set_label("attention weight\n(square-root scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig
