"""Scores of generated text against references: smoothed BLEU-4 as CodeXGLUE's code-to-text
evaluator computes it, ROUGE-L F1 (the ``rouge-score`` package), exact match.

Corpus scores are means of sentence scores, times 100 (CodeXGLUE's convention).

**Smoothed BLEU-4** (:func:`sentence_bleu`), step by step, for one hypothesis and one
reference:

1. Both strings are lower-cased and split into words and punctuation
   (:func:`bleu_tokens`: runs of word characters, and each other non-space character),
   then normalised as NIST's ``mteval-v11a`` does (punctuation apart, ``.``/``,`` split
   from non-digits; lower case).
2. For n = 1..4: ``m_n`` = n-grams of the hypothesis found in the reference (counts
   clipped to the reference's), ``g_n`` = n-grams of the hypothesis.
3. Smoothing (Lin & Och 2004, "BLEU+1"): for n >= 2 add 1 to both ``m_n`` and ``g_n``;
   unigrams are not smoothed. ``log p_n = log(m_n + s + tiny) - log(g_n + s + tiny)`` with
   ``s`` the added 1 (or 0) and ``tiny = sys.float_info.min``, so a unigram precision of 0
   gives a (finite) score of about 0.
4. Brevity penalty with +1 on both lengths: ``log BP = min(0, 1 - (r + 1) / (c + 1))``,
   ``r``/``c`` the reference/hypothesis lengths in words.
5. ``BLEU = exp(mean(log p_1..4) + log BP)``.

A quirk kept from the reference: an empty hypothesis has ``0/0`` unigrams, which count
as precision 1, so it scores ``exp(1 - (r + 1))`` (0.135 against a two-word reference).

Where this matches NLTK: ``nltk.translate.bleu_score.sentence_bleu`` with
``SmoothingFunction().method2`` smooths the same way (n >= 2) but has the plain brevity
penalty ``exp(1 - r/c)`` for ``c < r``; both agree whenever the hypothesis is at least as
long as the reference and shares at least one word with it.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu_tokens", "corpus_scores", "exact_match", "rouge_l", "sentence_bleu"]

# NIST mteval-v11a normalisation (language-dependent part), as CodeXGLUE's bleu.py runs it
_NIST = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation apart
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]
_SPLIT = re.compile(r"\w+|[^\s\w]")


def bleu_tokens(text: str) -> list[str]:
    """``text`` as BLEU compares it: lower case, words and single punctuation marks."""
    s = " ".join(_SPLIT.findall(text.strip().lower()))
    s = f" {s} "
    for pattern, repl in _NIST:
        s = pattern.sub(repl, s)
    return s.split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def sentence_bleu(hypothesis: str, reference: str, *, max_n: int = 4) -> float:
    """Smoothed sentence BLEU in [0, 1] (see the module docstring for every step)."""
    hyp, ref = bleu_tokens(hypothesis), bleu_tokens(reference)
    log_p = 0.0
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matched = sum(min(c, r[g]) for g, c in h.items())
        guessed = max(len(hyp) - n + 1, 0)
        s = 1 if n > 1 else 0
        log_p += math.log(matched + s + sys.float_info.min) - math.log(
            guessed + s + sys.float_info.min)
    log_bp = min(0.0, 1.0 - (len(ref) + 1) / (len(hyp) + 1))
    return math.exp(log_p / max_n + log_bp)


_ROUGE = None


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] from ``rouge_score`` (its default tokenizer: lower case,
    non-alphanumerics as spaces; no stemming)."""
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ImportError("ROUGE-L needs the rouge-score package: pip install "
                              "'qkv[summarize]' (or pip install rouge-score)") from None
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE.score(reference, hypothesis)["rougeL"].fmeasure


def exact_match(hypothesis: str, reference: str) -> float:
    """1.0 when both give the same :func:`bleu_tokens` (case and spacing ignored)."""
    return float(bleu_tokens(hypothesis) == bleu_tokens(reference))


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Means over pairs, times 100: ``{"rouge_l", "bleu4", "exact", "n"}``."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; "
                         "give one hypothesis per reference")
    if not references:
        raise ValueError("no pairs to score")
    n = len(references)
    pairs = list(zip(hypotheses, references, strict=True))
    return {
        "rouge_l": 100 * sum(rouge_l(h, r) for h, r in pairs) / n,
        "bleu4": 100 * sum(sentence_bleu(h, r) for h, r in pairs) / n,
        "exact": 100 * sum(exact_match(h, r) for h, r in pairs) / n,
        "n": n,
    }
