"""Which head to show first: the one where a word's strongest link reaches another word.

Many heads of a trained model do something dull for most words: look at the word itself,
at the previous or next token, at ``[CLS]``/``[SEP]`` or at punctuation. A reader wants
the head where the chosen word links to *another word*, the further away the better.
:func:`choose_head` makes that choice with one rule, the same for the CLI, the HTML page
and notebooks, and says why in one line.

The rule, for query ``i`` of a map and every allowed (layer, head):

* eligible keys ``j``: not special (``[CLS]``, ``[SEP]``), containing a letter or digit
  (no punctuation), and for self-attention not ``i`` itself and not a neighbour
  (``|i - j| <= 1``; this also ignores the diagonal of causal decoder maps);
* score of the head: ``max_j  weights[i, j] * log2(1 + |i - j|)`` over the eligible keys:
  the weight, favouring distant words (a neighbour at distance 2 counts 1.58x, one at
  distance 7 counts 3x). For cross-attention, where queries and keys are different
  tokens, the score is the weight alone;
* the head with the highest score wins; ties go to the larger weight, then to the
  earlier layer and head.

When no key is eligible (a two-word text), neighbours become eligible; when still none,
any key but the word itself (``[CLS]`` included), and finally any key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only annotations: the rule reads weights and tokens of any map
    from .attention_map import AttentionMap

__all__ = ["PRONOUNS", "HeadChoice", "choose_head", "default_query", "eligible_keys"]

PRONOUNS = frozenset((  # personal, possessive and reflexive English pronouns
    "i", "me", "my", "mine", "myself", "you", "your", "yours", "yourself", "yourselves",
    "he", "him", "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself",
    "we", "us", "our", "ours", "ourselves", "they", "them", "their", "theirs", "themselves",
))


@dataclass(frozen=True)
class HeadChoice:
    """The head :func:`choose_head` picked and why.

    Attributes:
        layer, head: the head, as indices into the map.
        query: the query unit (row) the choice is for.
        key: the key unit (column) of its strongest eligible link.
        weight: ``weights[layer, head, query, key]``.
        score: the weight times ``log2(1 + distance)`` (self-attention), or the weight.
        rule: which keys were eligible: ``"far"`` (the normal rule), ``"neighbour"``,
            ``"other"`` or ``"any"`` (the fallbacks, see the module).
        reason: one line for a person, e.g. ``"layer 5, head 11: 'it' -> 'animal' 65%, ..."``.
    """

    layer: int
    head: int
    query: int
    key: int
    weight: float
    score: float
    rule: str
    reason: str

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "query": self.query,
                "key": self.key, "weight": self.weight, "score": self.score,
                "rule": self.rule, "reason": self.reason}


_RULES = {
    "far": "the strongest link to a word that is not itself, a neighbour or [CLS]/[SEP] "
           "(far words count more)",
    "far-cross": "the strongest link to a key that is not punctuation or [CLS]/[SEP]",
    "neighbour": "the strongest link to a word that is not itself or [CLS]/[SEP] (the text "
                 "has no word further away)",
    "other": "the strongest link to another token (the text has no other word)",
    "any": "the strongest link (the map has no other key to look at)",
}


def eligible_keys(amap: AttentionMap, query: int, *, rule: str = "far") -> list[int]:
    """The key units (columns) the ``rule`` lets query ``query`` link to, in order."""
    keys, special = amap.keys, amap.keys_special
    out = []
    for j, tok in enumerate(keys):
        if rule == "any":
            out.append(j)
            continue
        if amap.is_self and j == query:
            continue
        if rule == "other":
            out.append(j)
            continue
        if special[j] or not any(c.isalnum() for c in tok):
            continue
        if rule == "far" and amap.is_self and abs(j - query) <= 1:
            continue
        out.append(j)
    return out


def choose_head(amap: AttentionMap, query: int, *, layers=None, heads=None) -> HeadChoice:
    """The (layer, head) whose strongest link from query unit ``query`` goes furthest to
    another word (the rule is in this module's docstring), among ``layers`` and ``heads``
    (default: all).

    Raises ValueError when ``query`` is not a row of the map or a layer/head does not exist.
    """
    if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or \
            not 0 <= query < len(amap.tokens):
        raise ValueError(f"query={query!r} is out of range: the map has {len(amap.tokens)} "
                         f"query units, numbered 0 to {len(amap.tokens) - 1}")
    layers = list(range(amap.num_layers)) if layers is None else list(layers)
    heads = list(range(amap.num_heads)) if heads is None else list(heads)
    if not layers or not heads:
        raise ValueError("layers= and heads= must each name at least one; got an empty list")
    for lay in layers:
        for h in heads:
            amap.check_head(lay, h)
    for rule in ("far", "neighbour", "other", "any"):
        keys = eligible_keys(amap, query, rule=rule)
        if keys:
            break
    keys = np.asarray(keys)
    far = (np.log2(1.0 + np.abs(keys - query)) if amap.is_self and rule in ("far", "neighbour")
           else np.ones(len(keys)))
    best = None
    for lay in layers:
        for h in heads:
            w = amap.weights[lay, h, query, keys].astype(np.float64)  # (eligible keys,)
            s = w * far
            top = int(np.lexsort((-w, -s))[0])  # highest score, then highest weight
            cand = (float(s[top]), float(w[top]), -lay, -h)
            if best is None or cand > best[0]:
                best = (cand, lay, h, int(keys[top]))
    (score, weight, _, _), lay, h, key = best
    name = rule if rule != "far" or amap.is_self else "far-cross"
    reason = (f"{amap.layer_name(lay)}, {amap.head_name(h)}: '{amap.tokens[query]}' -> "
              f"'{amap.keys[key]}' {_pct(weight)}, {_RULES[name]}")
    return HeadChoice(layer=lay, head=h, query=int(query), key=key, weight=weight,
                      score=score, rule=rule, reason=reason)


def _pct(w: float) -> str:
    return f"{100 * w:.0f}%" if w >= 0.095 or w == 0 else f"{100 * w:.1f}%"


def default_query(amap: AttentionMap) -> int:
    """The query unit worth looking at first (what ``qkv explain`` shows without
    ``word=``): the English pronoun that puts the most weight on other, non-special units
    (averaged over every layer and head); without a pronoun, the last unit with a letter
    or digit."""
    special = amap.query_special
    key_special = amap.keys_special
    best, best_score = None, -1.0
    for i, tok in enumerate(amap.tokens):
        if special[i] or tok.strip(".,;:!?\"'()").lower() not in PRONOUNS:
            continue
        others = [j for j in range(len(amap.keys)) if j != i and not key_special[j]]
        score = float(amap.weights[:, :, i, others].sum(-1).mean()) if others else 0.0
        if score > best_score:
            best, best_score = i, score
    if best is not None:
        return best
    for i in range(len(amap.tokens) - 1, -1, -1):
        if not special[i] and any(c.isalnum() for c in amap.tokens[i]):
            return i
    return len(amap.tokens) - 1
