"""What every task provides: seeded examples from disjoint splits, and its full alphabet."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from .tokenizer import CharTokenizer

__all__ = ["VALIDATION_SEED", "Example", "OutsideTaskWarning", "Task", "bucket"]

Example = tuple[str, str]  # (source text, target text)

#: Validation sets do not depend on the training seed: every run is scored on the same set.
VALIDATION_SEED = 0x5EED


class OutsideTaskWarning(UserWarning):
    """A model was asked about a text unlike any its task produces: the answer is a guess."""


def bucket(text: str, buckets: int = 100) -> int:
    """A stable hash of ``text`` into ``0 .. buckets-1`` (BLAKE2b: same in every process)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


class Task(ABC):
    """A sequence-to-sequence task: source strings and the target each one must become.

    Splits never overlap: every example belongs to exactly one split, and sampling a split
    only ever returns examples of that split. Sampling is a pure
    function of a NumPy ``Generator``, so ``batch(seed, step, n)`` is the same batch in every
    run, which is what lets a resumed training run see exactly the data it would have seen.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "valid")
    #: Options a new run saves explicitly (so later changes of the defaults keep old runs).
    default_options: ClassVar[dict] = {}
    #: Training settings of ``qkv train TASK`` that differ from the general defaults.
    train_defaults: ClassVar[dict] = {}

    @abstractmethod
    def options(self) -> dict:
        """The keyword arguments that rebuild this task (saved with checkpoints)."""

    @abstractmethod
    def alphabet(self) -> set[str]:
        """Every character any source or target of any split can contain."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, n: int, *, split: str = "train") -> list[Example]:
        """``n`` examples of ``split`` drawn with ``rng`` (with replacement)."""

    @property
    @abstractmethod
    def max_target_len(self) -> int:
        """The longest target in characters (decoding stops one token after it, for EOS)."""

    @classmethod
    def input_problem(cls, text: str, **options) -> str | None:
        """Why ``text`` is not a source this task (built with ``options``) could produce, in
        one phrase, or None when it could be one (or the task cannot tell). A model trained on
        the task still answers such a text, but its answer is a guess. Cheap: the task itself
        is not built."""
        return None

    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(self.alphabet())

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has splits {list(self.splits)}; got {split!r}")

    def batch(self, seed: int, step: int, n: int) -> list[Example]:
        """The training batch of ``step``: a function of ``(seed, step)`` alone."""
        return self.sample(np.random.default_rng([int(seed), int(step)]), n, split="train")

    def validation(self, n: int, *, split: str = "valid") -> list[Example]:
        """A fixed set of up to ``n`` distinct examples of ``split`` (same for every seed)."""
        self._check_split(split)
        rng = np.random.default_rng([VALIDATION_SEED, n, self.splits.index(split)])
        out: dict[str, str] = {}
        for _ in range(50):
            for src, tgt in self.sample(rng, n, split=split):
                if len(out) < n:
                    out.setdefault(src, tgt)
            if len(out) >= n:
                break
        return list(out.items())
