"""A byte-level BPE subword tokenizer (HF ``tokenizers``) with :class:`CharTokenizer`'s
interface, so the training loop, decoding and checkpoints use either one unchanged.

Ids 0, 1, 2 are PAD, BOS and EOS as in :mod:`qkv.tasks.tokenizer`. Byte-level means every
string is encodable (no unknown characters) and ``decode(encode(s)) == s`` for every ``s``
that does not start with a space (a space is put before the first word, as before every
other, and decoding takes it away). The whole ``tokenizers`` JSON is saved with each
checkpoint (:meth:`SubwordTokenizer.to_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .tokenizer import BOS, EOS, PAD, SPECIALS, check_description

__all__ = ["SubwordTokenizer"]


class SubwordTokenizer:
    """Byte-level BPE over a vocabulary of ``vocab_size`` ids, the three specials first."""

    def __init__(self, tokenizer) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer; got {type(tokenizer).__name__}")
        got = [tokenizer.token_to_id(s) for s in SPECIALS]
        if got != [PAD, BOS, EOS]:
            raise ValueError(f"the tokenizer's ids of {list(SPECIALS)} are {got}; expected "
                             f"{[PAD, BOS, EOS]} (train it with these special tokens first)")
        self._tok = tokenizer
        self._json = tokenizer.to_str()

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 8000,
              min_frequency: int = 2) -> SubwordTokenizer:
        """Learn BPE merges from ``texts`` (deterministic: same texts, same tokenizer)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
            raise ValueError(f"vocab_size must be an int >= 260 (256 bytes + specials); got "
                             f"{vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=list(SPECIALS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self._json == other._json

    def __repr__(self) -> str:
        return f"SubwordTokenizer(byte-level BPE, {self.vocab_size} ids)"

    def unknown(self, text: str) -> list[str]:
        """Always empty: every character is made of bytes the vocabulary holds."""
        return []

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        """The display strings of ``text``'s subwords (the byte-level space mark shown as
        nothing: ``"Ġreturn"`` -> ``"return"``)."""
        return [self.token(i) for i in self.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: stops at the first EOS, skips PAD and BOS."""
        keep = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i < len(SPECIALS):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary of size "
                                 f"{self.vocab_size}")
            keep.append(i)
        text = self._tok.decode(keep, skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text

    def token(self, i: int) -> str:
        """The display string of one id (specials by name)."""
        i = int(i)
        if i < len(SPECIALS):
            return SPECIALS[i]
        text = self._tok.decode([i], skip_special_tokens=False)
        return text.strip() or repr(text)

    def pieces(self, ids: Iterable[int]) -> tuple[list[str], list[bool]]:
        """Display strings of ``ids`` (spaces taken off, a lone space shown as ``␣``) and,
        for each, whether it starts a word (its text begins with a space)."""
        raw = [self._tok.decode([int(i)], skip_special_tokens=False) for i in ids]
        return [r.strip() or "␣" for r in raw], [r.startswith(" ") for r in raw]

    def batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> Tensor:
        """Encode and right-pad with PAD: a ``(B, L)`` int64 tensor, ``L`` the longest row."""
        rows = [([BOS] if bos else []) + ids + ([EOS] if eos else [])
                for ids in self.encode_batch(texts)]
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), PAD, dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def to_dict(self) -> dict:
        return {"type": "bpe", "specials": list(SPECIALS), "json": self._json}

    @classmethod
    def from_dict(cls, d: dict) -> SubwordTokenizer:
        from tokenizers import Tokenizer

        text = check_description(d, "bpe", "json", "subword")
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"the saved subword tokenizer does not load: {e}") from None
        return cls(tok)
