"""Attention as a self-contained HTML page: head view, model view, step-by-step panel.

The page is one file: its style, script and data are inline, it loads nothing (a
Content-Security-Policy forbids every network request) and works offline. Arrays travel
as base64 float32, so a 15-token sentence of a 6-layer, 12-head model is ~100 KB.

* head view: queries on the left, keys on the right, one line per pair with opacity
  following the weight; hover a token to see only its lines and the weights in %;
* model view: every layer x head as a small heatmap; click one to open it;
* step by step (shown when the map carries q/k/v): for the chosen head and the focused
  query token, ``q·k``, the scaled scores, the softmax and the weighted sum of values,
  computed in the page from the real vectors and checked against the model's weights;
* toggles to merge subwords into words and hide special tokens, as
  :meth:`AttentionMap.merge_words` and :meth:`AttentionMap.drop_special` do.

Cross-attention maps (``key_tokens`` set) show the two different token columns.
"""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

from ..attention_map import AttentionMap

__all__ = ["render", "save"]

_FORMATS = (".html", ".htm")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _payload(amap: AttentionMap, *, layer: int, head: int, query: int, words: bool,
             hide_special: bool) -> dict:
    d = amap.to_json(arrays=False)
    d["allowed"] = None if amap.allowed is None else amap.allowed.tolist()
    d["weights"] = _b64(amap.weights)
    d["q"] = _b64(amap.q) if amap.has_qkv else None
    d["k"] = _b64(amap.k) if amap.has_qkv else None
    d["v"] = _b64(amap.v) if amap.has_qkv else None
    d["q_dim"] = int(amap.q.shape[-1]) if amap.has_qkv else 0
    d["v_dim"] = int(amap.v.shape[-1]) if amap.has_qkv else 0
    d["initial"] = {"layer": layer, "head": head, "query": query, "words": words,
                    "hide_special": hide_special}
    return d


def render(amap: AttentionMap, *, layer: int = 0, head: int = 0, query: int | None = None,
           words: bool = False, hide_special: bool = False) -> str:
    """The page as a string. ``layer``/``head`` open first; ``query`` is the token index
    (a row of ``amap``) the step-by-step panel starts on (default: the last non-special
    token); ``words``/``hide_special`` set the two toggles."""
    if not isinstance(amap, AttentionMap):
        raise TypeError(f"expected a qkv AttentionMap; got {type(amap).__name__}")
    amap.check_head(layer, head)
    if query is None:
        normal = [i for i, s in enumerate(amap.query_special) if not s]
        query = normal[-1] if normal else len(amap.tokens) - 1
    if not 0 <= query < len(amap.tokens):
        raise ValueError(f"query {query} is out of range: the map has {len(amap.tokens)} "
                         "query tokens")
    data = json.dumps(_payload(amap, layer=layer, head=head, query=query, words=words,
                               hide_special=hide_special), ensure_ascii=True)
    data = data.replace("</", "<\\/").replace("<!--", "<\\!--")  # stays inside <script>
    pkg = resources.files("qkv.viz")
    parts = {
        "TITLE": html.escape(f"qkv · {amap.model + ': ' if amap.model else ''}{amap.title}"[:200]),
        "CSS": (pkg / "page.css").read_text(encoding="utf-8"),
        "JS": (pkg / "page.js").read_text(encoding="utf-8"),
        "DATA": data,
    }
    page = (pkg / "page.html").read_text(encoding="utf-8")
    # One pass, so text inside a part is never mistaken for a placeholder.
    return re.sub(r"__QKV_([A-Z]+)__", lambda m: parts[m.group(1)], page)


def save(amap: AttentionMap, path: str | Path, **options) -> Path:
    """Write :func:`render` to ``path`` (.html); options as :func:`render`."""
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"cannot write {path.name!r} as HTML: expected a .html file; got "
                         f"extension {path.suffix or '(none)'!r}")
    path.write_text(render(amap, **options), encoding="utf-8")
    return path
