"""A BERT encoder built from qkv's own layers, for real pretrained weights.

BERT (Devlin et al. 2019) is a stack of post-LN Transformer encoder layers::

    x = LayerNorm(word + position + token_type embeddings)          # (B, L, E)
    for each layer:
        x = LayerNorm(x + W_o · MultiHeadAttention(x))               # post-LN
        x = LayerNorm(x + W_2 · gelu(W_1 · x))

Attention is :class:`qkv.MultiHeadAttention`, so the weights of every head come from
:func:`qkv.attention` (the fast fused path when they are not asked for, the reference
steps when they are). Load weights with :func:`qkv.load_pretrained`.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention_map import AttentionMap
from ..layers import MultiHeadAttention

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

__all__ = ["BertConfig", "BertEncoder", "BertOutput"]

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder (the fields of a Hugging Face ``config.json``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def problems(cls, d: dict) -> list[str]:
        """Every reason ``d`` (a parsed config.json) cannot describe a BERT encoder."""
        out = []
        if d.get("model_type") != "bert":
            out.append(f"config.json has model_type {d.get('model_type')!r}; qkv can load "
                       "'bert' (BERT, MiniLM, all-MiniLM-L6-v2 and other BERT-layout encoders)")
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING:
                    out.append(f"config.json lacks {f.name!r}")
                continue
            val = d[f.name]
            if f.name == "hidden_act":
                if val not in _ACTIVATIONS:
                    out.append(f"config.json hidden_act {val!r} is not supported; expected "
                               f"one of {sorted(_ACTIVATIONS)}")
            elif f.name == "layer_norm_eps":
                if isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0:
                    out.append(f"config.json layer_norm_eps must be a positive number; got "
                               f"{val!r}")
            elif f.name == "pad_token_id":
                if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
                    out.append(f"config.json pad_token_id must be an int; got {val!r}")
            elif isinstance(val, bool) or not isinstance(val, int) or val < 1:
                out.append(f"config.json {f.name} must be a positive int; got {val!r}")
        pe = d.get("position_embedding_type", "absolute")
        if pe != "absolute":
            out.append(f"config.json position_embedding_type {pe!r} is not supported; "
                       "expected 'absolute'")
        h, n = d.get("hidden_size"), d.get("num_attention_heads")
        if isinstance(h, int) and isinstance(n, int) and n > 0 and h % n:
            out.append(f"config.json hidden_size {h} is not divisible by num_attention_heads {n}")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Build from a parsed config.json; ValueError listing every problem."""
        probs = cls.problems(d)
        if probs:
            raise ValueError("invalid BERT config: " + "; ".join(probs))
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if kw.get("pad_token_id") is None:
            kw["pad_token_id"] = 0
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class BertOutput:
    """What :meth:`BertEncoder.forward` returns.

    ``last_hidden_state (B, L, E)``; ``hidden_states``: the embeddings and the output of
    every layer, ``num_layers + 1`` tensors ``(B, L, E)`` (with ``output_hidden_states``);
    ``attentions``: the weights of every layer, tensors ``(B, H, L, L)`` (with
    ``need_weights``); ``pooler_output (B, E)`` when the checkpoint has a pooler.
    """

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    pooler_output: Tensor | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.word = _embedding(c.vocab_size, c.hidden_size, **fk)
        self.position = _embedding(c.max_position_embeddings, c.hidden_size, **fk)
        self.token_type = _embedding(c.type_vocab_size, c.hidden_size, **fk)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **fk)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        return self.norm(x)  # (B, L, E)


def _embedding(n: int, dim: int, *, device=None, dtype=None) -> nn.Embedding:
    """``nn.Embedding``; on the meta device (weights to be loaded) without the random
    init, whose meta kernel would import torch._dynamo (about 1 s)."""
    if device is not None and torch.device(device).type == "meta":
        return nn.Embedding(n, dim, _weight=torch.empty(n, dim, device="meta", dtype=dtype))
    return nn.Embedding(n, dim, device=device, dtype=dtype)


class BertLayer(nn.Module):
    """One post-LN encoder layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, c: BertConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.attn = MultiHeadAttention(c.hidden_size, c.num_attention_heads, **fk)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **fk)
        self.ff_in = nn.Linear(c.hidden_size, c.intermediate_size, **fk)
        self.ff_out = nn.Linear(c.intermediate_size, c.hidden_size, **fk)
        self.ff_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **fk)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: Tensor, mask: Tensor | None, need_weights: bool,
                real: Tensor | None = None):
        """``x (B, L, E)``; ``mask`` as for MultiHeadAttention; ``real (N,)``: indices of
        the real tokens in ``x.flatten(0, 1)`` when the batch is padded. Everything after
        attention is position-wise, so it then runs on the N real tokens only and the
        padding positions of the output are 0."""
        a = self.attn(x, mask=mask, need_weights=need_weights)
        a, w = a if need_weights else (a, None)  # a (B, L, E); w (B, H, L, L)
        h = x + a  # (B, L, E)
        if real is not None:
            h = h.flatten(0, 1).index_select(0, real)  # (N, E): real tokens, packed
        h = self.attn_norm(h)
        h = self.ff_norm(h + self.ff_out(self.act(self.ff_in(h))))  # through (.., 4E)
        if real is not None:
            h = x.new_zeros(x.shape[0] * x.shape[1], x.shape[2]).index_copy_(0, real, h)
            h = h.view(x.shape)  # (B, L, E), 0 at padding
        return h, w


class BertEncoder(nn.Module):
    """A BERT encoder with its tokenizer: ``forward`` on ids, ``encode`` and ``attend`` on
    text. Build it with :func:`qkv.load_pretrained`.

    Attributes: ``config`` (:class:`BertConfig`), ``tokenizer`` (a ``tokenizers.Tokenizer``
    or None), ``name`` (shown in outputs), ``max_seq_length`` (the truncation length of
    :meth:`encode`, as sentence-transformers uses it).
    """

    def __init__(self, config: BertConfig, *, with_pooler: bool = False, tokenizer=None,
                 name: str = "bert", max_seq_length: int | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.config = config
        self.embeddings = BertEmbeddings(config, **fk)
        self.layers = nn.ModuleList(BertLayer(config, **fk)
                                    for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size, **fk) \
            if with_pooler else None
        self.tokenizer: Tokenizer | None = tokenizer
        self.name = name
        self.max_seq_length = min(max_seq_length or config.max_position_embeddings,
                                  config.max_position_embeddings)

    # ---- the network --------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        need_weights: bool = False,
        output_hidden_states: bool = False,
    ) -> BertOutput:
        """Run the encoder on token ids.

        Args:
            input_ids: ``(B, L)`` integer token ids, ``L <= max_position_embeddings``.
            attention_mask: ``(B, L)``, 1/True = real token, 0/False = padding (hidden as
                a key from every query); None = no padding. With padding, the layers'
                position-wise parts run on the real tokens only and every layer's output
                is 0 at padding positions (their values are never used).
            token_type_ids: ``(B, L)`` segment ids (0 = first sentence, 1 = second).
            need_weights: also return every layer's attention weights ``(B, H, L, L)``
                (computed by the reference backend; otherwise the fused path runs).
            output_hidden_states: also return the embeddings and every layer's output.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or \
                input_ids.is_floating_point():
            got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor (B, L); got {got}")
        b, n = input_ids.shape
        c = self.config
        if n > c.max_position_embeddings:
            raise ValueError(f"input has {n} tokens but the model has "
                             f"{c.max_position_embeddings} positions; truncate the input")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, L)
        mask = real = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, n):
                raise ValueError(f"attention_mask must have shape {(b, n)} like input_ids; "
                                 f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.bool()  # (B, L) True = real token
            if not bool(keep.all()):
                mask = keep[:, None, None, :]  # (B, 1, 1, L): True = may attend
                real = keep.flatten().nonzero().squeeze(1)  # (N,) real tokens
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, E)
        states, weights = [x], []
        for layer in self.layers:
            x, w = layer(x, mask, need_weights, real)  # (B, L, E), (B, H, L, L) | None
            states.append(x)
            weights.append(w)
        pooled = None
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, E) from the first token
        return BertOutput(
            last_hidden_state=x,
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(weights) if need_weights else None,
            pooler_output=pooled,
        )

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
                raise ValueError(msg + "; shorten the text (or drop --strict to truncate it)")
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
