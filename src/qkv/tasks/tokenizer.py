"""A character-level tokenizer: one token per Unicode code point, plus three specials.

The vocabulary is built from every character a task can produce (its whole range, not a
sample), so ``decode(encode(s)) == s`` for every string of the task. It is saved with each
checkpoint (:meth:`CharTokenizer.to_dict`), so a trained model reads exactly the ids it was
trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["BOS", "EOS", "PAD", "SPECIALS", "CharTokenizer"]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")


def _describe(ch: str) -> str:
    return f"{ch!r} (U+{ord(ch):04X})"


class CharTokenizer:
    """Maps each character of ``chars`` to an id ``>= 3``; ids 0, 1, 2 are PAD, BOS, EOS.

    The characters are sorted by code point, so the same set always gives the same ids.
    """

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"a CharTokenizer vocabulary holds single characters; got {c!r}")
        self.chars: list[str] = sorted(set(chars))
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """The tokenizer whose vocabulary is every character of ``texts``."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer({len(self.chars)} characters + {len(SPECIALS)} specials)"

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``; ValueError naming any unknown character."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        bad = self.unknown(text)
        if bad:
            raise ValueError(f"characters outside the vocabulary: {', '.join(map(_describe, bad))}"
                             f"; this model knows {len(self.chars)} characters")
        return [self._ids[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: stops at the first EOS, skips PAD and BOS."""
        out = []
        n = len(SPECIALS)
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i < n:
                continue
            if i >= self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary of size "
                                 f"{self.vocab_size}")
            out.append(self.chars[i - n])
        return "".join(out)

    def token(self, i: int) -> str:
        """The display string of one id (specials by name)."""
        i = int(i)
        return SPECIALS[i] if i < len(SPECIALS) else self.chars[i - len(SPECIALS)]

    def batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> Tensor:
        """Encode and right-pad with PAD: a ``(B, L)`` int64 tensor, ``L`` the longest row."""
        rows = [([BOS] if bos else []) + self.encode(t) + ([EOS] if eos else []) for t in texts]
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), PAD, dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def to_dict(self) -> dict:
        return {"type": "char", "specials": list(SPECIALS), "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(check_description(d, "char", "chars", "character"))


def check_description(d, kind: str, field: str, what: str) -> str:
    """The string ``d[field]`` of a saved tokenizer description ``{"type": kind, field:
    "...", "specials": [...]}``, after checking its type and that its special tokens are
    qkv's; ValueError otherwise (``what`` names the tokenizer in the message)."""
    if not isinstance(d, dict) or d.get("type") != kind or not isinstance(d.get(field), str):
        raise ValueError(f"not a {what} tokenizer description: expected "
                         f"{{'type': '{kind}', '{field}': '...'}}")
    if list(d.get("specials", SPECIALS)) != list(SPECIALS):
        raise ValueError(f"tokenizer specials {d.get('specials')} differ from {list(SPECIALS)}")
    return d[field]
