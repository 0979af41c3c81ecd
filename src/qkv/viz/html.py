"""Attention as a self-contained HTML page: head view, model view, step-by-step panel.

The page is one file: its style, script and data are inline, it loads nothing (a
Content-Security-Policy forbids every network request) and works offline. Arrays travel
as base64 float32: a 15-token sentence of a 6-layer, 12-head model is ~110 KB, ~660 KB
with the per-head q/k/v of the step-by-step panel.

* head view: queries on the left, keys on the right, one line per pair with opacity
  following the weight; hover a token to see only its lines and the weights in %;
* model view: every layer x head as a small heatmap; click one to open it;
* step by step (shown when the map carries q/k/v): for the chosen head and the focused
  query token, ``q·k``, the scaled scores, the softmax and the weighted sum of values,
  computed in the page from the real vectors and checked against the model's weights;
* toggles to merge subwords into words and hide special tokens, as
  :meth:`AttentionMap.merge_words` and :meth:`AttentionMap.drop_special` do.

Cross-attention maps (``key_tokens`` set) show the two different token columns.

:func:`fragment` is the same viewer as one ``<div>`` (its style and script inside, every
rule and lookup scoped to it) for notebooks: ``AttentionMap._repr_html_`` uses it, and
two maps in one notebook work independently.
"""

from __future__ import annotations

import base64
import html
import json
import re
import uuid
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the viewer takes any map that behaves like one; no import at run time
    from ..attention_map import AttentionMap


__all__ = ["NOTEBOOK_QKV_BYTES", "fragment", "render", "save"]

_FORMATS = (".html", ".htm")
# Per-head q/k/v make the step-by-step panel but weigh 3 x D/Lk times the weights; in a
# notebook they are left out above this many bytes (float32): 1 MB is a 36-token
# sentence of a 6-layer, 12-head, D=32 model.
NOTEBOOK_QKV_BYTES = 1_000_000


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _payload(amap: AttentionMap, *, layer: int, head: int, query: int, words: bool,
             hide_special: bool, qkv: bool, note: str) -> dict:
    d = amap.to_json(arrays=False)
    d["allowed"] = None if amap.allowed is None else amap.allowed.tolist()
    d["weights"] = _b64(amap.weights)
    qkv = qkv and amap.has_qkv
    d["q"] = _b64(amap.q) if qkv else None
    d["k"] = _b64(amap.k) if qkv else None
    d["v"] = _b64(amap.v) if qkv else None
    d["q_dim"] = int(amap.q.shape[-1]) if qkv else 0
    d["v_dim"] = int(amap.v.shape[-1]) if qkv else 0
    d["note"] = note
    d["initial"] = {"layer": layer, "head": head, "query": query, "words": words,
                    "hide_special": hide_special}
    return d


def _qkv_bytes(amap: AttentionMap) -> int:
    return sum(a.nbytes for a in (amap.q, amap.k, amap.v)) if amap.has_qkv else 0


def _start(amap: AttentionMap, layer, head, query, words):
    """The head, query token and word toggle the viewer opens on: by default the word
    :func:`qkv.head_choice.default_query` picks and the head :func:`choose_head` picks for
    it (what ``qkv explain`` shows), on the words view when the map has words."""
    from ..head_choice import choose_head, default_query

    if not amap.tokens or not amap.keys:
        raise ValueError("the map has no tokens (Lq or Lk is 0); there is nothing to show")
    if words is None:
        words = amap.word_spans is not None or amap.key_word_spans is not None
    if layer is not None:
        amap.check_head(layer, 0 if head is None else head)
    if head is not None:
        amap.check_head(0 if layer is None else layer, head)
    if query is not None and (isinstance(query, bool) or not 0 <= query < len(amap.tokens)):
        raise ValueError(f"query={query!r} is out of range: the map has "
                         f"{len(amap.tokens)} query tokens, numbered 0 to "
                         f"{len(amap.tokens) - 1}")
    view = amap.merge_words() if words else amap
    units = amap.units(words=words)
    if query is None:
        query = units[default_query(view)][0]
    if layer is None or head is None:
        row = next(r for r, g in enumerate(units) if query in g)
        c = choose_head(view, row, layers=None if layer is None else [layer],
                        heads=None if head is None else [head])
        layer, head = c.layer, c.head
    return layer, head, query, words


def fragment(amap: AttentionMap, *, layer: int | None = None, head: int | None = None,
             query: int | None = None, words: bool | None = None, hide_special: bool = False,
             max_qkv_bytes: int | None = NOTEBOOK_QKV_BYTES) -> str:
    """The viewer as one self-contained ``<div class="qkv">`` (style, data and script
    inside; nothing loaded) for a notebook or another page. Options as :func:`render`;
    per-head q/k/v (the step-by-step panel) are left out when they exceed
    ``max_qkv_bytes`` (None: never), and the viewer says so."""
    if not all(hasattr(amap, a) for a in ("weights", "tokens", "merge_words")):
        raise TypeError(f"expected a qkv AttentionMap; got {type(amap).__name__}")
    layer, head, query, words = _start(amap, layer, head, query, words)
    size = _qkv_bytes(amap)
    keep = max_qkv_bytes is None or size <= max_qkv_bytes
    note = "" if keep else (
        f"Step by step left out: this map's per-head q/k/v take {size / 1e6:.1f} MB, over "
        f"the {max_qkv_bytes / 1e6:.1f} MB kept in a notebook; qkv.viz.html.save(amap, "
        "'page.html') writes the full page (or raise max_qkv_bytes=).")
    return _fill(amap, layer=layer, head=head, query=query, words=words,
                 hide_special=hide_special, qkv=keep, note=note,
                 uid=f"qkv-{uuid.uuid4().hex[:12]}")


def _fill(amap, *, uid: str, **payload) -> str:
    data = json.dumps(_payload(amap, **payload), ensure_ascii=True)
    data = data.replace("</", "<\\/").replace("<!--", "<\\!--")  # stays inside <script>
    pkg = resources.files("qkv.viz")
    parts = {
        "ID": uid,
        "CSS": (pkg / "page.css").read_text(encoding="utf-8"),
        "JS": (pkg / "page.js").read_text(encoding="utf-8"),
        "DATA": data,
    }
    viewer = (pkg / "viewer.html").read_text(encoding="utf-8")
    # One pass, so text inside a part is never mistaken for a placeholder.
    return re.sub(r"__QKV_([A-Z]+)__", lambda m: parts[m.group(1)], viewer)


def render(amap: AttentionMap, *, layer: int | None = None, head: int | None = None,
           query: int | None = None, words: bool | None = None,
           hide_special: bool = False) -> str:
    """The page as a string. ``layer``/``head`` open first (default: the head
    :func:`qkv.head_choice.choose_head` picks for ``query``); ``query`` is the token
    index (a row of ``amap``) the step-by-step panel starts on (default: the word
    ``qkv explain`` would pick); ``words`` (default: True when the map has words) and
    ``hide_special`` set the two toggles."""
    if not all(hasattr(amap, a) for a in ("weights", "tokens", "merge_words")):
        raise TypeError(f"expected a qkv AttentionMap; got {type(amap).__name__}")
    layer, head, query, words = _start(amap, layer, head, query, words)
    viewer = _fill(amap, layer=layer, head=head, query=query, words=words,
                   hide_special=hide_special, qkv=True, note="", uid="qkv-page")
    pkg = resources.files("qkv.viz")
    parts = {
        "TITLE": html.escape(f"qkv · {amap.model + ': ' if amap.model else ''}{amap.title}"[:200]),
        "VIEWER": viewer,
    }
    page = (pkg / "page.html").read_text(encoding="utf-8")
    return re.sub(r"__QKV_([A-Z]+)__", lambda m: parts[m.group(1)], page)


def save(amap: AttentionMap, path: str | Path, **options) -> Path:
    """Write :func:`render` to ``path`` (.html); options as :func:`render`."""
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"cannot write {path.name!r} as HTML: expected a .html file; got "
                         f"extension {path.suffix or '(none)'!r}")
    path.write_text(render(amap, **options), encoding="utf-8")
    return path
