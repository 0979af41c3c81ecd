"""Tasks whose alignment is known: ``copy``, ``reverse`` and ``sort`` of character strings.

A source is a random string over ``alphabet`` with a length in ``min_len .. max_len``. The
target of ``copy`` is the source (output ``t`` aligns with input ``t``: the diagonal), of
``reverse`` the source backwards (input ``L-1-t``: the anti-diagonal), of ``sort`` its
characters in code-point order. An example's split is a stable hash of its source, so the
train and validation sets never share a source.
"""

from __future__ import annotations

import numpy as np

from .base import Example, Task, bucket

__all__ = ["CopyTask", "ReverseTask", "SequenceTask", "SortTask"]

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class SequenceTask(Task):
    """Shared sampling for the three sequence tasks; subclasses define :meth:`target`."""

    def __init__(self, *, alphabet: str = DEFAULT_ALPHABET, min_len: int = 1, max_len: int = 12,
                 valid_percent: int = 10) -> None:
        if not isinstance(alphabet, str) or len(set(alphabet)) < 2:
            raise ValueError(f"alphabet must be a string of at least 2 distinct characters; got "
                             f"{alphabet!r}")
        for name, v in (("min_len", min_len), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if min_len > max_len:
            raise ValueError(f"min_len {min_len} exceeds max_len {max_len}")
        if isinstance(valid_percent, bool) or not isinstance(valid_percent, int) or not (
            0 < valid_percent < 100
        ):
            raise ValueError(f"valid_percent must be an int in 1..99; got {valid_percent!r}")
        self.chars = "".join(sorted(set(alphabet)))
        self.min_len, self.max_len, self.valid_percent = min_len, max_len, valid_percent

    def options(self) -> dict:
        return {"alphabet": self.chars, "min_len": self.min_len, "max_len": self.max_len,
                "valid_percent": self.valid_percent}

    def alphabet(self) -> set[str]:
        return set(self.chars)

    @classmethod
    def input_problem(cls, text: str, **options) -> str | None:
        task = cls(**options)  # cheap: nothing is enumerated
        odd = sorted(set(text) - set(task.chars))
        if odd:
            return (f"it has characters the task never produces ({''.join(odd)!r}; sources "
                    f"are strings over {task.chars!r})")
        if not task.min_len <= len(text) <= task.max_len:
            return (f"it has {len(text)} characters; sources have {task.min_len} to "
                    f"{task.max_len}")
        return None

    @property
    def max_target_len(self) -> int:
        return self.max_len

    def target(self, source: str) -> str:
        raise NotImplementedError

    def split_of(self, source: str) -> str:
        return "valid" if bucket(source) < self.valid_percent else "train"

    def sample(self, rng: np.random.Generator, n: int, *, split: str = "train") -> list[Example]:
        self._check_split(split)
        out: list[Example] = []
        for _ in range(10_000):
            if len(out) >= n:
                return out
            k = n - len(out)
            lengths = rng.integers(self.min_len, self.max_len + 1, size=k)  # (k,)
            codes = rng.integers(0, len(self.chars), size=(k, self.max_len))  # (k, max_len)
            for length, row in zip(lengths, codes, strict=True):
                src = "".join(self.chars[c] for c in row[:length])
                if self.split_of(src) == split and len(out) < n:
                    out.append((src, self.target(src)))
        raise ValueError(f"the {split!r} split of task {self.name!r} is (almost) empty with "
                         f"{self.options()}; use a larger alphabet or longer strings")


class CopyTask(SequenceTask):
    name = "copy"

    def target(self, source: str) -> str:
        return source


class ReverseTask(SequenceTask):
    name = "reverse"

    def target(self, source: str) -> str:
        return source[::-1]


class SortTask(SequenceTask):
    name = "sort"

    def target(self, source: str) -> str:
        return "".join(sorted(source))
