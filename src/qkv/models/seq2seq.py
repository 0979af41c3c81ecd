"""A Transformer encoder-decoder built from :class:`qkv.MultiHeadAttention`.

The architecture of "Attention Is All You Need" with pre-LayerNorm blocks (the norm sits
inside each residual branch, which trains stably without a long warm-up)::

    encoder layer:  x = x + Drop(SelfAttn(LN(x), key padding hidden))
                    x = x + Drop(FF(LN(x)))
    decoder layer:  y = y + Drop(SelfAttn(LN(y), causal))
                    y = y + Drop(CrossAttn(LN(y), memory, key padding hidden))
                    y = y + Drop(FF(LN(y)))

Positions are sinusoidal tables added to the embeddings, or rotary embeddings applied to the
queries and keys of every self-attention (``positions="rotary"``). One embedding matrix is
shared by the source, the target and the output projection (tied embeddings), so source and
target use one vocabulary.

Decoding (:meth:`Transformer.greedy`, :meth:`Transformer.beam_search`) keeps one
:class:`qkv.KVCache` per decoder layer for self-attention (one new key/value per step) and
one per layer for cross-attention (filled with the projected encoder output on the first
step, reused afterwards). ``use_cache=False`` recomputes the whole prefix at every step
instead; both give the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention_map import AttentionMap
from ..layers import KVCache, MultiHeadAttention
from ..masks import padding_mask
from ..positional import RotaryEmbedding, sinusoidal
from .decode_step import LeanStep

__all__ = ["Transformer", "TransformerConfig"]

POSITIONS = ("sinusoidal", "rotary")


@dataclass(frozen=True)
class TransformerConfig:
    """The shape of a :class:`Transformer` (saved with checkpoints as JSON).

    ``pad_id``/``bos_id``/``eos_id`` are the ids of the padding, begin and end tokens of
    the vocabulary; padding is hidden from every attention as a key. ``vocab_size`` may be
    None in a config that is not built yet (:class:`qkv.train.TrainConfig` takes it from
    the task's tokenizer); a :class:`Transformer` needs it set.
    """

    vocab_size: int | None
    d_model: int = 64
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ff_dim: int = 256
    dropout: float = 0.1
    positions: str = "sinusoidal"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for f in ("vocab_size", "d_model", "num_heads", "encoder_layers", "decoder_layers",
                  "ff_dim"):
            v = getattr(self, f)
            if f == "vocab_size" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int; got {v!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads "
                             f"{self.num_heads}; each head gets d_model // num_heads dims")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sin/cos pairs); got {self.d_model}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}; got {self.positions!r}")
        if self.positions == "rotary" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary positions need an even head dim; d_model {self.d_model} / "
                             f"num_heads {self.num_heads} = {self.d_model // self.num_heads}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1); got {self.dropout!r}")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        below = self.vocab_size if self.vocab_size is not None else float("inf")
        if len(set(ids)) != 3 or not all(0 <= i < below for i in ids):
            raise ValueError(f"pad/bos/eos ids must be distinct ids below vocab_size "
                             f"{self.vocab_size}; got {ids}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object; got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; this qkv knows {sorted(known)}")
        return cls(**d)


def _drop(drop: nn.Dropout, x: Tensor) -> Tensor:
    """``drop(x)``, skipped where it is the identity (evaluation, or p = 0): decoding and
    dropout-free training call it a dozen times per token."""
    if (drop.training and drop.p > 0) or drop._forward_hooks or drop._forward_pre_hooks:
        return drop(x)
    return x


class FeedForward(nn.Module):
    """``W_2 · Drop(GELU(W_1 · x))``: ``(B, L, E) -> (B, L, E)`` through ``ff_dim`` units."""

    def __init__(self, d_model: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ff_dim)
        self.fc2 = nn.Linear(ff_dim, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_drop(self.drop, F.gelu(self.fc1(x))))  # (B, L, E)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, dropout=cfg.dropout,
                                            rotary=rotary)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x (B, Ls, E)``; ``mask (B, 1, 1, Ls)`` True = real key, False = padding."""
        x = x + _drop(self.drop, self.self_attn(self.norm1(x), mask=mask))  # (B, Ls, E)
        return x + _drop(self.drop, self.ff(self.norm2(x)))  # (B, Ls, E)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, dropout=cfg.dropout,
                                            rotary=rotary)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, dropout=cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y: Tensor, memory: Tensor, memory_mask: Tensor | None, *,
                self_cache: KVCache | None = None, cross_cache: KVCache | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``y (B, Lt, E)`` attends causally to itself and to ``memory (B, Ls, E)``.

        Returns ``y (B, Lt, E)`` and, with ``need_weights``, the cross-attention weights
        ``(B, H, Lt, Ls)`` (else None). With caches, ``y`` holds only the new positions.
        """
        # One new query after cached keys sees every key: causal hides nothing there.
        causal = self_cache is None or self_cache.length == 0 or y.shape[1] > 1
        y = y + _drop(self.drop, self.self_attn(self.norm1(y), causal=causal, cache=self_cache))
        res = self.cross_attn(self.norm2(y), memory, mask=memory_mask, cache=cross_cache,
                              need_weights=need_weights)
        out, weights = res if need_weights else (res, None)
        y = y + _drop(self.drop, out)  # (B, Lt, E)
        return y + _drop(self.drop, self.ff(self.norm3(y))), weights  # (B, Lt, E)


class DecodeState:
    """Everything incremental decoding keeps between steps, for a batch of ``B`` rows."""

    def __init__(self, memory: Tensor, memory_mask: Tensor | None, layers: int) -> None:
        self.memory = memory  # (B, Ls, E)
        self.memory_mask = memory_mask  # (B, 1, 1, Ls) or None
        self.self_caches = [KVCache() for _ in range(layers)]
        self.cross_caches = [KVCache() for _ in range(layers)]
        self.length = 0  # target positions decoded so far

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index (B,)`` of the self-attention caches (beam search).

        Cross-attention caches are left alone: beam search only reorders beams within the
        same source sentence, whose cross-attention keys and values are identical.
        """
        same = all(c._k is None or c._k.shape[0] == index.numel() for c in self.self_caches)
        for c in self.self_caches:
            if same and index.dtype == torch.long and index.device == self.memory.device:
                c._reorder_in_place(index)  # keeps the storage (and the lean step's views)
            else:
                c.reorder(index)  # checks index; a new batch size


def _ban_repeats(logp: Tensor, prefix: Tensor, n: int) -> None:
    """Set ``logp (R, V)`` to -inf, in place, for every token that would complete an n-gram
    already present in its row of ``prefix (R, T)`` (the tokens generated so far)."""
    for r, seq in enumerate(prefix.tolist()):
        if len(seq) < n - 1:
            continue
        tail = seq[len(seq) - n + 1 :]
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == tail]
        if banned:
            logp[r, banned] = float("-inf")


class Transformer(nn.Module):
    """Encoder-decoder Transformer over one token vocabulary (see the module docstring).

    ``forward(src, tgt_in)`` takes token ids ``src (B, Ls)`` right-padded with ``pad_id``
    and the decoder input ``tgt_in (B, Lt)`` (``bos_id`` then the target shifted right) and
    returns logits ``(B, Lt, vocab_size)``: position ``t`` predicts target token ``t``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig; got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size is None; a Transformer needs the size of its "
                             "vocabulary: dataclasses.replace(config, vocab_size=N)")
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rotary = RotaryEmbedding(cfg.d_model // cfg.num_heads) \
            if cfg.positions == "rotary" else None
        self.encoder = nn.ModuleList(EncoderLayer(cfg, rotary) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(DecoderLayer(cfg, rotary) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self._pe = torch.zeros(0, cfg.d_model, dtype=torch.float64)  # sinusoidal rows so far
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)

    # ---- building blocks ------------------------------------------------------------------
    def _positions(self, start: int, length: int, like: Tensor) -> Tensor:
        """Rows ``start .. start+length-1`` of the sinusoidal table, ``(length, E)``."""
        end = start + length
        if self._pe.shape[0] < end:
            self._pe = sinusoidal(max(end, 2 * self._pe.shape[0], 64), self.config.d_model,
                                  dtype=torch.float64)
        return self._pe[start:end].to(dtype=like.dtype, device=like.device)  # (L, E)

    def _embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        x = self.embed(ids) * math.sqrt(self.config.d_model)  # (B, L, E)
        if self.config.positions == "sinusoidal":
            x = x + self._positions(offset, ids.shape[1], x)  # (B, L, E)
        return _drop(self.drop, x)

    def _check_ids(self, name: str, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) \
                else type(ids).__name__
            raise ValueError(f"{name} must be int64 token ids of shape (B, L); got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{name} holds ids outside 0..{self.config.vocab_size - 1}")

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor | None]:
        """``src (B, Ls)`` -> ``memory (B, Ls, E)`` and its key mask ``(B, 1, 1, Ls)``
        (True = real token, False = padding, hidden from every query; None when no row
        is padded, which spares every attention call the mask)."""
        self._check_ids("src", src)
        keep = src != self.config.pad_id  # (B, Ls)
        mask = None if bool(keep.all()) else padding_mask(keep)  # (B, 1, 1, Ls)
        x = self._embed(src)  # (B, Ls, E)
        for layer in self.encoder:
            x = layer(x, mask)  # (B, Ls, E)
        return self.encoder_norm(x), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor | None, *,
               state: DecodeState | None = None, need_weights: bool = False
               ) -> tuple[Tensor, list[Tensor]]:
        """Logits ``(B, Lt, V)`` of the decoder on ``tgt_in (B, Lt)``.

        With ``state``, ``tgt_in`` holds the next positions only and the caches in
        ``state`` supply the earlier ones. Returns the logits and, with ``need_weights``,
        one cross-attention weight tensor ``(B, H, Lt, Ls)`` per decoder layer.
        """
        offset = 0 if state is None else state.length
        y = self._embed(tgt_in, offset)  # (B, Lt, E)
        weights = []
        for i, layer in enumerate(self.decoder):
            y, w = layer(y, memory, memory_mask,
                         self_cache=None if state is None else state.self_caches[i],
                         cross_cache=None if state is None else state.cross_caches[i],
                         need_weights=need_weights)
            if need_weights:
                weights.append(w)
        if state is not None:
            state.length += tgt_in.shape[1]
        y = self.decoder_norm(y)  # (B, Lt, E)
        return y @ self.embed.weight.T, weights  # (B, Lt, V) tied output projection

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        self._check_ids("tgt_in", tgt_in)
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)[0]  # (B, Lt, V)

    # ---- decoding -------------------------------------------------------------------------
    def _step_logits(self, tokens: Tensor, memory: Tensor, mask: Tensor | None,
                     state: DecodeState | None) -> Tensor:
        """Logits ``(B, V)`` for the next token after the prefix ``tokens (B, T)``."""
        if state is not None:  # only the newest token; the caches hold the rest
            return self.decode(tokens[:, -1:], memory, mask, state=state)[0][:, -1]
        return self.decode(tokens, memory, mask)[0][:, -1]  # recompute the whole prefix

    def _stepper(self, memory: Tensor, mask: Tensor | None, state: DecodeState | None,
                 max_len: int):
        """A function ``tokens (B, T) -> logits (B, V)`` of the next token for a decode of up
        to ``max_len`` steps: the first step runs the modules (filling the caches), later
        ones a :class:`LeanStep` where it applies (see its module), else the modules."""
        lean = None

        def step(tokens: Tensor) -> Tensor:
            nonlocal lean
            if lean is not None and not lean.bypassed():
                return lean(tokens[:, -1:])  # (B, V)
            first = state is not None and state.length == 0
            logits = self._step_logits(tokens, memory, mask, state)  # (B, V)
            if first:
                lean = LeanStep.build(self, state, max_len,
                                      stock=(Transformer, DecoderLayer, FeedForward))
            return logits
        return step

    def _check_decode_args(self, src: Tensor, max_len: int) -> None:
        self._check_ids("src", src)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1; got {max_len!r}")

    @torch.no_grad()
    def greedy(self, src: Tensor, *, max_len: int, use_cache: bool = True,
               stop_at_eos: bool = True) -> Tensor:
        """Pick the most likely token at every step.

        Returns ``(B, T)`` token ids without the leading BOS, ``T <= max_len``: each row
        ends with ``eos_id`` followed by ``pad_id`` once it has finished (or runs to
        ``max_len``). ``use_cache=False`` recomputes the whole prefix each step (for
        checking and benchmarking the KV cache); ``stop_at_eos=False`` always decodes
        ``max_len`` tokens.
        """
        self._check_decode_args(src, max_len)
        cfg = self.config
        memory, mask = self.encode(src)
        state = DecodeState(memory, mask, cfg.decoder_layers) if use_cache else None
        b = src.shape[0]
        tokens = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=src.device)  # (B, 1)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)  # (B,)
        step = self._stepper(memory, mask, state, max_len)
        for _ in range(max_len):
            logits = step(tokens)  # (B, V)
            nxt = logits.argmax(dim=-1)  # (B,)
            if stop_at_eos:
                nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
                done = done | (nxt == cfg.eos_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (B, T+1)
            if stop_at_eos and bool(done.all()):
                break
        return tokens[:, 1:]

    @torch.no_grad()
    def beam_search(self, src: Tensor, *, beam: int, max_len: int, use_cache: bool = True,
                    length_penalty: float = 0.0, no_repeat_ngram: int = 0
                    ) -> tuple[Tensor, Tensor]:
        """Keep the ``beam`` most likely prefixes per source, by total log-probability.

        A finished beam (it produced ``eos_id``) stays in the beam with its score frozen,
        continued only by ``pad_id``; the search stops when every beam has finished or at
        ``max_len``. Hypotheses are ranked by ``log p / ((5 + n) / 6) ** length_penalty``
        (GNMT's length penalty, ``n`` the tokens so far, EOS included); the default 0 ranks
        by the sum of token log-probabilities, so ``beam=1`` is greedy decoding, and a
        larger ``length_penalty`` favours longer outputs. ``no_repeat_ngram=n > 0`` forbids
        any token that would repeat an n-gram of tokens already in the hypothesis.

        Returns the best sequence per source ``(B, T)`` (as :meth:`greedy`) and its
        log-probability ``(B,)``.
        """
        self._check_decode_args(src, max_len)
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
                or not 0 <= length_penalty <= 10:
            raise ValueError(f"length_penalty must be a number in [0, 10]; got "
                             f"{length_penalty!r}")
        if isinstance(no_repeat_ngram, bool) or not isinstance(no_repeat_ngram, int) \
                or no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be an int >= 0 (0: no limit); got "
                             f"{no_repeat_ngram!r}")
        if isinstance(beam, bool) or not isinstance(beam, int) or not (
            1 <= beam <= self.config.vocab_size
        ):
            raise ValueError(f"beam must be an int in 1..{self.config.vocab_size} (the "
                             f"vocabulary size); got {beam!r}")
        cfg, k = self.config, beam
        b, dev = src.shape[0], src.device
        memory, mask = self.encode(src)
        memory = memory.repeat_interleave(k, dim=0)  # (B*K, Ls, E)
        if mask is not None:
            mask = mask.repeat_interleave(k, dim=0)  # (B*K, 1, 1, Ls)
        state = DecodeState(memory, mask, cfg.decoder_layers) if use_cache else None
        tokens = torch.full((b * k, 1), cfg.bos_id, dtype=torch.long, device=dev)  # (BK, 1)
        scores = torch.full((b, k), float("-inf"), device=dev)  # (B, K)
        scores[:, 0] = 0.0  # all beams start equal: expand only the first
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)  # (BK,)
        lengths = torch.zeros(b * k, device=dev)  # (BK,) tokens of each beam, EOS included
        frozen = torch.full((cfg.vocab_size,), float("-inf"), device=dev)  # (V,)
        frozen[cfg.pad_id] = 0.0
        v = cfg.vocab_size
        step = self._stepper(memory, mask, state, max_len)
        for _ in range(max_len):
            logits = step(tokens)  # (BK, V)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (BK, V)
            if no_repeat_ngram:
                _ban_repeats(logp, tokens[:, 1:], no_repeat_ngram)
            logp = torch.where(done[:, None], frozen, logp)  # (BK, V)
            cand = (scores.reshape(b * k, 1) + logp).reshape(b, k * v)  # (B, K*V)
            if length_penalty:
                n = (lengths + (~done).float()).reshape(b, k, 1)  # (B, K, 1)
                norm = ((5.0 + n) / 6.0) ** length_penalty  # (B, K, 1)
                _, flat = (cand.reshape(b, k, v) / norm).reshape(b, k * v).topk(k, dim=-1)
                scores = cand.gather(1, flat)  # (B, K) raw log-probabilities
            else:
                scores, flat = cand.topk(k, dim=-1)  # (B, K) best first
            rows = (torch.arange(b, device=dev)[:, None] * k + flat // v).reshape(-1)  # (BK,)
            nxt = (flat % v).reshape(-1)  # (BK,)
            tokens = torch.cat([tokens[rows], nxt[:, None]], dim=1)  # (BK, T+1)
            lengths = lengths[rows] + (~done[rows]).float()
            done = done[rows] | (nxt == cfg.eos_id)
            if state is not None:
                state.reorder(rows)
            if bool(done.all()):
                break
        best = tokens.reshape(b, k, -1)[:, 0, 1:]  # (B, T)
        return best, scores[:, 0]

    @torch.no_grad()
    def cross_attention(self, src: Tensor, out: Tensor) -> Tensor:
        """The cross-attention weights with which the decoder produced ``out``.

        ``out (B, T)`` are decoded tokens (as :meth:`greedy` returns them); the decoder is
        run once on ``BOS + out[:, :-1]`` (teacher forcing), so row ``t`` of the weights is
        the attention of the query that predicted ``out[:, t]``. Returns ``(layers, B, H,
        T, Ls)``; padded source keys have weight 0.
        """
        self._check_ids("out", out)
        if out.shape[1] == 0:
            raise ValueError("out has no tokens; decode at least one token first")
        bos = torch.full_like(out[:, :1], self.config.bos_id)  # (B, 1)
        tgt_in = torch.cat([bos, out[:, :-1]], dim=1)  # (B, T)
        memory, mask = self.encode(src)
        _, weights = self.decode(tgt_in, memory, mask, need_weights=True)
        return torch.stack(weights)  # (layers, B, H, T, Ls)

    def cross_attention_map(self, src: Tensor, out: Tensor, *, source_tokens: list[str],
                            output_tokens: list[str], title: str = "", model: str = ""
                            ) -> AttentionMap:
        """The cross-attention of one decoded output as a :class:`qkv.AttentionMap`.

        ``src (1, Ls)`` and ``out (1, T)`` as for :meth:`cross_attention`;
        ``output_tokens`` label the T rows (queries), ``source_tokens`` the Ls columns.
        Weights are ``(layers, heads, T, Ls)``.
        """
        if src.shape[0] != 1 or out.shape[0] != 1:
            raise ValueError(f"cross_attention_map takes one example; got batches of "
                             f"{src.shape[0]} and {out.shape[0]}")
        w = self.cross_attention(src, out)[:, 0]  # (layers, H, T, Ls)
        return AttentionMap(tokens=list(output_tokens), key_tokens=list(source_tokens),
                            weights=w.float().cpu().numpy(), title=title, model=model,
                            layer_labels=[f"decoder {i}" for i in range(w.shape[0])])
