"""``AttentionMap``: the attention weights of a model on one input, as plain data.

The viewers (:mod:`qkv.viz`) draw an AttentionMap and know nothing of models; models
(``BertEncoder.attend``, the seq2seq translator) produce one. Rows are the tokens that
attend (queries), columns the tokens attended to (keys); for self-attention both are the
same tokens and ``key_tokens`` is None. Every row of ``weights`` sums to 1 (or 0 for a
query that may see no key).

The views a person wants are methods that return a new map: :meth:`merge_words`
(subword pieces merged into words), :meth:`drop_special` (no ``[CLS]``/``[SEP]``, rows
renormalised) and :meth:`rollout` (attention rollout, Abnar & Zuidema 2020).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

__all__ = ["SCHEMA", "AttentionMap"]

SCHEMA = "qkv.attention_map/1"
_ARRAYS = ("weights", "q", "k", "v", "allowed")


@dataclass
class AttentionMap:
    """Attention weights of every layer and head on one input.

    Attributes:
        tokens: the Lq units that attend (rows; queries): tokens or words.
        weights: ``(layers, heads, Lq, Lk)`` float32; ``weights[l, h, i, j]`` is how much
            query ``i`` takes from key ``j``; rows sum to 1 (0 when nothing is visible).
        key_tokens: the Lk units attended to (columns); None means the same as ``tokens``
            (self-attention).
        special: per query unit, True for special tokens (``[CLS]``, ``[SEP]``, ``<s>``).
        key_special: the same for key units (None: like ``special`` for self-attention,
            no special keys otherwise).
        words, word_spans: the words of the query side and the token range
            ``[start, end)`` of each (subword pieces of one word); tokens outside every
            span (special tokens) stand alone.
        key_words, key_word_spans: the same for the key side (cross-attention only).
        q, k, v: optional per-head queries ``(layers, heads, Lq, D)``, keys
            ``(layers, heads, Lk, D)`` and values ``(layers, heads, Lk, Dv)`` the weights
            were computed from, for the step-by-step view.
        scale: the factor of the scores (``1/sqrt(D)``), with q/k/v.
        allowed: optional bool ``(Lq, Lk)``, True = query may attend to key (False =
            hidden, e.g. causal); None = every key visible.
        model, title: shown by the viewers (model name; the input text).
        layer_labels, head_labels: names of the layers and heads (default ``"0", "1"..``).
        level: ``"tokens"`` or ``"words"``; kind: ``"attention"`` or ``"rollout"``.
    """

    tokens: list[str]
    weights: np.ndarray
    key_tokens: list[str] | None = None
    special: list[bool] | None = None
    key_special: list[bool] | None = None
    words: list[str] | None = None
    word_spans: list[tuple[int, int]] | None = None
    key_words: list[str] | None = None
    key_word_spans: list[tuple[int, int]] | None = None
    q: np.ndarray | None = None
    k: np.ndarray | None = None
    v: np.ndarray | None = None
    scale: float | None = None
    allowed: np.ndarray | None = None
    model: str = ""
    title: str = ""
    layer_labels: list[str] | None = None
    head_labels: list[str] | None = None
    level: str = "tokens"
    kind: str = "attention"

    def __post_init__(self) -> None:
        w = np.asarray(self.weights)
        if w.ndim != 4 or not np.issubdtype(w.dtype, np.number):
            raise ValueError(f"weights must be a numeric array (layers, heads, Lq, Lk); got "
                             f"{w.dtype} {w.shape}")
        self.weights = np.ascontiguousarray(w, dtype=np.float32)
        nl, nh, lq, lk = self.weights.shape
        self.tokens = [str(t) for t in self.tokens]
        if len(self.tokens) != lq:
            raise ValueError(f"{len(self.tokens)} tokens for weights with Lq={lq}; give one "
                             "token per row")
        if self.key_tokens is not None:
            self.key_tokens = [str(t) for t in self.key_tokens]
            if len(self.key_tokens) != lk:
                raise ValueError(f"{len(self.key_tokens)} key_tokens for weights with Lk={lk}")
        elif lk != lq:
            raise ValueError(f"weights are {lq} x {lk} but key_tokens is None (self-attention "
                             "needs Lq == Lk); pass key_tokens for cross-attention")
        for name, n in (("special", lq), ("key_special", lk)):
            val = getattr(self, name)
            if val is not None:
                if len(val) != n:
                    raise ValueError(f"{name} has {len(val)} flags; expected {n}")
                setattr(self, name, [bool(x) for x in val])
        for side, n in (("", lq), ("key_", lk)):
            ws, sp = getattr(self, side + "words"), getattr(self, side + "word_spans")
            if (ws is None) != (sp is None):
                raise ValueError(f"{side}words and {side}word_spans go together; got one")
            if sp is None:
                continue
            sp = [(int(a), int(b)) for a, b in sp]
            if len(ws) != len(sp):
                raise ValueError(f"{len(ws)} {side}words but {len(sp)} {side}word_spans")
            end = 0
            for a, b in sp:
                if not (end <= a < b <= n):
                    raise ValueError(f"{side}word_spans must be increasing, non-overlapping "
                                     f"[start, end) ranges within 0..{n}; got {sp}")
                end = b
            setattr(self, side + "word_spans", sp)
            setattr(self, side + "words", [str(x) for x in ws])
        for name, rows in (("q", lq), ("k", lk), ("v", lk)):
            a = getattr(self, name)
            if a is None:
                continue
            a = np.ascontiguousarray(a, dtype=np.float32)
            if a.ndim != 4 or a.shape[:3] != (nl, nh, rows):
                raise ValueError(f"{name} must have shape ({nl}, {nh}, {rows}, D); got "
                                 f"{a.shape}")
            setattr(self, name, a)
        if self.q is not None and self.k is not None and self.q.shape[3] != self.k.shape[3]:
            raise ValueError(f"q has {self.q.shape[3]} dims per head but k has {self.k.shape[3]}")
        if self.allowed is not None:
            self.allowed = np.asarray(self.allowed, dtype=bool)
            if self.allowed.shape != (lq, lk):
                raise ValueError(f"allowed must have shape ({lq}, {lk}); got "
                                 f"{self.allowed.shape}")
        for name, n in (("layer_labels", nl), ("head_labels", nh)):
            val = getattr(self, name)
            if val is None:
                setattr(self, name, [str(i) for i in range(n)])
            elif len(val) != n:
                raise ValueError(f"{name} has {len(val)} labels; expected {n}")
            else:
                setattr(self, name, [str(x) for x in val])
        if self.level not in ("tokens", "words"):
            raise ValueError(f"level must be 'tokens' or 'words'; got {self.level!r}")

    # ---- display --------------------------------------------------------------------------
    def __repr__(self) -> str:
        nl, nh, lq, lk = self.weights.shape
        what = "rollout" if self.kind == "rollout" else (
            f"{nl} layer{'s' * (nl != 1)} x {nh} head{'s' * (nh != 1)}")

        def text(toks: list[str]) -> str:
            t = " ".join(toks)
            return repr(t if len(t) <= 40 else t[:40].rsplit(" ", 1)[0] + " ...")

        unit = "words" if self.level == "words" else "tokens"
        if self.is_self:
            size = f"{lq} {unit}: {text(self.tokens)}"
        else:
            size = f"{lq} x {lk} {unit}: {text(self.tokens)} -> {text(self.keys)}"
        extra = "".join((f", model {self.model!r}" if self.model else "",
                         ", with q/k/v" if self.has_qkv else ""))
        return f"AttentionMap({what}, {size}{extra})"

    def _repr_html_(self) -> str:
        """The interactive viewer in a notebook (Jupyter, VS Code): head view, model view
        and step by step, self-contained; see :func:`qkv.viz.html.fragment`."""
        from .viz import html  # the viewer sits above this module; imported on use only

        return html.fragment(self)

    # ---- shape ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.weights.shape[0]

    @property
    def num_heads(self) -> int:
        return self.weights.shape[1]

    @property
    def keys(self) -> list[str]:
        """The key units (columns): ``key_tokens``, or ``tokens`` for self-attention."""
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def is_self(self) -> bool:
        return self.key_tokens is None

    @property
    def query_special(self) -> list[bool]:
        return self.special or [False] * len(self.tokens)

    @property
    def keys_special(self) -> list[bool]:
        """Per key unit: special or not (for self-attention, the query flags)."""
        if self.key_special is not None:
            return self.key_special
        if self.is_self and self.special is not None:
            return self.special
        return [False] * len(self.keys)

    @property
    def has_qkv(self) -> bool:
        return self.q is not None and self.k is not None and self.v is not None

    def layer_name(self, layer: int) -> str:
        """``"layer 3"`` for a numeric label, the label itself otherwise (``"decoder 0"``)."""
        lab = self.layer_labels[layer]
        return f"layer {lab}" if lab.isdigit() else lab

    def head_name(self, head: int) -> str:
        lab = self.head_labels[head]
        return f"head {lab}" if lab.isdigit() else lab

    def check_head(self, layer: int, head: int) -> None:
        """ValueError naming the valid range when ``layer``/``head`` do not exist."""
        for name, val, n in (("layer", layer, self.num_layers), ("head", head, self.num_heads)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or \
                    not 0 <= val < n:
                raise ValueError(f"{name} {val!r} is out of range: this map has {n} "
                                 f"{name}s, numbered 0 to {n - 1}")

    def head(self, layer: int, head: int) -> np.ndarray:
        """The weights ``(Lq, Lk)`` of one head."""
        self.check_head(layer, head)
        return self.weights[layer, head]

    # ---- finding a unit -------------------------------------------------------------------
    def find(self, word: str) -> int:
        """The query unit of ``word``: a unit whose text equals it (case-insensitive,
        ignoring punctuation around it), or the first token of the matching word.
        ``"the:2"`` picks the second match (``":N"`` counts from 1; a text that itself
        contains ``":N"``, such as ``"10:30"``, is matched as written first).

        Raises ValueError listing the words of the map when there is none, or when the
        text has fewer than N matches.
        """
        if not isinstance(word, str):
            raise TypeError(f"word= must be a string; got {type(word).__name__}")
        hits = self._matches(word)
        nth = 1
        base, sep, count = word.rpartition(":")
        if not hits and sep and base.strip() and count.strip().isdigit():
            word, nth = base, int(count)
            if nth < 1:
                raise ValueError(f"word={base + ':' + count!r}: occurrences count from 1 "
                                 f"({base}:1 is the first)")
            hits = self._matches(word)
        if not _norm(word):
            raise ValueError(f"word={word!r} has no letters or digits to look for")
        known = self.words if self.words is not None else [
            t for t, s in zip(self.tokens, self.query_special, strict=True) if not s]
        if not hits:
            raise ValueError(f"the word {word!r} is not in the text; its words are: "
                             + " ".join(known))
        if nth > len(hits):
            times = "once" if len(hits) == 1 else f"{len(hits)} times"
            raise ValueError(f"the word {word!r} appears {times} in the text, so there is no "
                             f"occurrence {nth}; ask for {word}:1 to {word}:{len(hits)}. "
                             "Its words are: " + " ".join(known))
        return hits[nth - 1]

    def _matches(self, word: str) -> list[int]:
        """Every query unit matching ``word`` in text order (see :meth:`find`)."""
        want = _norm(word)
        if not want:
            return []
        hits = [i for i, t in enumerate(self.tokens)
                if _norm(t) == want and not self.query_special[i]]
        if self.words is not None:
            hits += [a for w, (a, _b) in zip(self.words, self.word_spans, strict=True)
                     if _norm(w) == want and a not in hits]
        return sorted(hits)

    def top(self, layer: int, head: int, index: int, k: int = 3) -> list[tuple[int, float]]:
        """The ``k`` keys query ``index`` attends to most in one head: (key, weight)."""
        row = self.head(layer, head)[index]
        order = np.argsort(-row, kind="stable")[:k]
        return [(int(j), float(row[j])) for j in order]

    # ---- views ----------------------------------------------------------------------------
    def units(self, *, words: bool = False, hide_special: bool = False) -> list[list[int]]:
        """The query tokens behind each row of the view ``merge_words()`` (with
        ``words``) then ``drop_special()`` (with ``hide_special``) of this map."""
        n = len(self.tokens)
        groups = (_groups(n, self.tokens, self.words, self.word_spans)[0]
                  if words and self.word_spans is not None else [[i] for i in range(n)])
        if hide_special:
            sp = self.query_special
            groups = [g for g in groups if not all(sp[i] for i in g)]
        return groups

    def merge_words(self) -> AttentionMap:
        """Subword pieces merged into words (Clark et al. 2019): attention *to* a word is
        the sum over its pieces, attention *from* a word the mean over its pieces, so rows
        still sum to 1. Tokens outside every word (special tokens) stay as they are.
        A map without word spans is returned unchanged.
        """
        if self.word_spans is None and self.key_word_spans is None:
            return self
        q_groups, q_labels = _groups(len(self.tokens), self.tokens, self.words,
                                     self.word_spans)
        if self.is_self:
            k_groups, k_labels = q_groups, None
        else:
            k_groups, k_labels = _groups(len(self.keys), self.keys, self.key_words,
                                         self.key_word_spans)
        # Units are contiguous, ordered token ranges: reduce over each range's start.
        q0 = np.array([g[0] for g in q_groups])
        k0 = np.array([g[0] for g in k_groups])
        sizes = np.array([len(g) for g in q_groups], dtype=np.float32)
        w = np.add.reduceat(self.weights, k0, axis=-1)  # (L, H, Lq, Uk): sum over pieces
        w = np.add.reduceat(w, q0, axis=-2) / sizes[:, None]  # (L, H, Uq, Uk): mean
        allowed = None
        if self.allowed is not None:
            a = np.add.reduceat(self.allowed.astype(np.int32), k0, axis=-1)  # (Lq, Uk)
            allowed = np.add.reduceat(a, q0, axis=-2) > 0  # (Uq, Uk): any piece sees any
        qs = self.query_special
        ks = self.keys_special
        return replace(
            self, tokens=q_labels, weights=w, key_tokens=k_labels,
            special=[all(qs[i] for i in g) for g in q_groups] if self.special else None,
            key_special=([all(ks[i] for i in g) for g in k_groups]
                         if self.key_special else None),
            words=None, word_spans=None, key_words=None, key_word_spans=None,
            q=None, k=None, v=None, scale=None, allowed=allowed, level="words",
        )

    def drop_special(self) -> AttentionMap:
        """Without special tokens (rows and columns), each row renormalised to sum to 1
        over the keys that remain (a row with no weight left stays 0). Per-head q/k/v are
        dropped: the renormalised weights are no longer what the model applied.
        """
        keep_q = [i for i, s in enumerate(self.query_special) if not s]
        keep_k = [j for j, s in enumerate(self.keys_special) if not s]
        if len(keep_q) == len(self.tokens) and len(keep_k) == len(self.keys):
            return self
        if not keep_q or not keep_k:
            raise ValueError("every token of this map is special; nothing would be left "
                             "after hiding [CLS]/[SEP]")
        w = self.weights[:, :, keep_q][:, :, :, keep_k]  # (L, H, Lq', Lk')
        s = w.sum(-1, keepdims=True)
        w = np.where(s > 0, w / np.where(s > 0, s, 1), 0).astype(np.float32)
        allowed = None if self.allowed is None else self.allowed[np.ix_(keep_q, keep_k)]
        return replace(
            self, tokens=[self.tokens[i] for i in keep_q], weights=w,
            key_tokens=None if self.is_self else [self.keys[j] for j in keep_k],
            special=[False] * len(keep_q) if self.special is not None else None,
            key_special=[False] * len(keep_k) if self.key_special is not None else None,
            **_reindex(self.words, self.word_spans, keep_q, ""),
            **_reindex(self.key_words, self.key_word_spans, keep_k, "key_"),
            q=None, k=None, v=None, scale=None, allowed=allowed,
        )

    def rollout(self) -> AttentionMap:
        """Attention rollout (Abnar & Zuidema 2020) of a self-attention map.

        Per layer: heads averaged, ``A = 0.5 * A + 0.5 * I`` (the residual connection),
        rows renormalised; then the product over layers ``R = A_last @ ... @ A_first``.
        ``R[i, j]`` estimates how much of input token ``j`` reaches position ``i`` at the
        top. Returns a map with one layer and one head labelled ``rollout``.
        """
        if not self.is_self:
            raise ValueError("rollout needs self-attention (queries and keys the same "
                             "tokens); this map is cross-attention")
        n = len(self.tokens)
        eye = np.eye(n, dtype=np.float64)
        r = eye
        for layer in self.weights.astype(np.float64):  # (H, L, L) per layer, first to last
            a = 0.5 * layer.mean(0) + 0.5 * eye  # (L, L)
            a = a / a.sum(-1, keepdims=True)  # rows sum to 1 (the identity keeps them > 0)
            r = a @ r  # (L, L)
        return replace(
            self, weights=r[None, None].astype(np.float32), q=None, k=None, v=None,
            scale=None, allowed=None, layer_labels=["rollout"], head_labels=["mean"],
            kind="rollout",
        )

    # ---- export ---------------------------------------------------------------------------
    def to_json(self, *, arrays: bool = True) -> dict:
        """A JSON-ready dict (schema ``qkv.attention_map/1``): every field, arrays as
        nested lists (left out with ``arrays=False``), plus ``schema`` and ``shape``."""
        d = {"schema": SCHEMA, "shape": list(self.weights.shape)}
        for f in fields(self):
            if not arrays and f.name in _ARRAYS:
                continue
            val = getattr(self, f.name)
            if isinstance(val, np.ndarray):
                val = val.tolist()
            elif f.name.endswith("word_spans") and val is not None:
                val = [list(s) for s in val]
            d[f.name] = val
        return d

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")
        return path

    def save_npz(self, path: str | Path) -> Path:
        """Arrays as float32/bool entries (``weights``, and ``q``/``k``/``v``/``allowed``
        when present) and the rest as JSON text under ``meta``; :meth:`load_npz` reads it
        back. Loads with ``np.load(path)`` (no pickle)."""
        path = Path(path)
        arrays = {n: getattr(self, n) for n in _ARRAYS if getattr(self, n) is not None}
        meta = self.to_json(arrays=False)
        with path.open("wb") as fh:
            np.savez_compressed(fh, meta=np.array(json.dumps(meta, ensure_ascii=False)),
                                **arrays)
        return path

    @classmethod
    def from_json(cls, d: dict) -> AttentionMap:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a qkv attention map: schema {d.get('schema')!r}, expected "
                             f"{SCHEMA!r}")
        kw = {f.name: d.get(f.name) for f in fields(cls) if f.name in d}
        for name in _ARRAYS:
            if kw.get(name) is not None:
                kw[name] = np.asarray(kw[name], dtype=bool if name == "allowed" else np.float32)
        return cls(**kw)

    @classmethod
    def load_npz(cls, path: str | Path) -> AttentionMap:
        with np.load(path, allow_pickle=False) as z:
            d = json.loads(str(z["meta"]))
            for name in _ARRAYS:
                d[name] = z[name] if name in z.files else None
        return cls.from_json(d)


def _norm(s: str) -> str:
    return s.strip().strip(string.punctuation + "“”‘’«»").lower()


def _groups(n: int, tokens: list[str], words: list[str] | None,
            spans: list[tuple[int, int]] | None) -> tuple[list[list[int]], list[str]]:
    """Units in order: each word's token range, and every token outside a word alone."""
    groups, labels = [], []
    starts = {} if spans is None else {a: (b, w) for (a, b), w in zip(spans, words, strict=True)}
    i = 0
    while i < n:
        if i in starts:
            b, w = starts[i]
            groups.append(list(range(i, b)))
            labels.append(w)
            i = b
        else:
            groups.append([i])
            labels.append(tokens[i])
            i += 1
    return groups, labels


def _reindex(words, spans, keep: list[int], side: str) -> dict:
    """Words and spans after keeping only the token indices ``keep`` (a word whose
    tokens are all gone is dropped)."""
    if spans is None:
        return {}
    new = {old: i for i, old in enumerate(keep)}
    out_w, out_s = [], []
    for w, (a, b) in zip(words, spans, strict=True):
        kept = [new[t] for t in range(a, b) if t in new]
        if kept:
            out_w.append(w)
            out_s.append((kept[0], kept[-1] + 1))
    return {side + "words": out_w, side + "word_spans": out_s}
