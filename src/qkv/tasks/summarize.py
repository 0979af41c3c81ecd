"""``summarize``: write the one-sentence summary of a Python function from its code.

The data is :mod:`qkv.tasks.code_corpus` (real docstrings of installed Python source). On
top of it this module trains the byte-level BPE tokenizer on the training split (sources
and targets together: the model ties its input and output embeddings), truncates every
source to ``max_source_tokens`` subwords (at a word boundary) and drops targets over
``max_target_tokens``, both counted in the manifest. The result is cached on disk
(:func:`load_corpus`), keyed by the installed versions and the options, so only the first
use builds it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from . import code_corpus
from .base import Example, Task
from .subword import SubwordTokenizer

__all__ = ["SummarizeTask", "SummaryCorpus", "cache_dir", "load_corpus", "truncate_source"]

SPLITS = ("train", "valid", "test")
FIELDS = ("module", "name", "source", "target", "first_line")


def cache_dir() -> Path:
    """``$QKV_CACHE`` if set, else ``$XDG_CACHE_HOME/qkv`` (default ``~/.cache/qkv``)."""
    if os.environ.get("QKV_CACHE"):
        return Path(os.environ["QKV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qkv"


def truncate_source(tok: SubwordTokenizer, text: str, n: int) -> tuple[str, bool]:
    """``text`` cut to at most ``n`` subword tokens at a word boundary; and whether it was
    cut. Whole words encode the same alone or in a longer text (byte-level BPE works word
    by word), so the cut text has at most ``n`` tokens."""
    ids = tok.encode(text)
    if len(ids) <= n:
        return text, False
    prefix = tok.decode(ids[:n])
    cut = prefix.rsplit(" ", 1)[0] if " " in prefix else prefix
    return cut, True


@dataclass
class SummaryCorpus:
    """The pairs of each split (dicts with :data:`FIELDS`), the tokenizer, the manifest."""

    splits: dict[str, list[dict]]
    tokenizer: SubwordTokenizer
    manifest: dict


def _build(*, vocab_size: int, max_source_tokens: int, max_target_tokens: int,
           modules: list[str] | None, workers: int) -> SummaryCorpus:
    t0 = time.perf_counter()
    pairs, manifest = code_corpus.build_corpus(modules=modules, workers=workers)
    train = [p for p in pairs if p.split == "train"]
    if not train:
        raise ValueError("the code corpus has no training pairs; give more modules")
    texts = [t for p in train for t in (p.source, p.target)]
    tok = SubwordTokenizer.train(texts, vocab_size=vocab_size)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    truncated = long_targets = 0
    target_ids = tok.encode_batch([p.target for p in pairs])
    source_ids = tok.encode_batch([p.source for p in pairs])
    for p, t_ids, s_ids in zip(pairs, target_ids, source_ids, strict=True):
        if len(t_ids) > max_target_tokens:
            long_targets += 1
            continue
        source, cut = p.source, False
        if len(s_ids) > max_source_tokens:
            source, cut = truncate_source(tok, p.source, max_source_tokens)
        truncated += cut
        splits[p.split].append({"module": p.module, "name": p.name, "source": source,
                                "target": p.target, "first_line": p.first_line})
    manifest["filtered"]["target_over_max_tokens"] = long_targets
    manifest["sources_truncated"] = truncated
    manifest["pairs"] = {s: len(v) for s, v in splits.items()}
    manifest["options"] = {"vocab_size": vocab_size, "max_source_tokens": max_source_tokens,
                           "max_target_tokens": max_target_tokens}
    manifest["tokenizer_sha256"] = hashlib.sha256(
        json.dumps(tok.to_dict(), sort_keys=True).encode()).hexdigest()
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    return SummaryCorpus(splits=splits, tokenizer=tok, manifest=manifest)


def load_corpus(*, vocab_size: int = 8000, max_source_tokens: int = 64,
                max_target_tokens: int = 40, modules: list[str] | None = None,
                cache: bool = True, workers: int = 2) -> SummaryCorpus:
    """The summarization corpus, from the cache when this environment built it before.

    The cache key covers the extractor version, the installed versions of Python and of
    every package in :data:`~qkv.tasks.code_corpus.PACKAGES`, and the options; the file
    lives in :func:`cache_dir`. ``cache=False`` always builds (and writes nothing).
    """
    key_src = json.dumps({"v": code_corpus.EXTRACTOR_VERSION, "versions": code_corpus.versions(),
                          "vocab_size": vocab_size, "src": max_source_tokens,
                          "tgt": max_target_tokens, "modules": modules}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir() / f"code-corpus-{key}.json.gz"
    if cache and path.exists():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                d = json.load(f)
            return SummaryCorpus(
                splits={s: [dict(zip(FIELDS, row, strict=True)) for row in d["splits"][s]]
                        for s in SPLITS},
                tokenizer=SubwordTokenizer.from_dict(d["tokenizer"]), manifest=d["manifest"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file: build again and overwrite it
    corpus = _build(vocab_size=vocab_size, max_source_tokens=max_source_tokens,
                    max_target_tokens=max_target_tokens, modules=modules, workers=workers)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump({"manifest": corpus.manifest, "tokenizer": corpus.tokenizer.to_dict(),
                       "splits": {s: [[p[k] for k in FIELDS] for p in corpus.splits[s]]
                                  for s in SPLITS}}, f)
        os.replace(tmp, path)
    return corpus


class SummarizeTask(Task):
    """Code-to-text summarization of real Python functions (see the module docstring).

    Options: ``vocab_size`` of the BPE tokenizer, ``max_source_tokens`` (sources are cut
    to this many subwords), ``max_target_tokens`` (longer summaries are dropped),
    ``modules`` (only these dotted module prefixes: a small corpus for tests),
    ``train_pairs`` (train on the first N training pairs only).
    """

    name: ClassVar[str] = "summarize"
    splits: ClassVar[tuple[str, ...]] = SPLITS
    default_options: ClassVar[dict] = {"vocab_size": 8000, "max_source_tokens": 64,
                                       "max_target_tokens": 40}
    #: Sized for a 2-core CPU: a 2+2-layer, 128-wide model; label smoothing 0.1 (no CLI
    #: flag) as in the original Transformer recipe.
    train_defaults: ClassVar[dict] = {
        "steps": 3000, "batch_size": 32, "lr": 2e-3, "warmup": 200, "d_model": 128,
        "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ff_dim": 512,
        "dropout": 0.0, "label_smoothing": 0.1, "eval_every": 500, "eval_size": 200,
        "checkpoint_every": 100,
    }

    def __init__(self, *, vocab_size: int = 8000, max_source_tokens: int = 64,
                 max_target_tokens: int = 40, modules: list[str] | None = None,
                 train_pairs: int | None = None) -> None:
        for name, v, lo in (("vocab_size", vocab_size, 260),
                            ("max_source_tokens", max_source_tokens, 8),
                            ("max_target_tokens", max_target_tokens, 4),
                            ("train_pairs", 1 if train_pairs is None else train_pairs, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        if modules is not None and (not isinstance(modules, (list, tuple)) or not modules
                                    or not all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"modules must be a non-empty list of dotted module names; got "
                             f"{modules!r}")
        self.vocab_size, self.max_source_tokens = vocab_size, max_source_tokens
        self.max_target_tokens = max_target_tokens
        self.modules = None if modules is None else sorted(modules)
        self.train_pairs = train_pairs
        self.corpus = load_corpus(vocab_size=vocab_size, max_source_tokens=max_source_tokens,
                                  max_target_tokens=max_target_tokens, modules=self.modules)
        if train_pairs is not None:  # a small training set (tests, learning curves)
            self.corpus.splits["train"] = self.corpus.splits["train"][:train_pairs]
        for s in ("train", "valid"):
            if not self.corpus.splits[s]:
                raise ValueError(f"the {s!r} split of the code corpus is empty with modules="
                                 f"{self.modules}; give more modules")
        self._max_target = max(len(self.corpus.tokenizer.encode(p["target"]))
                               for s in SPLITS for p in self.corpus.splits[s])

    def options(self) -> dict:
        return {"vocab_size": self.vocab_size, "max_source_tokens": self.max_source_tokens,
                "max_target_tokens": self.max_target_tokens, "modules": self.modules,
                "train_pairs": self.train_pairs}

    def alphabet(self) -> set[str]:
        """Empty: the subword tokenizer is byte-level, so no character is outside it."""
        return set()

    def tokenizer(self) -> SubwordTokenizer:
        return self.corpus.tokenizer

    @property
    def max_target_len(self) -> int:
        """The longest target in subword tokens."""
        return self._max_target

    def examples(self, split: str) -> list[Example]:
        """Every (source, target) of ``split``, in corpus order."""
        self._check_split(split)
        return [(p["source"], p["target"]) for p in self.corpus.splits[split]]

    def sample(self, rng: np.random.Generator, n: int, *, split: str = "train") -> list[Example]:
        self._check_split(split)
        pairs = self.corpus.splits[split]
        if not pairs:
            raise ValueError(f"the {split!r} split of task 'summarize' is empty")
        idx = rng.integers(0, len(pairs), size=n)  # (n,)
        return [(pairs[i]["source"], pairs[i]["target"]) for i in idx.tolist()]
