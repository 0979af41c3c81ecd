"""Multi-head attention as a PyTorch module (the KV cache it decodes with is in kv_cache.py)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import attention
from .kv_cache import KVCache

__all__ = ["KVCache", "MultiHeadAttention"]


def _global_hooks() -> bool:
    """True when hooks registered for every module (nn.modules.module.register_module_
    forward_hook and friends) expect to see the projections called."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def _has_hooks(lin: nn.Module) -> bool:
    return bool(lin._forward_hooks or lin._forward_pre_hooks or lin._backward_hooks
                or lin._backward_pre_hooks)


def _project(lin: nn.Module, x: Tensor) -> Tensor:
    """``lin(x)``; for a plain nn.Linear without hooks, straight to F.linear (what its
    forward does), sparing nn.Module's call machinery on every attention call."""
    if type(lin) is nn.Linear and not (_has_hooks(lin) or _global_hooks()):
        p = lin._parameters
        w = p.get("weight")
        if w is not None:
            return F.linear(x, w, p.get("bias"))
    return lin(x)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with learned projections ``W_q, W_k, W_v, W_o``.

    Args:
        embed_dim: E, size of the input and output features; split over ``num_heads``.
        num_heads: Hq, query heads; each has ``E // Hq`` dims.
        num_kv_heads: Hkv key/value heads (default Hq); fewer gives grouped-query
            attention (GQA), 1 gives multi-query attention. Must divide ``num_heads``.
        kdim, vdim: feature sizes of the context used for keys and values (default E).
        bias: add a bias to every projection.
        dropout: dropout on the attention weights, in training mode only.
        rotary: optional :class:`qkv.positional.RotaryEmbedding`-like module applied to
            queries and keys (called as ``rotary(x, offset)`` on ``(B, H, L, Dh)``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        rotary: nn.Module | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads),
                          ("num_kv_heads", num_kv_heads), ("kdim", kdim), ("vdim", vdim)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral):
                raise TypeError(f"{name} must be a positive int; got {type(val).__name__} "
                                f"{val!r}. Fix: {name}=int(...)")
            if val < 1:
                raise ValueError(f"{name} must be a positive int; got {val!r}. Fix: a size "
                                 "of at least 1")
        embed_dim, num_heads, num_kv_heads = int(embed_dim), int(num_heads), int(num_kv_heads)
        kdim, vdim = int(kdim), int(vdim)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; "
                             "each head gets embed_dim // num_heads dims. Fix: num_heads that "
                             "divides embed_dim")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} does not divide num_heads {num_heads};"
                             " the query heads must be a multiple of the key heads (GQA). Fix: "
                             "num_kv_heads that divides num_heads")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a probability in [0, 1); got "
                            f"{type(dropout).__name__} {dropout!r}. Fix: dropout=0.1, or 0")
        if not 0.0 <= float(dropout) < 1.0:  # also refuses NaN
            raise ValueError(f"dropout must be a probability in [0, 1); got {dropout!r}. "
                             "Fix: dropout=0.1, or 0 to turn it off")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(kdim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(vdim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.rotary = rotary
        self._packed: tuple[Tensor, Tensor | None] | None = None
        self._pack()
        self.reset_parameters()

    # ---- one matmul for q, k and v ---------------------------------------------------------
    # The weights (and biases) of q_proj, k_proj and v_proj are rows of one buffer, so that
    # self-attention without gradients projects x with one matmul, reading the parameters'
    # live memory (never a copy that could go stale). Anything that re-points a parameter
    # elsewhere (assigning .data, load_state_dict(assign=True)) or hooks on the projections
    # turn this off: every call checks; .to()/.half() re-pack.
    def _pack(self) -> None:
        lins = (self.q_proj, self.k_proj, self.v_proj)
        ws = [lin.weight for lin in lins]
        self._packed = None
        if any(w.dtype != ws[0].dtype or w.device != ws[0].device or w.shape[1] != ws[0].shape[1]
               for w in ws) or ws[0].device.type == "meta":
            return
        has_bias = self.q_proj.bias is not None
        with torch.no_grad():
            packed_w = torch.cat([w.detach() for w in ws])  # (E + 2 Hkv Dh, E)
            packed_b = torch.cat([lin.bias.detach() for lin in lins]) if has_bias else None
            rows, layout = 0, []
            for lin in lins:
                n = lin.weight.shape[0]
                lin.weight.data = packed_w[rows : rows + n]
                if has_bias:
                    lin.bias.data = packed_b[rows : rows + n]
                # element offsets of this projection's weight and bias, weight's size
                layout.append((rows * packed_w.shape[1], rows, lin.weight.numel()))
                rows += n
        self._packed = (packed_w, packed_b, tuple(layout))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pack()
        return self

    def _packed_in_proj(self) -> tuple[Tensor, Tensor | None] | None:
        """The packed (weight, bias) while the q/k/v parameters are still its rows (and
        no hook expects the projections to be called), else None. Reads ``_modules`` and
        ``_parameters`` directly: nn.Module's attribute lookup costs more than the check."""
        p = self._packed
        if p is None or _global_hooks():
            return None
        w, b, layout = p
        mods = self._modules
        size = w.element_size()
        wp, bp = w.data_ptr(), (0 if b is None else b.data_ptr())
        for name, (w_off, b_off, numel) in zip(("q_proj", "k_proj", "v_proj"), layout, strict=True):
            lin = mods[name]
            if type(lin) is not nn.Linear or _has_hooks(lin):  # hooks must see their call
                return None
            params = lin._parameters
            lw, lb = params.get("weight"), params.get("bias")
            if (lw is None or lw.data_ptr() != wp + w_off * size or lw.dtype != w.dtype
                    or lw.numel() != numel or not lw.is_contiguous()):
                return None
            if (lb is None) != (b is None) or (b is not None and (
                    lb.data_ptr() != bp + b_off * size or lb.dtype != b.dtype)):
                return None
        return w, b

    def reset_parameters(self) -> None:
        """Initialise as ``torch.nn.MultiheadAttention`` does (Xavier, zero biases)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}")

    def _split(self, x: Tensor, heads: int) -> Tensor:
        b, l, _ = x.shape
        return x.view(b, l, heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        window: int | tuple[int | None, int | None] | None = None,
        need_weights: bool = False,
        cache: KVCache | None = None,
        backend: str = "auto",
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``x (B, Lq, E)`` to ``context (B, Lk, kdim)`` (default: ``x``).

        ``mask`` broadcasts to ``(B, Hq, Lq, Lk)`` (bool True = may attend, or additive
        float); use :func:`qkv.padding_mask` for key padding. With ``cache``, ``Lk``
        counts every cached key. Returns ``out (B, Lq, E)`` and, with ``need_weights``,
        the per-head weights ``(B, Hq, Lq, Lk)``.
        """
        if context is not None:
            self._check_seq("x", x, None, self.embed_dim)
            self._check_seq("context", context, x, self.kdim)
            if self.kdim != self.vdim:
                raise ValueError(f"this module has kdim={self.kdim} != vdim={self.vdim}, so one "
                                 "context cannot give both keys and values. Fix: "
                                 "forward_kv(x, key, value)")
        return self.forward_kv(x, context, context, mask=mask, causal=causal, window=window,
                               need_weights=need_weights, cache=cache, backend=backend)

    def _check_seq(self, name: str, t, x: Tensor | None, dim: int) -> None:
        """Refuse ``t`` unless it is a (B, L, dim) tensor (B that of ``x`` when given)."""
        if (isinstance(t, Tensor) and t.dim() == 3 and t.shape[-1] == dim
                and (x is None or t.shape[0] == x.shape[0])):
            return
        got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        b = "B" if x is None else x.shape[0]
        exc = ValueError if isinstance(t, Tensor) else TypeError
        raise exc(f"{name} must be a tensor of shape ({b}, L, {dim}); got {got}. Fix: "
                  f"{name} of shape (batch, tokens, {dim})"
                  + ("" if x is None else ", with the batch of x"))

    def _explain_failure(self, x: Tensor, key, value) -> None:
        """After a RuntimeError inside forward: raise the input error that caused it, if any."""
        w = self.q_proj.weight
        for name, t in (("x", x), ("key", key), ("value", value)):
            if t is None:
                continue
            if t.dtype != w.dtype:
                raise TypeError(f"{name} is {t.dtype} but the module's parameters are "
                                f"{w.dtype}. Fix: {name}.to({w.dtype}) or module.to({t.dtype})")
            if t.device != w.device:
                raise ValueError(f"{name} is on {t.device} but the module's parameters on "
                                 f"{w.device}. Fix: {name}.to({str(w.device)!r}) or "
                                 f"module.to({str(t.device)!r})")

    def forward_kv(
        self,
        x: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        window=None,
        need_weights: bool = False,
        cache: KVCache | None = None,
        backend: str = "auto",
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Like :meth:`forward` with separate key ``(B, Lk, kdim)`` and value
        ``(B, Lk, vdim)`` inputs (None for self-attention)."""
        self._check_seq("x", x, None, self.embed_dim)
        is_cross = key is not None
        if is_cross or value is not None:
            self._check_seq("key", key, x, self.kdim)
            self._check_seq("value", value, x, self.vdim)
            if key.shape[1] != value.shape[1]:
                raise ValueError(f"key has {key.shape[1]} tokens but value {value.shape[1]}; "
                                 "each key needs exactly one value. Fix: key and value from "
                                 "the same tokens")
        elif self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            raise ValueError(f"self-attention needs kdim == vdim == embed_dim; this module has "
                             f"kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}. "
                             "Fix: pass a context for cross-attention")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a qkv.KVCache; got {type(cache).__name__}. Fix: "
                            "cache=qkv.KVCache(), one per layer")
        if need_weights is not True and need_weights is not False:
            raise TypeError(f"need_weights must be True or False; got {need_weights!r}. Fix: "
                            "need_weights=bool(...)")
        try:
            return self._attend(x, key, value, mask=mask, causal=causal, window=window,
                                need_weights=need_weights, cache=cache, backend=backend)
        except RuntimeError:
            self._explain_failure(x, key, value)
            raise

    def _attend(self, x, key, value, *, mask, causal, window, need_weights, cache, backend):
        b, lq, _ = x.shape
        is_cross = key is not None
        offset = 0 if (cache is None or is_cross) else cache.length
        packed = None if is_cross or torch.is_grad_enabled() else self._packed_in_proj()
        if packed is not None:  # self-attention, no gradients: one matmul
            hq, hkv = self.num_heads, self.num_kv_heads
            heads = F.linear(x, *packed).view(b, lq, hq + 2 * hkv, self.head_dim).transpose(1, 2)
            q = heads[:, :hq]  # (B, Hq, Lq, Dh)
            k = heads[:, hq : hq + hkv]  # (B, Hkv, Lk, Dh)
            v = heads[:, hq + hkv :]  # (B, Hkv, Lk, Dh)
        else:
            q = self._split(_project(self.q_proj, x), self.num_heads)  # (B, Hq, Lq, Dh)
        if packed is not None:
            if self.rotary is not None:
                k = self.rotary(k, offset)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, Hkv, offset + Lk, Dh)
        elif is_cross and cache is not None and cache.length > 0:
            k, v = cache.k, cache.v  # the context was projected on the first step
        else:
            src_k = x if key is None else key
            src_v = x if value is None else value
            k = self._split(_project(self.k_proj, src_k), self.num_kv_heads)  # (B, Hkv, Lk, Dh)
            v = self._split(_project(self.v_proj, src_v), self.num_kv_heads)  # (B, Hkv, Lk, Dh)
            if self.rotary is not None and not is_cross:
                k = self.rotary(k, offset)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, Hkv, offset + Lk, Dh)
        if self.rotary is not None and not is_cross:
            q = self.rotary(q, offset)
        res = attention(
            q, k, v, mask=mask, causal=causal, window=window,
            dropout=self.dropout if self.training else 0.0,
            return_weights=need_weights, backend=backend,
        )
        out, weights = res if need_weights else (res, None)
        out = out.transpose(1, 2).reshape(b, lq, self.embed_dim)  # (B, Lq, E)
        out = _project(self.out_proj, out)  # (B, Lq, E)
        return (out, weights) if need_weights else out

    # ---- exact conversion to and from torch.nn.MultiheadAttention --------------------------
    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` exactly.

        The result is batch-first whatever ``m.batch_first`` is. ``add_bias_kv`` and
        ``add_zero_attn`` have no counterpart and are refused.
        """
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects torch.nn.MultiheadAttention; got "
                            f"{type(m).__name__}. Fix: pass the torch module itself")
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError("from_torch cannot convert add_bias_kv=True or add_zero_attn=True;"
                             " qkv has no extra learned or zero key. Fix: convert a module "
                             "built without them")
        w = m.in_proj_weight if m._qkv_same_embed_dim else None
        has_bias = m.in_proj_bias is not None
        p = next(m.parameters())
        new = cls(m.embed_dim, m.num_heads, kdim=m.kdim, vdim=m.vdim, bias=has_bias,
                  dropout=m.dropout, device=p.device, dtype=p.dtype)
        e = m.embed_dim
        with torch.no_grad():
            if w is not None:
                new.q_proj.weight.copy_(w[:e])
                new.k_proj.weight.copy_(w[e : 2 * e])
                new.v_proj.weight.copy_(w[2 * e :])
            else:
                new.q_proj.weight.copy_(m.q_proj_weight)
                new.k_proj.weight.copy_(m.k_proj_weight)
                new.v_proj.weight.copy_(m.v_proj_weight)
            if has_bias:
                new.q_proj.bias.copy_(m.in_proj_bias[:e])
                new.k_proj.bias.copy_(m.in_proj_bias[e : 2 * e])
                new.v_proj.bias.copy_(m.in_proj_bias[2 * e :])
            new.out_proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
        new.train(m.training)
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """A ``torch.nn.MultiheadAttention(batch_first=True)`` with the same weights."""
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"to_torch cannot convert GQA (num_kv_heads={self.num_kv_heads} != "
                             f"num_heads={self.num_heads}); torch's module has no GQA. Fix: "
                             "build it with num_kv_heads=num_heads")
        if self.rotary is not None:
            raise ValueError("to_torch cannot convert a module with rotary embeddings; torch's "
                             "module has none. Fix: build it with rotary=None")
        has_bias = self.q_proj.bias is not None
        p = self.q_proj.weight
        m = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                  bias=has_bias, kdim=self.kdim, vdim=self.vdim,
                                  batch_first=True, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                m.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight,
                                                  self.v_proj.weight]))
            else:
                m.q_proj_weight.copy_(self.q_proj.weight)
                m.k_proj_weight.copy_(self.k_proj.weight)
                m.v_proj_weight.copy_(self.v_proj.weight)
            if has_bias:
                m.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias,
                                                self.v_proj.bias]))
                m.out_proj.bias.copy_(self.out_proj.bias)
            m.out_proj.weight.copy_(self.out_proj.weight)
        m.train(self.training)
        return m

