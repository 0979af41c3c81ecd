"""``qkv.capture``: the exact attention weights of an unchanged PyTorch model.

Inside ``with qkv.capture(model) as cap:`` every attention call the model makes through
PyTorch or qkv is recorded:

* ``torch.nn.functional.scaled_dot_product_attention`` (seen by a ``TorchFunctionMode``;
  Hugging Face models with ``attn_implementation="sdpa"``, most modern PyTorch code);
* ``torch.nn.MultiheadAttention`` and ``torch.nn.TransformerEncoderLayer``, on their fused
  fast path too (their ``forward`` is wrapped for the duration of the block);
* :func:`qkv.attention` (and so :class:`qkv.MultiHeadAttention` and qkv's models).

The model's own call runs exactly as without capture (bit-identical outputs). Then qkv
computes the weights from the same queries, keys, mask and scale
(:mod:`qkv.capture_weights`), for the heads and query rows asked for only, in float32.
Attention written by hand (``softmax(q @ k.T)``) calls none of these and is not seen:
``cap.calls`` stays empty.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import functional as _functional
from .capture_torch import mha_inputs
from .capture_weights import Band, band_rows, normalize_index, selected_weights

__all__ = ["AttentionCall", "Capture", "capture"]

_SDPA = inspect.Signature([
    inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
    for n, d in (("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
                 ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
                 ("is_causal", False), ("scale", None), ("enable_gqa", False))
])
_active: list[Capture] = []


@dataclass
class AttentionCall:
    """What one recorded attention call did.

    ``causal`` is ``"top-left"`` (PyTorch's ``is_causal``: query ``i`` sees keys ``<= i``),
    ``"bottom-right"`` (qkv's ``causal``: keys ``<= i + Lk - Lq``) or None; ``mask`` is
    ``"bool"``, ``"float"`` or None with its ``mask_shape``; ``gqa`` is True when query
    heads share key heads (``kv_heads < heads``). ``kept_heads``/``kept_queries`` are the
    rows of ``cap.weights[index]`` (empty when the call was not kept).
    """

    index: int
    kind: str  # "sdpa", "multihead_attention", "qkv.attention"
    module: str  # dotted path of the module that made the call ("" = the model itself)
    batch: int
    heads: int
    kv_heads: int
    lq: int
    lk: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    causal: str | None = None
    window: tuple[int | None, int | None] | None = None
    mask: str | None = None
    mask_shape: tuple[int, ...] | None = None
    dropout: float = 0.0
    kept: bool = False
    kept_heads: list[int] = field(default_factory=list)
    kept_queries: list[int] = field(default_factory=list)
    #: bool ``(B, len(kept_queries), Lk)``, True = visible, when the mask and band are the
    #: same for every head (for the viewers' triangle); None otherwise.
    visible: Tensor | None = field(default=None, repr=False)

    @property
    def gqa(self) -> bool:
        return self.kv_heads < self.heads


class Capture:
    """The record of a ``qkv.capture`` block: ``calls`` and ``weights`` in call order.

    ``weights[i]`` is ``(B, len(kept_heads), len(kept_queries), Lk)`` float32 on the
    model's device, or None for a call that ``layers=`` did not keep.
    """

    def __init__(self, model: nn.Module | None, *, layers, heads, queries, budget):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (or None to record without "
                            f"module names); got {type(model).__name__}")
        self.model = model
        self.layers = _check_layers(layers)
        self.heads = _check_selection(heads, "heads")
        self.queries = _check_selection(queries, "queries")
        self.budget = budget
        self.calls: list[AttentionCall] = []
        self.weights: list[Tensor | None] = []
        self._stack: list[str] = []
        self._names: dict[int, str] = {}
        self._busy = 0
        self._seen_mha = False  # set when a wrapped MultiheadAttention recorded itself
        self._undo: list = []

    # ---- the block ------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Capture:
        if _active:
            raise ValueError("qkv.capture blocks cannot be nested; close the outer one first "
                             "(one block records every call made inside it)")
        if self.model is not None:
            # Global module hooks, not per-module ones: PyTorch's fused encoder layer
            # leaves its fast path when its submodules carry hooks.
            self._names = {id(mod): name for name, mod in self.model.named_modules()}
            self._undo.append(nn.modules.module.register_module_forward_pre_hook(
                self._push).remove)
            self._undo.append(nn.modules.module.register_module_forward_hook(
                self._pop, always_call=True).remove)
            for name, mod in self.model.named_modules():
                if type(mod).forward in _WRAPPED:
                    self._wrap(mod, name, _WRAPPED[type(mod).forward])
        mode = _SDPAMode(self)
        mode.__enter__()
        self._undo.append(lambda: mode.__exit__(None, None, None))
        _functional._observers.append(self._observe)
        self._undo.append(_functional._observers.pop)
        _active.append(self)
        self._undo.append(_active.pop)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _push(self, mod, _args):
        name = self._names.get(id(mod))
        if name is not None:
            self._stack.append(name)

    def _pop(self, mod, _args, _out):
        if id(mod) in self._names and self._stack:
            self._stack.pop()

    def _wrap(self, mod: nn.Module, name: str, record) -> None:
        """Run ``mod.forward`` with torch-function handling off (so PyTorch keeps its fused
        fast path, as without capture), then record its attention with ``record``."""
        orig = mod.forward

        def forward(*args, **kwargs):
            self._busy += 1
            try:
                with torch._C.DisableTorchFunction():
                    self._seen_mha = False
                    out = orig(*args, **kwargs)
            finally:
                self._busy -= 1
            record(self, mod, name, inspect.signature(orig).bind(*args, **kwargs))
            return out

        mod.forward = forward
        self._undo.append(lambda: mod.__dict__.pop("forward", None))

    # ---- recording ------------------------------------------------------------------------
    def _observe(self, run, q, k, v, **opts):
        """qkv.attention: run it, then record it (its inner SDPA call is not recorded)."""
        if self._busy:
            return run(q, k, v, **opts)
        self._busy += 1
        try:
            out = run(q, k, v, **opts)
        finally:
            self._busy -= 1
        lq, lk = q.shape[-2], k.shape[-2]
        off = lk - lq
        left, right = _functional._parse_window(opts["window"])
        band: Band = (None if left is None else off - left, None if right is None else off + right)
        if opts["causal"]:
            band = (band[0], off if band[1] is None else min(band[1], off))
        self.record("qkv.attention", q, k, mask=opts["mask"], band=band,
                    scale=opts["scale"], dropout=opts["dropout"],
                    causal="bottom-right" if opts["causal"] else None,
                    window=opts["window"] if opts["window"] is None else (left, right))
        return out

    def _sdpa(self, args, kwargs) -> None:
        a = _SDPA.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        self.record("sdpa", p["query"], p["key"], mask=p["attn_mask"],
                    band=(None, 0) if p["is_causal"] else (None, None), scale=p["scale"],
                    dropout=float(p["dropout_p"]), causal="top-left" if p["is_causal"] else None)

    def record(self, kind: str, q: Tensor, k: Tensor, *, mask: Tensor | None, band: Band,
               scale: float | None, dropout: float = 0.0, causal: str | None = None,
               window=None, module: str | None = None) -> None:
        """Record one call: ``q (..., Hq, Lq, D)``, ``k (..., Hkv, Lk, D)``, a mask
        broadcastable to ``(..., Hq, Lq, Lk)`` (bool True = visible, or additive)."""
        if q.is_nested or k.is_nested:
            warnings.warn(f"qkv.capture: a {kind} call on nested tensors is not recorded",
                          stacklevel=3)
            return
        if q.dim() == 3:  # (B, L, D) as PyTorch's SDPA allows: one head
            q, k = q.unsqueeze(1), k.unsqueeze(1)
            mask = None if mask is None or mask.dim() < 3 else mask.unsqueeze(1)
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3])
        q = q.expand(*lead, *q.shape[-3:]).reshape(-1, *q.shape[-3:])  # (B, Hq, Lq, D)
        k = k.expand(*lead, *k.shape[-3:]).reshape(-1, *k.shape[-3:])  # (B, Hkv, Lk, D)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if mask is not None:
            allowed, bias = _functional._canonical_mask(mask, lead, (hq, lq, lk), q.device)
            mask4 = allowed if allowed is not None else bias  # (B|1, Hq|1, Lq|1, Lk|1)
        else:
            mask4 = None
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        index = len(self.calls)
        path = self._stack[-1] if module is None and self._stack else (module or "")
        call = AttentionCall(
            index=index, kind=kind, module=path, batch=b, heads=hq, kv_heads=hkv, lq=lq,
            lk=lk, head_dim=d, dtype=q.dtype, device=q.device, scale=scale, causal=causal,
            window=window, mask=None if mask is None else (
                "bool" if mask.dtype == torch.bool else "float"),
            mask_shape=None if mask is None else tuple(mask.shape), dropout=dropout,
        )
        w = None
        if self._keeps(index, path):
            heads = normalize_index(self.heads, hq, "heads")
            queries = normalize_index(self.queries, lq, "queries")
            self._busy += 1
            try:
                with torch.no_grad(), torch._C.DisableTorchFunction():
                    w = selected_weights(q.detach(), k.detach(), mask=mask4, band=band,
                                         scale=scale, heads=heads, queries=queries,
                                         budget=self.budget)
                    call.visible = _visible(mask4, band, queries, lq, lk, q.device)
            finally:
                self._busy -= 1
            call.kept = True
            call.kept_heads = list(range(hq)) if heads is None else heads
            call.kept_queries = list(range(lq)) if queries is None else queries
        self.calls.append(call)
        self.weights.append(w)

    def _keeps(self, index: int, path: str) -> bool:
        if self.layers is None:
            return True
        ints, patterns = self.layers
        return index in ints or any(fnmatch.fnmatchcase(path, p) for p in patterns)

    # ---- results --------------------------------------------------------------------------
    def to_map(self, tokens, *, batch: int = 0, calls=None, key_tokens=None, **fields):
        """An :class:`~qkv.AttentionMap` with one layer per kept call (or per ``calls``).

        Args:
            tokens: the query-side tokens of the calls (length Lq); rows not kept by
                ``queries=`` are left out of the map.
            batch: which batch row to show.
            calls: indices into ``cap.calls`` (default: every kept call). They must share
                their kept heads, rows and Lk (an encoder-decoder's self- and
                cross-attention go in separate maps).
            key_tokens: the key-side tokens (length Lk) for cross-attention.
            **fields: passed on to :class:`~qkv.AttentionMap` (``special``, ``model``...).
        """
        from .attention_map import AttentionMap

        chosen = [c.index for c in self.calls if c.kept] if calls is None else list(calls)
        if not chosen:
            raise ValueError("no attention call was kept: cap.calls is empty when the model "
                             "computes attention by hand (matmul + softmax), or layers= "
                             "selected none of them")
        for i in chosen:
            if not (0 <= i < len(self.calls)) or self.weights[i] is None:
                raise ValueError(f"call {i} has no weights; kept calls: "
                                 f"{[c.index for c in self.calls if c.kept]}")
        first = self.calls[chosen[0]]
        shape = self.weights[chosen[0]].shape
        odd = [i for i in chosen if self.weights[i].shape != shape]
        if odd:
            raise ValueError(f"calls {chosen[0]} and {odd[0]} have weights of shapes "
                             f"{tuple(shape)} and {tuple(self.weights[odd[0]].shape)}; one map "
                             "holds calls of one shape: pass calls=[...] (e.g. the "
                             "self-attention and the cross-attention calls apart)")
        if not 0 <= batch < shape[0]:
            raise ValueError(f"batch {batch} is out of range: the calls have batch {shape[0]}")
        tokens = list(tokens)
        if len(tokens) != first.lq:
            raise ValueError(f"{len(tokens)} tokens for calls with Lq={first.lq}; give one "
                             "token per query position")
        rows = first.kept_queries
        if key_tokens is None and (first.lk != first.lq or len(rows) != first.lq):
            if first.lk != first.lq:
                raise ValueError(f"the calls attend from {first.lq} queries to {first.lk} "
                                 "keys; pass key_tokens= (one per key)")
            key_tokens = tokens
        weights = torch.stack([self.weights[i][batch] for i in chosen])  # (n, h, nq, Lk)
        vis = [self.calls[i].visible for i in chosen]
        allowed = None
        if all(v is not None for v in vis) and all(torch.equal(v, vis[0]) for v in vis):
            allowed = vis[0][batch if vis[0].shape[0] > 1 else 0].cpu().numpy()
            if allowed.all():
                allowed = None
        fields.setdefault("head_labels", [str(h) for h in first.kept_heads])
        return AttentionMap(tokens=[tokens[r] for r in rows], key_tokens=key_tokens,
                            weights=weights.cpu().numpy(), allowed=allowed, **fields)


class _SDPAMode(TorchFunctionMode):
    """Sees every ``scaled_dot_product_attention`` call; runs it unchanged, then records."""

    def __init__(self, cap: Capture):
        super().__init__()
        self.cap = cap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and not self.cap._busy:
            self.cap._sdpa(args, kwargs)
        return out


def capture(model: nn.Module | None = None, *, layers=None, heads=None, queries=None,
            budget: int | None = None) -> Capture:
    """Record the attention weights of every attention call ``model`` makes in the block.

    Args:
        model: the model whose submodules name the calls (``cap.calls[i].module``) and
            whose ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` modules are
            recorded; None records SDPA and qkv calls only, without names. SDPA and qkv
            calls made outside ``model`` are recorded too.
        layers: which calls keep weights: None (all), call indices in order (ints), or
            module paths / ``fnmatch`` patterns (``"encoder.layer.1*"``); a mix is fine.
        heads: query heads to keep (ints, negative from the end), default all.
        queries: query rows to keep (ints, a slice or range), default all.
        budget: bytes of temporaries per call above which the weights are computed block
            by block (default :data:`qkv.capture_weights.MEMORY_BUDGET`).

    Returns a :class:`Capture` (use it as a context manager). The outputs of the model are
    exactly those of a run without capture; weights are float32 whatever the model dtype.
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget < 0):
        raise ValueError(f"budget must be a number of bytes >= 0; got {budget!r}")
    return Capture(model, layers=layers, heads=heads, queries=queries, budget=budget)


# ---- selections -------------------------------------------------------------------------------
def _check_layers(layers):
    if layers is None:
        return None
    if isinstance(layers, (int, str)) and not isinstance(layers, bool):
        layers = [layers]
    ints, patterns = set(), []
    for x in layers:
        if isinstance(x, str):
            patterns.append(x)
        elif isinstance(x, int) and not isinstance(x, bool) and x >= 0:
            ints.add(x)
        else:
            raise TypeError(f"layers must hold call indices (ints >= 0) or module paths "
                            f"(str, fnmatch patterns allowed); got {x!r}")
    return ints, patterns


def _check_selection(sel, what: str):
    if sel is None or isinstance(sel, slice):
        return sel
    if isinstance(sel, int) and not isinstance(sel, bool):
        return [sel]
    try:
        items = sel.tolist() if isinstance(sel, Tensor) else list(sel)
    except TypeError:
        raise TypeError(f"{what} must be None, an int, a slice or a list of ints; got "
                        f"{type(sel).__name__}") from None
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{what} must be ints; got {i!r} in {what}={sel!r}")
    return items


def _visible(mask4, band: Band, queries, lq: int, lk: int, device) -> Tensor | None:
    """Bool (B|1, nq, Lk) of what the kept rows may see, when it is the same for every
    head; None when the mask varies over heads."""
    rows = torch.arange(lq, device=device) if queries is None else torch.tensor(
        queries, dtype=torch.long, device=device)
    vis = band_rows(rows, lk, band)[None]  # (1, nq, Lk)
    if mask4 is None:
        return vis
    if mask4.shape[1] != 1:
        return None
    m = mask4[:, 0]  # (B|1, Lq|1, Lk|1)
    if m.shape[1] > 1:
        m = m[:, rows]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2  # -inf and "min of dtype" both hide
    return vis & m


# ---- PyTorch's attention modules --------------------------------------------------------------
def _record_mha(cap: Capture, mod: nn.MultiheadAttention, name: str, bound) -> None:
    cap._seen_mha = True
    a = bound.arguments
    got = mha_inputs(mod, a["query"], a["key"], a.get("key_padding_mask"), a.get("attn_mask"))
    if got is None:
        return
    q, k, mask = got
    cap.record("multihead_attention", q, k, mask=mask, band=(None, None), scale=None,
               dropout=mod.dropout if mod.training else 0.0, module=name)


def _record_encoder_layer(cap: Capture, mod: nn.TransformerEncoderLayer, name: str,
                          bound) -> None:
    if cap._seen_mha:  # the slow path ran self_attn, which recorded itself
        return
    a = bound.arguments
    src, kpm = a["src"], a.get("src_key_padding_mask")
    with torch.no_grad(), torch._C.DisableTorchFunction():
        if src.is_nested:  # nn.TransformerEncoder packed the padded batch: unpack it
            lengths = torch.tensor([t.shape[0] for t in src.unbind()], device=src.device)
            src = src.to_padded_tensor(0.0)  # (B, Lmax, E)
            kpm = torch.arange(src.shape[1], device=src.device)[None] >= lengths[:, None]
        x = mod.norm1(src) if mod.norm_first else src
    _record_mha(cap, mod.self_attn, f"{name}.self_attn" if name else "self_attn",
                _bind(mod.self_attn, x, x, x, key_padding_mask=kpm, attn_mask=a.get("src_mask")))


def _record_nothing(cap: Capture, mod, name, bound) -> None:
    """TransformerEncoder: its layers record themselves."""


def _bind(mod, *args, **kwargs):
    return inspect.signature(type(mod).forward).bind(mod, *args, **kwargs)


_WRAPPED = {
    nn.MultiheadAttention.forward: _record_mha,
    nn.TransformerEncoderLayer.forward: _record_encoder_layer,
    nn.TransformerEncoder.forward: _record_nothing,
}
