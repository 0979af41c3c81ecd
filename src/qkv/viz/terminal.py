"""Attention in the terminal (rich): a heatmap of one head and a table of top keys.

Colour follows the console: with colour, each cell's background encodes the weight
(square-root scale, so small weights stay visible) and weights of 5% or more are
printed on it; with ``NO_COLOR`` or when the output is not a terminal, cells hold the
weight in percent (``.`` below 0.5%), so pipes and logs get plain, exact text.
"""

from __future__ import annotations

import math

from rich.console import Console, ConsoleOptions, RenderResult
from rich.jupyter import JupyterMixin
from rich.style import Style
from rich.table import Table
from rich.text import Text

from ..attention_map import AttentionMap

__all__ = ["Heatmap", "TopTable", "colour", "heatmap", "top_table"]

# A perceptually ordered dark-purple -> teal -> yellow ramp, readable on dark and light
# terminals alike (low weights dark, high weights bright).
_RAMP = [(0x2b, 0x1a, 0x4a), (0x3b, 0x4f, 0x8c), (0x23, 0x8a, 0x8d), (0x4c, 0xc2, 0x6c),
         (0xf6, 0xe6, 0x20)]
_SHADES = " .:-=+*#%@"  # plain one-character cells, light to heavy
_LABEL = 12  # characters of a row label
_HEADER = 8  # characters of a (vertical) column label


def colour(weight: float) -> tuple[int, int, int]:
    """RGB of a weight in [0, 1] on the square-root scale of the ramp."""
    x = math.sqrt(min(max(float(weight), 0.0), 1.0)) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    t = x - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * t) for c in range(3))


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


class Heatmap(JupyterMixin):
    """A rich renderable: one head's weights, rows = ``amap.tokens`` (queries), columns =
    ``amap.keys`` (key tokens, labels written vertically). Chooses colour or plain text
    when rendered, from the console it is printed on; in a notebook it shows itself (as
    coloured HTML text)."""

    def __init__(self, amap: AttentionMap, layer: int, head: int, *,
                 highlight: int | None = None) -> None:
        amap.check_head(layer, head)
        self.amap, self.layer, self.head, self.highlight = amap, layer, head, highlight

    def __repr__(self) -> str:
        lq, lk = self.amap.weights.shape[2:]
        mark = "" if self.highlight is None else f", query {self.amap.tokens[self.highlight]!r}"
        return (f"Heatmap({self.amap.layer_name(self.layer)}, "
                f"{self.amap.head_name(self.head)}, {lq} x {lk}{mark})")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        amap = self.amap
        w = amap.weights[self.layer, self.head]  # (Lq, Lk)
        use_colour = console.color_system is not None and not console.no_color
        rows, keys = amap.tokens, amap.keys
        label = min(_LABEL, max(len(t) for t in rows)) + 1
        room = max(options.max_width - label, 1)
        full = bool((w >= 0.995).any()) and not use_colour  # a plain "100" needs 4 columns
        cell = next((c for c in ((4, 3, 2, 1) if full else (3, 2, 1))
                     if c * len(keys) <= room), 1)
        shown = min(len(keys), room // cell)
        which = ("attention rollout (every layer, heads averaged)" if amap.kind == "rollout"
                 else f"{amap.layer_name(self.layer)}, {amap.head_name(self.head)}")
        title = f"{which}: each row is a query, spread over the key columns"
        yield Text(title, style="bold" if use_colour else "")
        if shown < len(keys):
            yield Text(f"(showing the first {shown} of {len(keys)} keys; widen the terminal or "
                       "write -o page.html for all)")
        heads = [_clip(k, _HEADER) for k in keys[:shown]]
        for r in range(max(len(h) for h in heads)):
            line = Text(" " * label)
            for h in heads:
                ch = h[r] if r < len(h) else " "
                line.append(ch.rjust(cell) if cell > 1 else ch)
            yield line
        overflow = False
        for i, tok in enumerate(rows):
            mark = "bold" if (i == self.highlight and use_colour) else ""
            line = Text(_clip(tok, _LABEL).ljust(label), style=mark)
            for j in range(shown):
                x = float(w[i, j])
                c = self._cell(x, cell, use_colour)
                overflow = overflow or "@" in c.plain
                line.append(c)
            if i == self.highlight and not use_colour:
                line.append("  <")
            yield line
        scale = ("colour: square-root scale from 0 (dark) to 100% (bright); numbers are %"
                 if use_colour else "numbers are weights in % ('.' below 0.5%)")
        if not use_colour and cell == 1:
            scale = (f"one character per cell: '{_SHADES[1:]}' from 0 to 100% (square-root "
                     "scale; blank below 1%); widen the terminal for numbers")
        yield Text(scale, style="dim" if use_colour else "")
        if overflow and cell > 1:
            what = "100%" if cell >= 3 else f"{10 ** (cell - 1)}% to 100%"
            yield Text(f"{'@' * (cell - 1)} = {what} (the number does not fit the column; "
                       "widen the terminal for room)")

    @staticmethod
    def _cell(x: float, width: int, use_colour: bool) -> Text:
        pct = round(100 * x)
        if use_colour:
            r, g, b = colour(x)
            fg = "black" if (0.299 * r + 0.587 * g + 0.114 * b) > 140 else "white"
            s = f"{pct:>{width}}" if (pct >= 5 and width >= 2 and pct < 100) else " " * width
            if pct >= 100 and width >= 3:
                s = "100"
            return Text(s, style=Style(color=fg, bgcolor=f"rgb({r},{g},{b})"))
        if width == 1:
            return Text(_SHADES[min(int(math.sqrt(max(x, 0)) * len(_SHADES)), len(_SHADES) - 1)])
        s = "." if pct == 0 else str(pct)
        if len(s) > width - 1:  # keep one space between cells
            s = "@" * (width - 1)
        return Text(s.rjust(width))


def heatmap(amap: AttentionMap, layer: int, head: int, *,
            highlight: int | None = None) -> Heatmap:
    """A rich renderable heatmap of one head (rows = tokens, columns = key tokens);
    ``highlight`` marks one query row."""
    return Heatmap(amap, layer, head, highlight=highlight)


class TopTable(Table):
    """A rich Table (shows itself in a notebook) with a short repr."""

    query: str = ""

    def __repr__(self) -> str:
        return f"TopTable(top keys of {self.query!r}, {self.row_count} heads)"


def top_table(amap: AttentionMap, index: int, *, k: int = 3, layers=None, heads=None,
              title: str | None = None) -> TopTable:
    """A table with one row per layer and head: the ``k`` keys that query ``index``
    attends to most, with their weights in %."""
    if not 0 <= index < len(amap.tokens):
        raise ValueError(f"query index {index} is out of range 0..{len(amap.tokens) - 1}")
    layers = range(amap.num_layers) if layers is None else layers
    heads = range(amap.num_heads) if heads is None else heads
    special = amap.keys_special
    t = TopTable(title=title, show_edge=False, pad_edge=False)
    t.query = amap.tokens[index]
    t.add_column("layer", justify="right")
    t.add_column("head", justify="right")
    for r in range(k):
        t.add_column(("1st", "2nd", "3rd")[r] if r < 3 else f"{r + 1}th")
    for layer in layers:
        for head in heads:
            cells = []
            for j, x in amap.top(layer, head, index, k):
                style = "dim" if special[j] else ("bold" if x >= 0.5 else "")
                cells.append(Text(f"{amap.keys[j]} {100 * x:.0f}%", style=style))
            t.add_row(amap.layer_labels[layer], amap.head_labels[head], *cells)
    return t
