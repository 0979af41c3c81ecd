"""The five steps of :func:`qkv.explain` as HTML tables (``AttentionSteps._repr_html_``).

One table per step for one head: ``q·k``, ``× scale``, the mask applied, the softmax
(each row sums to 1) and the output ``weights @ v``. Static HTML with inline styles: no
script, no ids, so any number of them can sit in one notebook. Large calls show the first
rows and columns and say what was left out.
"""

from __future__ import annotations

import html
import math

import numpy as np

__all__ = ["MAX_COLS", "MAX_HEADS", "MAX_ROWS", "to_html"]

MAX_ROWS = 12  # queries shown per table
MAX_COLS = 12  # keys (or value dims) shown per table
MAX_HEADS = 2  # heads shown, each with its five tables

_STEPS = (
    ("scores", "1. scores = q · kᵀ", "how well each query (row) matches each key (column)"),
    ("scaled", "2. scaled = scores × scale", None),
    ("masked", "3. masked", "the mask added; −∞ where a key is hidden from the query"),
    ("weights", "4. weights = softmax(masked)", "each row sums to 1 (0 when every key is "
                                                 "hidden)"),
    ("output", "5. output = weights · v", "the weighted sum of the values, one row per query"),
)
_CELL = "padding:1px 6px;text-align:right;border:0;border-bottom:1px solid #e2e2ea"


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "−∞" if x < 0 else "∞"
    if math.isnan(x):
        return "NaN"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.3f}"


def _table(a: np.ndarray, col: str, *, shade: bool) -> str:
    """``a (rows, cols)`` as an HTML table, at most MAX_ROWS x MAX_COLS."""
    rows, cols = min(a.shape[0], MAX_ROWS), min(a.shape[1], MAX_COLS)
    head = "".join(f'<th style="{_CELL}">{col}{j}</th>' for j in range(cols))
    if cols < a.shape[1]:
        head += f'<th style="{_CELL}">… {a.shape[1] - cols} more</th>'
    out = [f'<table style="border-collapse:collapse;font-size:12px;margin:2px 0 8px;'
           f'font-variant-numeric:tabular-nums"><tr><th style="{_CELL}"></th>{head}</tr>']
    for i in range(rows):
        cells = []
        for j in range(cols):
            x = float(a[i, j])
            bg = ""
            if shade and math.isfinite(x):
                bg = f";background:rgba(37,99,235,{min(max(x, 0.0), 1.0) ** 0.5 * 0.6:.2f})"
            cells.append(f'<td style="{_CELL}{bg}">{_fmt(x)}</td>')
        out.append(f'<tr><th style="{_CELL}">q{i}</th>{"".join(cells)}</tr>')
    if rows < a.shape[0]:
        out.append(f'<tr><td style="{_CELL}" colspan="{cols + 1}">… {a.shape[0] - rows} more '
                   "queries</td></tr>")
    out.append("</table>")
    return "".join(out)


def to_html(steps) -> str:
    """The steps of an :class:`qkv.AttentionSteps` as one ``<div>`` of tables: the first
    batch element, its first :data:`MAX_HEADS` heads."""
    arrays = {name: steps_array(getattr(steps, name)) for name, _, _ in _STEPS}
    w = arrays["weights"]  # (..., H, Lq, Lk)
    *batch, nh, lq, lk = w.shape
    dv = arrays["output"].shape[-1]
    first = (0,) * len(batch)
    shown = min(nh, MAX_HEADS)
    parts = [f'<div class="qkv-steps" style="font:13px/1.4 system-ui,sans-serif;'
             f'text-align:left"><p style="margin:4px 0"><b>qkv.explain</b>: {nh} head'
             f"{'s' * (nh != 1)}, {lq} quer{'ies' if lq != 1 else 'y'} x {lk} key"
             f"{'s' * (lk != 1)}, values of {dv} numbers, scale = {steps.scale:.5g}"
             + (f", batch {tuple(batch)}" if batch else "") + "</p>"]
    left = []
    if batch and int(np.prod(batch)) > 1:
        left.append(f"batch element {first} shown of {tuple(batch)}")
    if shown < nh:
        left.append(f"heads 0..{shown - 1} shown of {nh}")
    if lq > MAX_ROWS or max(lk, dv) > MAX_COLS:
        left.append(f"tables cut at {MAX_ROWS} rows x {MAX_COLS} columns")
    if left:
        parts.append(f'<p style="margin:4px 0;color:#6a6a78">{html.escape("; ".join(left))}'
                     "; the tensors hold everything.</p>")
    for h in range(shown):
        if nh > 1:
            parts.append(f'<p style="margin:8px 0 2px"><b>head {h}</b></p>')
        for name, title, note in _STEPS:
            a = arrays[name][(*first, h)]  # (Lq, Lk) or (Lq, Dv)
            if note is None:
                note = f"scale = {steps.scale:.5g} (1/√D unless given)"
            parts.append(f'<p style="margin:4px 0 0"><b>{html.escape(title)}</b> '
                         f'<span style="color:#6a6a78">{html.escape(note)}</span></p>')
            parts.append(_table(a, "d" if name == "output" else "k",
                                shade=name == "weights"))
    parts.append("</div>")
    return "".join(parts)


def steps_array(t) -> np.ndarray:
    """A tensor (any device/dtype) as a float64 NumPy array."""
    return t.detach().to("cpu").double().numpy()
