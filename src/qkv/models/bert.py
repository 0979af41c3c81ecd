"""A BERT encoder built from qkv's own layers, for real pretrained weights.

BERT (Devlin et al. 2019) is a stack of post-LN Transformer encoder layers::

    x = LayerNorm(word + position + token_type embeddings)          # (B, L, E)
    for each layer:
        x = LayerNorm(x + W_o · MultiHeadAttention(x))               # post-LN
        x = LayerNorm(x + W_2 · gelu(W_1 · x))

Attention is :class:`qkv.MultiHeadAttention`, so the weights of every head come from
:func:`qkv.attention` (the fast fused path when they are not asked for, the reference
steps when they are). Load weights with :func:`qkv.load_pretrained`. Text in and out
(tokenize, encode, attend) is in :mod:`qkv.models.bert_text`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MultiHeadAttention
from .bert_text import BertText

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["BertConfig", "BertEncoder", "BertEncoderOutput"]

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
                if not isinstance(val, str) or val not in _ACTIVATIONS:
                    out.append(f"config.json hidden_act {val!r} is not supported; expected "
                               f"one of {sorted(_ACTIVATIONS)}")
            elif f.name == "layer_norm_eps":
                if isinstance(val, bool) or not isinstance(val, (int, float)) or not (
                        math.isfinite(val) and val > 0):
                    out.append(f"config.json layer_norm_eps must be a finite positive number; "
                               f"got {val!r}")
            elif f.name == "pad_token_id":
                vocab = d.get("vocab_size")
                if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
                    out.append(f"config.json pad_token_id must be an int; got {val!r}")
                elif val is not None and (val < 0 or (isinstance(vocab, int) and val >= vocab)):
                    out.append(f"config.json pad_token_id {val} is not a token id; expected "
                               f"0 <= pad_token_id < vocab_size ({vocab})")
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
class BertEncoderOutput:
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


class BertEncoder(BertText, nn.Module):
    """A BERT encoder with its tokenizer: ``forward`` on ids, ``encode`` and ``attend`` on
    text (from :class:`~qkv.models.bert_text.BertText`). Build it with
    :func:`qkv.load_pretrained`.

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
    ) -> BertEncoderOutput:
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
        return BertEncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(weights) if need_weights else None,
            pooler_output=pooled,
        )
