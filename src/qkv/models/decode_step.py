"""One cached decoding step of :class:`~qkv.models.seq2seq.Transformer`, with the module
machinery taken out.

A decoding step on a small model is bound by the number of Python-level operations, not by
their size. :class:`LeanStep` runs the arithmetic that the modules run for one new token
with warm KV caches (the same kernels, arguments and order; with one query, views stand in
for the modules' transposes) so the logits are bitwise the same (tests check it), but
decides once, when decoding starts, everything the modules re-check on every call: hooks,
training mode, which parameters to read, the packed q/k/v projection, the positional table
in the right dtype, the cross-attention keys and values, the attention kernel's options.

It applies only where it cannot differ from the modules: evaluation (or dropout 0), no
gradients, no hooks on any submodule or registered globally, sinusoidal positions, the
stock module types. :meth:`LeanStep.build` returns None otherwise and decoding takes the
module path.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _functional
from .. import kernels
from ..functional import attention, prepare_call
from ..kernels.torch_sdpa import TorchSDPABackend
from ..layers import MultiHeadAttention, _global_hooks, _has_hooks

__all__ = ["LeanStep"]

_layer_norm = torch.layer_norm  # what F.layer_norm calls


def _plain(model: nn.Module, stock: tuple[type, type, type]) -> bool:
    """The model and every module a decoding step calls of a stock type for its role,
    without hooks, and every dropout a no-op. ``stock``: (Transformer, DecoderLayer,
    FeedForward), the classes whose forward the step spells out."""
    allowed = (*stock[1:], MultiHeadAttention, nn.Linear, nn.LayerNorm, nn.Embedding,
               nn.Dropout, nn.ModuleList)
    if type(model) is not stock[0]:
        return False
    used = [model.embed, model.drop, model.decoder_norm, *model.decoder.modules()]
    for m in used:
        if type(m) not in allowed or _has_hooks(m):
            return False
        if type(m) is nn.Dropout and m.training and m.p > 0:
            return False
        if type(m) is MultiHeadAttention and (m.rotary is not None or (
                m.training and m.dropout > 0)):
            return False
    return True


def _ln(norm: nn.LayerNorm) -> tuple:
    """The arguments F.layer_norm hands torch.layer_norm for this module (which the step
    calls directly: the Python wrapper costs as much as the kernel at this size)."""
    return (list(norm.normalized_shape), norm.weight, norm.bias, norm.eps,
            torch.backends.cudnn.enabled)


def _lin(lin: nn.Linear) -> tuple[Tensor | None, Tensor]:
    """``(bias, weight.T)``: what F.linear hands ``torch.addmm`` (``mm`` without a bias)."""
    return lin.bias, lin.weight.T


def _affine(x: Tensor, lin: tuple[Tensor | None, Tensor], out: Tensor | None = None
            ) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x (B, in)`` as F.linear computes it (``addmm``,
    the same kernel, so the same bits), without its wrapper; into ``out`` when given."""
    bias, wt = lin
    if bias is None:
        return torch.mm(x, wt, out=out)
    return torch.addmm(bias, x, wt, out=out)


def _runner(q_heads: int, k: Tensor, v: Tensor, mask: Tensor | None, *,
            fixed: bool = False):
    """What ``qkv.attention(q, k, v, mask=mask)`` runs for one new query ``(B, Hq, 1, D)``
    against these keys ``k`` and values ``v``, or any longer run of keys of the same
    kind. A self-attention cache grows by one key per step, so the plans of qkv.attention
    (one per shape) would validate and choose the backend again on every step.

    The queries come from the layer's own projection, of k's dtype, device and head dim,
    so the checks hold by construction. With no mask and one query, ``auto`` picks the
    torch backend on CPU whatever the key count, and its runner depends only on the head
    dim, the head groups and the dtype. Elsewhere (a mask, a CUDA device, a replaced torch
    backend) this returns a function that calls :func:`qkv.attention`. ``fixed``: ``k``
    is passed again, unchanged, on every step (the cross-attention cache, filled once;
    a beam reorder only permutes its rows): its NaN/inf check is done here, once.
    """
    if mask is not None:
        return functools.partial(attention, mask=mask)
    be = kernels.get("torch") if "torch" in kernels.names() else None
    if type(be) is not TorchSDPABackend or k.device.type != "cpu" or k.shape[2] == 0:
        return attention
    q = k.new_zeros(k.shape[0], q_heads, 1, k.shape[3])  # (B, Hq, 1, D)
    call, _ = prepare_call(q, k, v)
    if type(kernels.get(kernels.auto_order(call)[0][0])) is not TorchSDPABackend:
        return attention
    return be.plain_runner(call, any_keys=True, fixed_keys=k if fixed else None) or attention


def _slots(cache, start: int, end: int) -> dict[int, tuple]:
    """For each position p in [start, end): the cache's storage, the slots where p's key
    and value go, and the views of keys and values 0..p, made once. Reserves the storage
    first so that none of these views goes stale."""
    cache._reserve(end)
    k, v = cache._k, cache._v  # (B, Hkv, capacity, D)
    return {p: (k, k.narrow(2, p, 1), v.narrow(2, p, 1), k.narrow(2, 0, p + 1),
                v.narrow(2, 0, p + 1)) for p in range(start, end)}


class LeanStep:
    """Logits of the next token, for one new token per row, from warm caches.

    Activations stay ``(B, E)`` (one token per row: the modules' ``(B, 1, E)`` without the
    1), so every projection is one ``addmm``, as F.linear runs it, and the packed q/k/v
    projection writes into one buffer per layer whose head views are made once.
    """

    def __init__(self, model, state, positions: Tensor, end: int) -> None:
        self.state = state
        # (1, E) rows of the sinusoidal table in the embedding's dtype, one per position
        self.pe = list(positions.split(1))
        w = model.embed.weight  # (V, E)
        # The rows the modules compute, embedding * sqrt(E), scaled once (the same bits).
        self.embed_scaled = w * math.sqrt(model.config.d_model)  # (V, E)
        self.embed_t = w.T  # (E, V) the tied output projection
        self.final_ln = _ln(model.decoder_norm)
        self.layers = []
        self._shapes = []  # per layer (Hq, Hkv, Dh, packed weight)
        self._heads: dict[int, list] = {}  # batch size -> per layer (buffer, q, k, v)
        for layer, sc, cc in zip(model.decoder, state.self_caches, state.cross_caches,
                                 strict=True):
            sa, ca = layer.self_attn, layer.cross_attn
            ck, cv = cc.k, cc.v  # (B, Hkv, Ls, Dh): one view each, passed on every step
            pw, pb = sa._packed_in_proj()
            self._shapes.append((sa.num_heads, sa.num_kv_heads, sa.head_dim, pw))
            self.layers.append((
                _slots(sc, state.length, end),
                _ln(layer.norm1), (pb, pw.T), sa.embed_dim, _lin(sa.out_proj),
                sc, _runner(sa.num_heads, sc.k, sc.v, None),
                _ln(layer.norm2), _lin(ca.q_proj), ca.num_heads, ca.head_dim, ck, cv,
                _runner(ca.num_heads, ck, cv, state.memory_mask, fixed=True),
                _lin(ca.out_proj), _ln(layer.norm3), _lin(layer.ff.fc1), _lin(layer.ff.fc2),
            ))

    def _head_views(self, b: int) -> list:
        """Per layer: a ``(B, (Hq + 2 Hkv) Dh)`` buffer for the packed projection and its
        views ``q (B, Hq, 1, Dh)``, ``k``, ``v (B, Hkv, 1, Dh)`` (one query: the modules'
        transposed ``(B, 1, H, Dh)`` read in the same order)."""
        views = self._heads.get(b)
        if views is None:
            views = self._heads[b] = []
            for hq, hkv, dh, w in self._shapes:
                buf = w.new_empty(b, (hq + 2 * hkv) * dh)
                heads = buf.view(b, hq + 2 * hkv, 1, dh)
                views.append((buf, heads.narrow(1, 0, hq), heads.narrow(1, hq, hkv),
                              heads.narrow(1, hq + hkv, hkv)))
        return views

    @classmethod
    def build(cls, model, state, max_len: int, *, stock: tuple[type, type, type]
              ) -> LeanStep | None:
        """A lean step for ``state`` (after the first, module-path step filled its caches)
        for up to ``max_len`` more tokens, or None where only the module path is certain
        to compute what the modules do. ``stock``: (Transformer, DecoderLayer,
        FeedForward)."""
        if (torch.is_grad_enabled() or _global_hooks() or model.config.positions != "sinusoidal"
                or model.embed.max_norm is not None or not _plain(model, stock)):
            return None
        for layer, cc in zip(model.decoder, state.cross_caches, strict=True):
            if layer.self_attn._packed_in_proj() is None or cc.length == 0:
                return None
            for lin in (layer.cross_attn.q_proj, layer.cross_attn.out_proj,
                        layer.self_attn.out_proj, layer.ff.fc1, layer.ff.fc2):
                if lin.weight is None:
                    return None
        pe = model._positions(0, state.length + max_len, model.embed.weight)  # (T, E)
        return cls(model, state, pe, state.length + max_len)

    @staticmethod
    def bypassed() -> bool:
        """True while every attention call must go through :func:`qkv.attention`
        (:func:`qkv.capture` records, or the ``qkv`` logger is at DEBUG)."""
        return bool(_functional._observers) or _functional.log.isEnabledFor(10)

    def __call__(self, ids: Tensor) -> Tensor:
        """``ids (B, 1)`` -> logits ``(B, V)``; appends to the self-attention caches."""
        state = self.state
        pos = state.length
        b = ids.shape[0]
        y = self.embed_scaled.index_select(0, ids.view(b)) + self.pe[pos]  # (B, E)
        for (layer, (buf, q_new, k_new, v_new)) in zip(self.layers, self._head_views(b),
                                                       strict=True):
            (slots, ln1, packed, e, sa_out, sc, sa_run, ln2, cq, ch, cdh, ck, cv, ca_run,
             ca_out, ln3, fc1, fc2) = layer
            # self-attention: one packed projection, one new key/value, every key visible
            _affine(_layer_norm(y, *ln1), packed, out=buf)  # (B, (Hq + 2 Hkv) Dh)
            storage, k_slot, v_slot, k, v = slots[pos]  # k, v: (B, Hkv, pos + 1, Dh)
            if sc._k is storage:  # what append does, with the views made beforehand
                k_slot.copy_(k_new)
                v_slot.copy_(v_new)
                sc.length = pos + 1
            else:  # the cache was replaced meanwhile
                k, v = sc._append_own(k_new, v_new)
            out = sa_run(q_new, k, v)  # (B, Hq, 1, Dh)
            y = y + _affine(out.reshape(b, e), sa_out)  # (B, E)
            # cross-attention on the cached projection of the encoder output
            q = _affine(_layer_norm(y, *ln2), cq).view(b, ch, 1, cdh)  # (B, Hq, 1, Dh)
            out = ca_run(q, ck, cv)  # (B, Hq, 1, Dh)
            y = y + _affine(out.reshape(b, e), ca_out)  # (B, E)
            h = F.gelu(_affine(_layer_norm(y, *ln3), fc1))  # (B, ff)
            y = y + _affine(h, fc2)  # (B, E)
        state.length = pos + 1
        y = _layer_norm(y, *self.final_ln)  # (B, E)
        return y @ self.embed_t  # (B, V)
