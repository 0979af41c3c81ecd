"""AttentionMap (views, rollout, export) and the viewers that draw it: terminal, PNG/SVG,
HTML (rendered here; opened in a browser by test_html_browser.py)."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from rich.console import Console

from bert_model import sentence_map
from qkv.attention_map import SCHEMA, AttentionMap
from qkv.viz import html, png, terminal

#: Maps store weights in float32: a weight <= 1 is off by at most EPS32 / 2 per rounding, so
#: a result of n roundings (a sum of n pieces, a division) is within n * EPS32 of exact.
EPS32 = float(np.finfo(np.float32).eps)


def random_map(lq=5, lk=None, *, layers=2, heads=3, seed=0, **kw):
    """A map with random rows that sum to 1."""
    rng = np.random.default_rng(seed)
    lk = lq if lk is None else lk
    w = rng.random((layers, heads, lq, lk)) ** 3
    w /= w.sum(-1, keepdims=True)
    toks = kw.pop("tokens", [f"t{i}" for i in range(lq)])
    return AttentionMap(tokens=toks, weights=w, **kw)


# ---- a hand-written validator of the JSON schema qkv.attention_map/1 -----------------------
def validate(d: dict) -> None:
    """Raise AssertionError unless ``d`` follows the schema (types, lengths, shapes)."""
    assert d["schema"] == SCHEMA
    nl, nh, lq, lk = d["shape"]
    assert all(isinstance(x, int) and x > 0 for x in d["shape"])

    def strings(x, n):
        assert isinstance(x, list) and len(x) == n and all(isinstance(s, str) for s in x)

    def bools(x, n):
        assert x is None or (len(x) == n and all(isinstance(b, bool) for b in x))

    def array(x, shape):
        a = np.asarray(x, dtype=np.float64)
        assert a.shape == shape and np.isfinite(a).all()
        return a

    strings(d["tokens"], lq)
    if d["key_tokens"] is not None:
        strings(d["key_tokens"], lk)
    else:
        assert lq == lk
    bools(d["special"], lq)
    bools(d["key_special"], lk)
    w = array(d["weights"], (nl, nh, lq, lk))
    assert ((w >= 0) & (w <= 1 + 1e-6)).all()
    for side, n in (("", lq), ("key_", lk)):
        words, spans = d[side + "words"], d[side + "word_spans"]
        assert (words is None) == (spans is None)
        if spans is not None:
            strings(words, len(spans))
            assert all(0 <= a < b <= n for a, b in spans)
    if d["q"] is not None:
        dq = np.asarray(d["q"]).shape[-1]
        array(d["q"], (nl, nh, lq, dq))
        array(d["k"], (nl, nh, lk, dq))
        assert np.asarray(d["v"]).shape[:3] == (nl, nh, lk)
        assert isinstance(d["scale"], float)
    strings(d["layer_labels"], nl)
    strings(d["head_labels"], nh)
    assert d["level"] in ("tokens", "words") and d["kind"] in ("attention", "rollout")
    assert isinstance(d["model"], str) and isinstance(d["title"], str)


# ---- views ----------------------------------------------------------------------------------
def test_merge_words_sums_columns_and_averages_rows():
    m = random_map(5, special=[True, False, False, False, True], words=["ab", "c"],
                   word_spans=[(1, 3), (3, 4)])
    w = m.merge_words()
    assert w.tokens == ["t0", "ab", "c", "t4"] and w.level == "words"
    assert w.special == [True, False, False, True]
    x = m.weights
    # row "ab" = mean of rows 1, 2; column "ab" = sum of columns 1, 2
    want = (x[:, :, 1, 1] + x[:, :, 1, 2] + x[:, :, 2, 1] + x[:, :, 2, 2]) / 2
    assert np.allclose(w.weights[:, :, 1, 1], want, rtol=0, atol=4 * EPS32)  # 4 pieces
    assert np.array_equal(w.weights[:, :, 0, 2], x[:, :, 0, 3])  # "c": one piece, copied
    assert np.array_equal(w.weights[:, :, 0, 3], x[:, :, 0, 4])  # "t4"
    assert np.allclose(w.weights.sum(-1), 1, rtol=0, atol=2 * x.shape[-1] * EPS32)
    assert w.q is None and m.units(words=True) == [[0], [1, 2], [3], [4]]


def test_merge_and_drop_carry_the_allowed_mask():
    allowed = np.tril(np.ones((4, 4), bool))  # causal: query i sees keys 0..i
    w = np.where(allowed, 1.0, 0.0)[None, None]
    w = w / w.sum(-1, keepdims=True)
    m = AttentionMap(tokens=list("abcd"), weights=w, allowed=allowed, words=["bc"],
                     word_spans=[(1, 3)], special=[True, False, False, False])
    merged = m.merge_words()
    # unit "bc" may see a key unit if any of its pieces may: b sees a, b; c sees a, b, c
    assert merged.allowed.tolist() == [[True, False, False], [True, True, False],
                                       [True, True, True]]
    assert merged.drop_special().allowed.tolist() == [[True, False], [True, True]]


def test_drop_special_renormalises_rows():
    m = random_map(5, special=[True, False, False, False, True], words=["ab", "c"],
                   word_spans=[(1, 3), (3, 4)])
    d = m.drop_special()
    assert d.tokens == ["t1", "t2", "t3"] and d.word_spans == [(0, 2), (2, 3)]
    x = m.weights[:, :, 1:4, 1:4]
    assert np.allclose(d.weights, x / x.sum(-1, keepdims=True), rtol=0,
                       atol=(x.shape[-1] + 1) * EPS32)  # a sum of 3, then a division
    assert m.units(hide_special=True) == [[1], [2], [3]]
    both = m.merge_words().drop_special()
    assert both.tokens == ["ab", "c"]
    assert m.units(words=True, hide_special=True) == [[1, 2], [3]]


def test_drop_special_keeps_zero_rows_zero():
    w = np.zeros((1, 1, 3, 3))
    w[0, 0, :, 0] = 1.0  # every row entirely on the special token
    m = AttentionMap(tokens=["[CLS]", "a", "b"], weights=w, special=[True, False, False])
    assert (m.drop_special().weights == 0).all()


def rollout_by_hand(weights):
    n = weights.shape[-1]
    r = np.eye(n)
    for layer in weights:
        a = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                a[i, j] = 0.5 * np.mean(layer[:, i, j]) + 0.5 * (i == j)
            a[i] /= a[i].sum()
        r = a @ r
    return r


def test_rollout_is_the_product_of_residual_averaged_layers():
    m = random_map(6, layers=3, heads=4)
    r = m.rollout()
    assert r.weights.shape == (1, 1, 6, 6) and r.kind == "rollout"
    assert np.allclose(r.weights[0, 0], rollout_by_hand(m.weights.astype(np.float64)),
                       atol=1e-6)
    assert np.allclose(r.weights.sum(-1), 1, atol=1e-6)
    eye = AttentionMap(tokens=list("abc"), weights=np.eye(3)[None, None])
    assert np.allclose(eye.rollout().weights[0, 0], np.eye(3))


def test_cross_attention_maps():
    m = random_map(3, 4, key_tokens=["k0", "k1", "k2", "k3"], key_special=[False] * 3 + [True],
                   key_words=["k12"], key_word_spans=[(1, 3)])
    merged = m.merge_words()
    assert merged.tokens == m.tokens and merged.keys == ["k0", "k12", "k3"]
    assert np.allclose(merged.weights[..., 1], m.weights[..., 1] + m.weights[..., 2])
    dropped = m.drop_special()
    assert dropped.keys == ["k0", "k1", "k2"] and dropped.tokens == m.tokens
    with pytest.raises(ValueError, match="cross-attention"):
        m.rollout()


@pytest.mark.parametrize("kw, msg", [
    ({"tokens": ["a"]}, "1 tokens for weights with Lq=2"),
    ({"key_tokens": ["x"]}, "1 key_tokens"),
    ({"special": [True]}, "special has 1 flags"),
    ({"words": ["a"], "word_spans": [(1, 0)]}, "word_spans must be increasing"),
    ({"words": ["a"]}, "go together"),
    ({"q": np.zeros((1, 1, 2, 4)), "k": np.zeros((1, 1, 2, 5))}, "q has 4 dims"),
    ({"head_labels": ["x", "y"]}, "head_labels has 2 labels"),
])
def test_map_validation(kw, msg):
    base = {"tokens": ["a", "b"], "weights": np.full((1, 1, 2, 2), 0.5)}
    with pytest.raises(ValueError, match=msg):
        AttentionMap(**{**base, **kw})


def test_find_and_check_head():
    m = sentence_map()
    assert m.tokens[m.find("It")] == "it"
    assert m.find("didn't") == m.word_spans[m.words.index("didn't")][0]
    with pytest.raises(ValueError, match="its words are: The animal didn't"):
        m.find("zebra")
    with pytest.raises(ValueError, match="numbered 0 to 11"):
        m.head(0, 12)


def test_find_nth_occurrence_and_literal_colons():
    m = random_map(6, tokens=["[CLS]", "at", "10:30", "at", "x:2", "[SEP]"],
                   special=[True, False, False, False, False, True])
    assert (m.find("at"), m.find("at:1"), m.find("at:2")) == (1, 1, 3)
    assert m.find("10:30") == 2 and m.find("x:2") == 4  # text as written wins
    assert m.find("x:2:1") == 4
    with pytest.raises(ValueError, match=r"appears 2 times .* at:1 to at:2"):
        m.find("at:3")
    with pytest.raises(ValueError, match="word='!!' has no letters"):
        m.find("!!")
    with pytest.raises(TypeError, match="must be a string"):
        m.find(3)


# ---- export ---------------------------------------------------------------------------------
def test_json_and_npz_round_trip(tmp_path):
    m = sentence_map()
    for view in (m, m.merge_words(), m.merge_words().drop_special(), m.rollout()):
        d = json.loads(json.dumps(view.to_json()))
        validate(d)
        back = AttentionMap.from_json(d)
        assert back.tokens == view.tokens and np.array_equal(back.weights, view.weights)
    m.save_json(tmp_path / "m.json")
    validate(json.loads((tmp_path / "m.json").read_text()))
    m.save_npz(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert z["weights"].shape == (6, 12, 15, 15) and z["weights"].dtype == np.float32
        assert z["q"].shape == (6, 12, 15, 32)
    back = AttentionMap.load_npz(tmp_path / "m.npz")
    assert back.word_spans == m.word_spans and np.array_equal(back.v, m.v)
    with pytest.raises(ValueError, match="not a qkv attention map"):
        AttentionMap.from_json({"schema": "other"})


def test_validator_catches_a_bad_shape():
    d = sentence_map().to_json()
    d["shape"] = [6, 12, 15, 14]
    with pytest.raises(AssertionError):
        validate(d)


# ---- terminal -------------------------------------------------------------------------------
def render(renderable, *, colour: bool, width: int = 100) -> str:
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=colour,
                  color_system="truecolor" if colour else None)
    con.print(renderable)
    return buf.getvalue()


def test_terminal_heatmap_plain_and_colour():
    m = sentence_map().merge_words()
    it = m.find("it")
    plain = render(terminal.heatmap(m, 0, 2, highlight=it), colour=False)
    assert "\x1b[" not in plain
    row = next(line for line in plain.splitlines() if line.startswith("it "))
    cells = row.split()[1:-1]  # the weights in %, then the "<" marker
    want = np.round(100 * m.weights[0, 2, it]).astype(int)
    assert [int(c) if c != "." else 0 for c in cells] == list(want)
    coloured = render(terminal.heatmap(m, 0, 2), colour=True)
    assert "\x1b[" in coloured and "48;2;" in coloured  # truecolor backgrounds
    no_color = io.StringIO()
    Console(file=no_color, width=100, force_terminal=True, no_color=True).print(
        terminal.heatmap(m, 0, 2))
    assert "48;2;" not in no_color.getvalue()


def test_terminal_heatmap_narrow_console_crops_columns():
    m = random_map(40)
    out = render(terminal.heatmap(m, 0, 0), colour=False, width=30)
    assert "showing the first 26 of 40" in " ".join(out.split())
    assert max(len(line) for line in out.splitlines()) <= 30


def test_terminal_heatmap_explains_overflow_cells():
    m = random_map(30)
    m.weights[0, 0, 0] = 0
    m.weights[0, 0, 0, 3] = 1.0  # 100: too wide for 3-character cells
    m.weights[0, 1] = 1 / 30  # every weight 3%: fits any cell
    wide = " ".join(render(terminal.heatmap(m, 0, 0), colour=False, width=200).split())
    assert "@@" not in wide and "= 100%" not in wide
    mid = " ".join(render(terminal.heatmap(m, 0, 0), colour=False, width=100).split())
    row = next(line for line in mid.split("t0 ")[1:] if "@@" in line)
    assert row and "@@ = 100% (the number does not fit the column" in mid
    assert "@@ =" not in render(terminal.heatmap(m, 0, 1), colour=False, width=100)
    narrow = " ".join(render(terminal.heatmap(m, 0, 0), colour=False, width=60).split())
    assert "one character per cell: '.:-=+*#%@' from 0 to 100%" in narrow
    assert "numbers are weights" not in narrow


def test_viewer_reprs_are_short():
    m = sentence_map()
    assert repr(terminal.heatmap(m, 3, 1, highlight=m.find("it"))) == \
        "Heatmap(layer 3, head 1, 15 x 15, query 'it')"
    assert repr(terminal.top_table(m, m.find("it"))) == "TopTable(top keys of 'it', 72 heads)"
    bundle = terminal.heatmap(m, 3, 1)._repr_mimebundle_(include=None, exclude=None)
    assert "layer 3, head 1" in bundle["text/plain"] and "animal" in bundle["text/html"]


def test_colour_ramp_is_monotonic_in_brightness():
    lum = [sum(terminal.colour(w)) for w in np.linspace(0, 1, 11)]
    assert lum == sorted(lum) and terminal.colour(0) != terminal.colour(1)


def test_top_table_lists_best_keys():
    m = sentence_map().merge_words()
    it = m.find("it")
    out = render(terminal.top_table(m, it, layers=[1], heads=[8]), colour=False)
    j, w = m.top(1, 8, it, 1)[0]
    assert f"{m.keys[j]} {100 * w:.0f}%" in out


# ---- PNG / SVG ------------------------------------------------------------------------------
def test_png_grid_and_single_head(tmp_path):
    from matplotlib.image import imread

    m = sentence_map()
    grid = imread(png.save(m, tmp_path / "grid.png"))
    one = imread(png.save(m.merge_words(), tmp_path / "one.png", layer=2, head=3))
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]  # 12 heads wide, 6 layers high
    assert one.ndim == 3 and min(one.shape[:2]) > 300
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svg_is_xml_with_every_panel(tmp_path):
    m = sentence_map()
    root = ET.parse(png.save(m, tmp_path / "grid.svg", layer=1)).getroot()
    assert root.tag.endswith("svg")
    # one embedded image per head of layer 1, and one for the colour bar
    assert (tmp_path / "grid.svg").read_text().count("<image") == 12 + 1


def test_png_refuses_bad_extension_and_head(tmp_path):
    m = sentence_map()
    with pytest.raises(ValueError, match=r"expected a \.png or \.svg"):
        png.save(m, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="out of range"):
        png.save(m, tmp_path / "x.png", layer=6, head=0)


# ---- HTML (static checks; the browser test runs the page) -----------------------------------
def test_html_is_self_contained(tmp_path):
    m = sentence_map()
    page = html.save(m, tmp_path / "p.html", layer=1, head=2).read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)
    assert "<script src" not in page and "<link" not in page
    data = payload(page)
    assert data["tokens"] == m.tokens and data["initial"]["layer"] == 1
    assert data["weights"] and data["q_dim"] == 32 and data["note"] == ""


def payload(text: str) -> dict:
    part = text.split('<script type="application/json" class="qkv-data">')[1]
    return json.loads(part.split("</script>")[0])


def test_html_opens_on_the_chosen_head_and_word():
    from qkv.head_choice import choose_head

    m = sentence_map()
    view = m.merge_words()
    c = choose_head(view, view.find("it"))
    d = payload(html.render(m))["initial"]
    assert (d["layer"], d["head"], d["words"]) == (c.layer, c.head, True)
    assert d["query"] == m.find("it")
    d = payload(html.render(m, layer=2))["initial"]  # the best head of layer 2
    assert (d["layer"], d["head"]) == (2, choose_head(view, view.find("it"), layers=[2]).head)


def test_notebook_fragment_is_scoped_and_small():
    m = sentence_map()
    a, b = m._repr_html_(), html.fragment(m)
    ids = [re.findall(r'\bid="([^"]+)"', x) for x in (a, b)]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]  # one root id each
    assert f'document.getElementById("{ids[0][0]}")' in a
    assert "<html" not in a and "<body" not in a and a.startswith('<div class="qkv"')
    css = a.split("<style>")[1].split("</style>")[0]
    rules = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    selectors = [sel.strip() for block in re.findall(r"([^{}]+)\{", rules)
                 for sel in block.split(",")]
    assert selectors and all(sel.startswith(".qkv") or sel.startswith("@media")
                             for sel in selectors), selectors
    assert payload(a)["q"] is not None  # 15 tokens: q/k/v fit the notebook budget
    small = html.fragment(m, max_qkv_bytes=1000)
    d = payload(small)
    assert d["q"] is None and d["k"] is None and "Step by step left out" in d["note"]
    assert len(small) < len(a) / 4


def test_short_reprs():
    m = sentence_map()
    assert repr(m) == ("AttentionMap(6 layers x 12 heads, 15 tokens: \"[CLS] the animal "
                       "didn ' t cross the ...\", model 'all-MiniLM-L6-v2', with q/k/v)")
    assert repr(m.merge_words().rollout()).startswith("AttentionMap(rollout, 13 words: ")
    x = random_map(3, 4, tokens=["a", "b", "c"], key_tokens=["w", "x", "y", "z"])
    assert repr(x) == "AttentionMap(2 layers x 3 heads, 3 x 4 tokens: 'a b c' -> 'w x y z')"
    assert len(repr(m)) < 200


def test_html_escapes_script_end_in_data(tmp_path):
    m = random_map(2, tokens=["</script><b>", "x"], title="</script>")
    page = html.render(m)
    assert page.count("</script>") == 2  # the data script's and the code script's own


def test_html_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"expected a \.html"):
        html.save(sentence_map(), tmp_path / "p.txt")
    with pytest.raises(TypeError, match="AttentionMap"):
        html.render({"tokens": []})
