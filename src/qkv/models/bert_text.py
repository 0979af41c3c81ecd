"""Text in and out of a BERT encoder: tokenize, sentence embeddings, attention maps.

:class:`BertText` holds the methods of :class:`~qkv.models.bert.BertEncoder` that take or
give text (``model.tokenize``, ``model.encode``, ``model.attend``); the network itself
(embeddings, layers, ``forward`` on token ids) is in :mod:`qkv.models.bert`. The word
merging of :meth:`BertText.attend` maps tokens back to the whitespace-separated words of
the input.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention_map import AttentionMap

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

__all__ = ["BertText"]


class BertText:
    """Text methods of a BERT encoder (mixed into :class:`~qkv.models.bert.BertEncoder`).

    They use the encoder's ``config``, ``tokenizer``, ``name``, ``max_seq_length``,
    ``embeddings``, ``layers`` and its ``forward``.
    """

    # ---- text in ------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; load it with qkv.load_pretrained "
                             "from a directory that holds tokenizer.json")
        return self.tokenizer

    def tokenize(self, texts: list[str], *, max_length: int | None = None):
        """Token ids ``(B, L)``, mask ``(B, L)`` and type ids ``(B, L)`` for a batch of
        texts, padded to the longest and truncated to ``max_length`` (default
        :attr:`max_seq_length`)."""
        tok = self._need_tokenizer()
        max_length = max_length or self.max_seq_length
        with _truncation(tok, max_length):
            encs = tok.encode_batch([str(t) for t in texts])
        rows = [e.ids for e in encs]
        types = [e.type_ids for e in encs]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.config.pad_token_id, dtype=torch.long)
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, t) in enumerate(zip(rows, types, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            tt[i, : len(t)] = torch.tensor(t)
            mask[i, : len(r)] = True
        return ids, mask, tt

    @torch.inference_mode()
    def encode(self, texts: str | list[str], *, batch_size: int = 32,
               normalize: bool = True) -> Tensor:
        """Sentence embeddings ``(N, E)``: mean of the last hidden states over the real
        tokens, L2-normalised (as sentence-transformers does for all-MiniLM-L6-v2).

        Texts longer than :attr:`max_seq_length` tokens are truncated (sentence-transformers
        does the same). A single string gives ``(1, E)``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        texts = list(texts)
        dev = self.embeddings.word.weight.device
        out = torch.empty(len(texts), self.config.hidden_size)  # (N, E)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            ids, mask, tt = self.tokenize([texts[i] for i in idx])  # (b, L) each
            h = self(ids.to(dev), attention_mask=mask.to(dev),
                     token_type_ids=tt.to(dev)).last_hidden_state  # (b, L, E)
            m = mask.to(dev, h.dtype).unsqueeze(-1)  # (b, L, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (b, E)
            if normalize:
                e = F.normalize(e, p=2.0, dim=-1)  # (b, E), unit length
            out[idx] = e.float().cpu()
        return out

    # ---- attention out ------------------------------------------------------------------
    @torch.inference_mode()
    def attend(self, text: str, pair: str | None = None, *, strict: bool = False,
               keep_qkv: bool = True) -> AttentionMap:
        """The attention of every layer and head on one text (or a sentence pair).

        Returns an :class:`~qkv.attention_map.AttentionMap` at the token level:
        ``weights (layers, heads, L, L)`` (rows = the attending token, sum 1), the
        tokens, which are special (``[CLS]``/``[SEP]``), the words of the text with their
        token spans, and (``keep_qkv``) every head's queries, keys and values
        ``(layers, heads, L, head_dim)`` for the step-by-step view.

        Text longer than the model's positions is truncated with a warning, or refused
        with ``strict=True``. Empty text is refused.
        """
        tok = self._need_tokenizer()
        for name, t in (("text", text), ("pair", pair)):
            if t is not None and not isinstance(t, str):
                raise TypeError(f"{name} must be a string; got {type(t).__name__}")
            if t is not None and not t.strip():
                raise ValueError(f"{name} is empty; give a sentence to explain, e.g. "
                                 "\"The animal didn't cross the street because it was too tired\"")
        enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
        limit = self.config.max_position_embeddings
        if len(enc.ids) > limit:
            msg = (f"the input has {len(enc.ids)} tokens but {self.name} has {limit} "
                   "positions")
            if strict:
                raise ValueError(msg + "; shorten the text (or drop strict=True to truncate it)")
            warnings.warn(msg + f"; keeping the first {limit}", UserWarning, stacklevel=2)
            with _truncation(tok, limit):
                enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
        if sum(1 for s in enc.special_tokens_mask if not s) == 0:
            raise ValueError(f"the text has no token the model knows (got {text!r}); give "
                             "words in a language the tokenizer covers")
        dev = self.embeddings.word.weight.device
        ids = torch.tensor([enc.ids], device=dev)  # (1, L)
        tt = torch.tensor([enc.type_ids], device=dev)  # (1, L)
        captured: dict[tuple[int, str], Tensor] = {}
        handles = []
        if keep_qkv:
            for i, layer in enumerate(self.layers):
                for part, lin in (("q", layer.attn.q_proj), ("k", layer.attn.k_proj),
                                  ("v", layer.attn.v_proj)):
                    handles.append(lin.register_forward_hook(_capture(captured, (i, part))))
        try:
            out = self(ids, token_type_ids=tt, need_weights=True)
        finally:
            for h in handles:
                h.remove()
        weights = torch.stack([w[0] for w in out.attentions])  # (layers, H, L, L)
        qkv = {}
        if keep_qkv:
            heads, d = self.config.num_attention_heads, self.config.head_dim
            for part in "qkv":
                t = torch.stack([captured[(i, part)][0] for i in range(len(self.layers))])
                qkv[part] = (t.view(len(self.layers), -1, heads, d).transpose(1, 2)
                             .float().cpu().numpy())  # (layers, H, L, Dh)
        words, spans = _words(enc, text, pair)
        title = text if pair is None else f"{text}  ‖  {pair}"
        return AttentionMap(
            tokens=list(enc.tokens),
            weights=weights.float().cpu().numpy(),
            special=[bool(s) for s in enc.special_tokens_mask],
            words=words, word_spans=spans,
            q=qkv.get("q"), k=qkv.get("k"), v=qkv.get("v"),
            scale=1.0 / math.sqrt(self.config.head_dim) if keep_qkv else None,
            model=self.name, title=title,
        )


def _capture(store: dict, key):
    def hook(module, args, output):
        store[key] = output.detach()  # (1, L, E)
    return hook


@contextmanager
def _truncation(tok: Tokenizer, limit: int):
    """Let the tokenizer truncate to ``limit`` tokens (longest sequence first, special
    tokens kept) inside the block."""
    saved = tok.truncation
    tok.enable_truncation(limit, strategy="longest_first")
    try:
        yield
    finally:
        if saved is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(**saved)


def _words(enc: Encoding, text: str, pair: str | None):
    """The whitespace-separated words of the input and the token span of each.

    A word is a maximal run of non-space characters of the original text (so
    ``didn't`` is one word of three tokens); its span is ``[first, last + 1)`` over the
    tokens whose character offsets start inside it. Special tokens belong to no word.
    """
    texts = [text, pair]
    runs = [[(m.start(), m.end()) for m in re.finditer(r"\S+", t)] if t is not None else []
            for t in texts]
    words, spans = [], []
    current = None  # (sequence, run index)
    for i, (seq, special, (a, _b)) in enumerate(zip(enc.sequence_ids, enc.special_tokens_mask,
                                                    enc.offsets, strict=True)):
        if special or seq is None:
            current = None
            continue
        starts = runs[seq]
        j = int(np.searchsorted([s for s, _ in starts], a, side="right")) - 1
        j = max(j, 0)
        if current == (seq, j):
            spans[-1] = (spans[-1][0], i + 1)
            continue
        current = (seq, j)
        s, e = starts[j]
        words.append(texts[seq][s:e])
        spans.append((i, i + 1))
    return words, spans
