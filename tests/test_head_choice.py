"""The default head (qkv.head_choice): the rule on hand-made maps, and on the real model
the head it picks for the README sentence."""

from __future__ import annotations

import numpy as np
import pytest

from bert_model import sentence_map
from qkv.attention_map import AttentionMap
from qkv.head_choice import choose_head, eligible_keys


def flat_map(tokens, layers=2, heads=3, special=None, **kw):
    """Every row spread evenly; tests then put weight where they want it."""
    n = len(tokens)
    w = np.full((layers, heads, n, n), 1.0 / n)
    return AttentionMap(tokens=tokens, weights=w, special=special, **kw)


def put(amap, layer, head, i, weights: dict):
    """Row i of one head: the given keys get their weights, the rest share what is left."""
    row = np.zeros(len(amap.keys))
    rest = [j for j in range(len(amap.keys)) if j not in weights]
    row[rest] = (1 - sum(weights.values())) / len(rest)
    for j, x in weights.items():
        row[j] = x
    amap.weights[layer, head, i] = row


TOKS = ["[CLS]", "the", "dog", "saw", "a", "cat", "and", "it", "ran", ".", "[SEP]"]
SPECIAL = [True] + [False] * 9 + [True]


def test_self_neighbours_special_and_punctuation_are_not_links():
    m = flat_map(TOKS, special=SPECIAL)
    it = TOKS.index("it")
    assert eligible_keys(m, it) == [1, 2, 3, 4, 5]  # not and/it/ran, '.', [CLS], [SEP]
    put(m, 0, 0, it, {it: 0.9})  # itself
    put(m, 0, 1, it, {it - 1: 0.9})  # previous token
    put(m, 0, 2, it, {it + 1: 0.9})  # next token
    put(m, 1, 0, it, {0: 0.9})  # [CLS]
    put(m, 1, 1, it, {9: 0.9})  # '.'
    put(m, 1, 2, it, {TOKS.index("dog"): 0.3})  # a real, far link
    c = choose_head(m, it)
    assert (c.layer, c.head, c.key, c.rule) == (1, 2, TOKS.index("dog"), "far")
    assert abs(c.weight - 0.3) < 1e-6
    assert c.reason.startswith("layer 1, head 2: 'it' -> 'dog' 30%, the strongest link")
    assert "not itself, a neighbour or [CLS]/[SEP]" in c.reason


def test_far_words_count_more_and_ties_go_to_the_weight_then_the_first_head():
    m = flat_map(TOKS, special=SPECIAL)
    it = TOKS.index("it")
    put(m, 0, 0, it, {it - 2: 0.5})  # 'cat', distance 2: 0.5 * log2(3) = 0.79
    put(m, 0, 1, it, {it - 5: 0.35})  # 'dog', distance 5: 0.35 * log2(6) = 0.90
    assert (choose_head(m, it).layer, choose_head(m, it).head) == (0, 1)
    assert choose_head(m, it).score == pytest.approx(0.35 * np.log2(6), rel=1e-6)
    put(m, 1, 2, it, {it - 5: 0.35})  # the same link again, in a later head
    assert (choose_head(m, it).layer, choose_head(m, it).head) == (0, 1)
    # layers=/heads= restrict the search
    c = choose_head(m, it, layers=[0], heads=[0])
    assert (c.layer, c.head, c.key) == (0, 0, it - 2)


def test_causal_decoder_map_ignores_the_diagonal():
    n = 8
    rng = np.random.default_rng(0)
    allowed = np.tril(np.ones((n, n), dtype=bool))
    w = np.where(allowed, rng.random((1, 4, n, n)), 0)
    w[:, :, np.arange(n), np.arange(n)] = 50  # every head mostly looks at itself
    w /= w.sum(-1, keepdims=True)
    m = AttentionMap(tokens=[f"w{i}" for i in range(n)], weights=w, allowed=allowed)
    c = choose_head(m, 6)
    assert c.key <= 4  # before itself and its neighbour
    expect = max((w[0, h, 6, j] * np.log2(1 + 6 - j), h) for h in range(4) for j in range(5))
    assert c.head == expect[1]


def test_fallbacks_and_cross_attention():
    m = flat_map(["[CLS]", "hello", "world", "[SEP]"], special=[True, False, False, True])
    c = choose_head(m, 2)
    assert c.rule == "neighbour" and m.keys[c.key] == "hello"
    m = flat_map(["[CLS]", "hello", "[SEP]"], special=[True, False, True])
    assert choose_head(m, 1).rule == "other"
    m = flat_map(["x"], layers=1, heads=1)
    assert choose_head(m, 0).rule == "any"
    rng = np.random.default_rng(2)
    w = rng.random((1, 2, 3, 4))
    w /= w.sum(-1, keepdims=True)
    x = AttentionMap(tokens=["<s>", "a", "b"], weights=w, key_tokens=["a", "b", "c", "</s>"],
                     key_special=[False, False, False, True])
    c = choose_head(x, 1)  # no self, no distance: the weight alone, never </s>
    assert c.key != 3 and c.score == c.weight == pytest.approx(w[:, :, 1, :3].max(), rel=1e-6)
    assert "key that is not punctuation" in c.reason


def test_bad_arguments():
    m = flat_map(TOKS, special=SPECIAL)
    with pytest.raises(ValueError, match="query=11 is out of range"):
        choose_head(m, 11)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        choose_head(m, 3, layers=[5])
    with pytest.raises(ValueError, match="at least one"):
        choose_head(m, 3, heads=[])


def test_default_sentence_links_it_to_the_animal():
    """On the real model, 'it' in the README sentence: the head shown links it to
    'animal', 6 words back (a plain max weight would pick 'it' -> 'tired')."""
    for m in (sentence_map().merge_words(), sentence_map()):
        it = m.find("it")
        c = choose_head(m, it)
        assert m.keys[c.key] == "animal" and c.weight > 0.5, c.reason
        # ... and it really is that head's strongest link outside the ignored keys
        row = m.weights[c.layer, c.head, it]
        assert row[eligible_keys(m, it)].max() == row[c.key]
