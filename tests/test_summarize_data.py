"""Code-to-text data: the corpus build (deterministic, split by module, every filter), the
subword tokenizer, the metrics against reference implementations, the baselines."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from qkv.metrics import bleu_tokens, corpus_scores, exact_match, rouge_l, sentence_bleu
from qkv.tasks.code_corpus import (
    build_corpus,
    code_words,
    deduplicate,
    extract_pairs,
    functions_in,
    split_of,
    split_words,
    summary_of,
)
from qkv.tasks.subword import SubwordTokenizer
from qkv.tasks.summary_baselines import Retrieval, first_line_baseline, name_baseline
from qkv.tasks.tokenizer import BOS, EOS, PAD

#: A small fixed part of the standard library: enough modules to fill every split.
SMALL = ["json", "email", "asyncio", "textwrap", "shlex", "argparse", "logging",
         "concurrent", "xml", "http", "urllib", "importlib"]


@pytest.fixture(scope="module")
def small():
    return build_corpus(modules=SMALL, workers=1)


def test_build_is_deterministic_same_manifest_hash(small):
    pairs, manifest = small
    again_pairs, again = build_corpus(modules=SMALL, workers=2)
    assert manifest["sha256"] == again["sha256"]
    assert pairs == again_pairs
    assert manifest["pairs"]["train"] > 500
    assert set(manifest["versions"]) >= {"python", "numpy", "torch"}


def test_splits_are_disjoint_by_module(small):
    pairs, manifest = small
    by_split: dict[str, set[str]] = {}
    for p in pairs:
        by_split.setdefault(p.split, set()).add(p.module)
        assert p.split == split_of(p.module)
    assert set(by_split) == {"train", "valid", "test"}, "every split has modules"
    assert not by_split["train"] & by_split["valid"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["valid"] & by_split["test"]
    assert manifest["pairs"] == dict(Counter(p.split for p in pairs)) | {
        s: 0 for s in ("train", "valid", "test") if s not in {p.split for p in pairs}}


SOURCE = '''
def get_item_count(self):
    """Return the number of items in the cache.

    More text here.
    """
    return len(self._items)

def short(x):
    """Too short."""
    return x

def echo(name, mode=0o777):
    """echo(name [, mode=0o777]) -> None"""
    return name

def doctested(x):
    """Double a number twice over, for example
    >>> doctested(2)
    8
    """
    return 4 * x

def only_doc():
    """This function has nothing but a docstring."""

def no_doc(a):
    return a

class Box:
    def openLid(self, force=False):
        """Open the lid of the box, even when stuck!  Then more."""
        # a comment
        self.lid_open = True

def long_summary():
    """One two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty twentyone twentytwo twentythree
    twentyfour twentyfive twentysix twentyseven twentyeight twentynine thirty thirtyone."""
    return 1
'''


def test_each_filter_applies_and_is_counted():
    pairs, counts = extract_pairs(SOURCE, "pkg.mod")
    names = [p["name"] for p in pairs]
    assert names == ["get_item_count", "Box.openLid"]
    first = pairs[0]
    assert first["target"] == "Return the number of items in the cache"
    assert "Return the number" not in first["source"] and "More text" not in first["source"]
    assert first["source"] == "def get item count ( self ) : return len ( self . items )"
    assert first["first_line"] == "return len(self._items)"
    assert pairs[1]["target"] == "Open the lid of the box, even when stuck!"
    assert pairs[1]["first_line"] == "self.lid_open = True"
    assert counts == Counter({"with_docstring": 7, "words": 2, "signature": 1, "doctest": 1,
                              "no_body": 1})


SECTION_HEADERS = [  # docstrings that open with a section: no summary line to learn
    "Parameters\n----------\nx : int\n    The value to scale.",
    "Returns\n-------\nfloat\n    The scaled value of the input.",
    "Notes\n-----\nThis is slow for large inputs.",
    "Args:\n    x: the value to scale by two.",
    "Returns:\n    The value of x scaled by two.",
    "Raises:\n    ValueError: when x is negative.",
    ":param x: the value to scale by two\n:returns: the scaled value",
    ":raises ValueError: when x is negative or zero",
    "@param x: the value to scale by two",
]
KEPT = [  # look alike, but are summaries
    "Return :class:`dict` mapping names to their values.",
    ":class:`Future` wrapping the result of the call.",
    "Returns the parameters of the model as a list.",
    "Note that the parameters are copied before use.",
    "Parameters of the model, as a dict of tensors.",
]


def test_section_header_targets_are_filtered_and_counted():
    body = "".join(f'def f{i}(x):\n    """{d}"""\n    return 2 * x\n\n'
                   for i, d in enumerate(SECTION_HEADERS + KEPT))
    pairs, counts = extract_pairs(body, "m")
    assert [p["name"] for p in pairs] == [f"f{i}" for i in range(len(SECTION_HEADERS),
                                                                  len(SECTION_HEADERS) + len(KEPT))]
    assert [p["target"] for p in pairs] == [k.rstrip(".") for k in KEPT]
    assert counts == Counter({"with_docstring": len(SECTION_HEADERS) + len(KEPT),
                              "section_header": len(SECTION_HEADERS)})


def test_generated_and_unparsable_files_are_counted():
    pairs, counts = extract_pairs("# Generated by a tool. DO NOT EDIT.\n" + SOURCE, "m")
    assert pairs == [] and counts == Counter({"generated_files": 1})
    pairs, counts = extract_pairs("def broken(:\n", "m")
    assert pairs == [] and counts == Counter({"syntax_files": 1})


def test_duplicates_are_dropped_once():
    text = SOURCE + SOURCE.replace("class Box", "class Crate")
    raw, counts = extract_pairs(text, "m")
    assert len(raw) == 4  # the class name is not in the code: two exact duplicates
    other, _ = extract_pairs(SOURCE, "other")
    pairs = deduplicate(raw + other, counts)
    assert [(p.module, p.name) for p in pairs] == [("m", "get_item_count"), ("m", "Box.openLid")]
    assert counts["duplicate"] == 4


def test_words_and_summaries():
    assert split_words("get_item_count") == ["get", "item", "count"]
    assert split_words("getHTTPResponseCode") == ["get", "HTTP", "Response", "Code"]
    assert code_words("x->y == z  # hi") == "x -> y == z # hi"
    assert summary_of("Open it. Then close.") == "Open it"
    assert summary_of("Version 1.2 of the thing\nis here.\n\nMore.") == \
        "Version 1.2 of the thing is here"
    assert summary_of("What is it?  Nobody knows.") == "What is it?"


def test_functions_in_user_code_and_bad_code():
    funcs = functions_in(SOURCE)
    assert [f[0] for f in funcs][:3] == ["get_item_count", "short", "echo"]
    assert ("no_doc", "def no doc ( a ) : return a", "return a", None) in funcs
    only = next(f for f in funcs if f[0] == "only_doc")
    assert only[1] == "def only doc ( ) :"
    with pytest.raises(ValueError, match="does not parse"):
        functions_in("def broken(:\n")


# ---- tokenizer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    texts = ["Return the number of items", "def get item count ( self ) : return len ( x )",
             "Open the lid of the box"] * 20
    return SubwordTokenizer.train(texts, vocab_size=300)


@pytest.mark.parametrize("text", ["Return the number of items", "naïve café — 日本語 ✓",
                                  "tabs\tand  two spaces", "x", "", "a.b(c) -> None!"])
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([BOS, *ids, EOS, 7, 8]) == text  # stops at EOS, skips BOS
    assert tok.unknown(text) == []


def test_tokenizer_specials_batch_and_save(tok):
    assert tok.token(PAD) == "<pad>" and tok.token(EOS) == "</s>"
    b = tok.batch(["Return the number", "x"], bos=True, eos=True)  # (2, L)
    assert b[0, 0] == BOS and b[1, 0] == BOS and b[1, 2] == EOS and (b[1, 3:] == PAD).all()
    again = SubwordTokenizer.from_dict(tok.to_dict())
    assert again == tok and again.encode("Open the lid") == tok.encode("Open the lid")
    assert tok.tokens("Return the")[0] == "Return"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="not a subword tokenizer"):
        SubwordTokenizer.from_dict({"type": "char", "chars": "ab"})
    with pytest.raises(ValueError, match="vocab_size"):
        SubwordTokenizer.train(["a"], vocab_size=10)


def test_tokenizer_training_is_deterministic(tok):
    texts = ["Return the number of items", "def get item count ( self ) : return len ( x )",
             "Open the lid of the box"] * 20
    assert SubwordTokenizer.train(texts, vocab_size=300) == tok


# ---- metrics ---------------------------------------------------------------------------------
def test_bleu_tokens_normalise_like_codexglue():
    assert bleu_tokens("Return the N-th item, e.g. x.y()") == \
        ["return", "the", "n", "-", "th", "item", ",", "e", ".", "g", ".", "x", ".", "y", "(",
         ")"]


def test_bleu_hand_computed():
    # hyp: "the cat sat" vs ref "the cat sat down": matches 3/3, 2/2, 1/1, 0/0
    # smoothed: p1 = 3/3, p2 = 3/3, p3 = 2/2, p4 = 1/1; BP: 1 - (4+1)/(3+1) = -0.25
    assert sentence_bleu("the cat sat", "the cat sat down") == pytest.approx(math.exp(-0.25))
    # hyp: "a b c d" vs ref "a b x d": p1 = 3/4, p2 = (1+1)/(3+1), p3 = 1/3, p4 = 1/2
    want = math.exp((math.log(3 / 4) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4)
    assert sentence_bleu("a b c d", "a b x d") == pytest.approx(want)
    assert sentence_bleu("Same words here.", "same words here .") == pytest.approx(1.0)
    assert sentence_bleu("zzz", "the cat") < 1e-70  # no unigram match: ~0, not an error
    # an empty hypothesis: p1 = 0/0 counts as 1 (tiny/tiny), so only BP = 1 - 3/1 remains;
    # CodeXGLUE's evaluator scores it the same way
    assert sentence_bleu("", "the cat") == pytest.approx(math.exp(-2))


@pytest.mark.parametrize("hyp,ref", [
    ("return the number of items in the list", "return the number of items"),
    ("open the lid of the box even when it is stuck", "open the lid of the box"),
    ("create a new socket transport object now", "create socket transport"),
    ("set the task factory that loop uses", "set a task factory used by loop"),
])
def test_bleu_matches_nltk_method2_where_defined_alike(hyp, ref):
    """NLTK's method2 smooths n >= 2 the same way; its brevity penalty differs only when the
    hypothesis is shorter than the reference, which these cases avoid."""
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import sentence_bleu as nltk_bleu

    h, r = bleu_tokens(hyp), bleu_tokens(ref)
    assert len(h) >= len(r)
    want = nltk_bleu([r], h, smoothing_function=SmoothingFunction().method2)
    assert sentence_bleu(hyp, ref) == pytest.approx(want, rel=1e-9)


def test_rouge_l_matches_rouge_score_and_hand_value():
    from rouge_score import rouge_scorer

    ref, hyp = "Return the number of items in the cache", "Return number of cached items"
    # LCS: return, number, of, items = 4; P = 4/5, R = 4/8, F = 2PR/(P+R)
    p, r = 4 / 5, 4 / 8
    assert rouge_l(hyp, ref) == pytest.approx(2 * p * r / (p + r))
    want = rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure
    assert rouge_l(hyp, ref) == pytest.approx(want)


def test_exact_match_and_corpus_scores():
    assert exact_match("Return the item.", "return the item .") == 1.0
    assert exact_match("Return an item", "Return the item") == 0.0
    s = corpus_scores(["Return the item", "zzz"], ["return the item", "Open the box"])
    assert s["n"] == 2 and s["exact"] == 50.0
    assert s["bleu4"] == pytest.approx(50.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        corpus_scores(["a"], ["a", "b"])


# ---- baselines -------------------------------------------------------------------------------
def test_baselines():
    assert name_baseline("Cache.get_item_count") == "Get item count"
    assert name_baseline("__init__") == "Init"
    assert name_baseline("parseHTTPHeaders") == "Parse http headers"
    assert first_line_baseline("return x") == "return x"
    r = Retrieval(["def open lid ( self ) : self . lid = True",
                   "def count items ( self ) : return len ( self . items )",
                   "def close lid ( self ) : self . lid = False"],
                  ["Open the lid", "Count the items", "Close the lid"])
    assert r(["def count things ( self ) : return len ( self . things )",
              "def shut lid ( box ) : box . lid = False"]) == ["Count the items",
                                                             "Close the lid"]
    with pytest.raises(ValueError, match="as many targets"):
        Retrieval(["a"], [])
