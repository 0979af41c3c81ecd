"""The weights :func:`qkv.capture` keeps: exact, for the selected heads and query rows only.

:func:`selected_weights` takes the queries and keys of one attention call as the model
made them, selects the heads and query rows to keep *before* any score is computed, and
computes ``softmax(q @ k^T * scale + mask)`` for those, with the semantics of
:func:`qkv.attention` (``return_weights=True``): at once when the result is small, and
above :data:`MEMORY_BUDGET` with the chunked backend (blocks of scores written straight
into the kept tensor from each row's log-sum-exp), so memory is then the kept weights plus
one block.

Which keys a query sees is given as a *band*: query ``p`` (its row in the call) may see key
``j`` iff ``p + lo <= j <= p + hi`` (``None`` = unbounded). PyTorch's ``is_causal`` is the
top-left band ``hi = 0``; qkv's ``causal`` is bottom-right, ``hi = Lk - Lq``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels.chunked.threads import Queue, run_shares, workers

__all__ = ["MEMORY_BUDGET", "Band", "band_rows", "normalize_index", "selected_weights"]

#: Above this many bytes of temporaries (3x the kept weights: scores, weights, the band)
#: the weights are computed by the chunked backend, block by block, instead of at once.
MEMORY_BUDGET: int = 256 << 20

Band = tuple[int | None, int | None]  # (lo, hi): query p sees keys p+lo .. p+hi


def normalize_index(sel, n: int, what: str) -> list[int] | None:
    """``None`` (all), an int, a slice/range or an iterable of ints -> sorted-as-given
    list of indices in ``0..n-1`` (negative ints count from the end)."""
    if sel is None:
        return None
    if isinstance(sel, slice):
        return list(range(n))[sel]
    if isinstance(sel, Tensor):
        sel = sel.tolist()
    if isinstance(sel, int) and not isinstance(sel, bool):
        sel = [sel]
    out = []
    for i in sel:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{what} must be ints; got {i!r}")
        if not -n <= i < n:
            raise ValueError(f"{what} {i} is out of range for a call with {n} {what}; "
                             f"expected -{n}..{n - 1}")
        out.append(i % n)
    return out


def band_rows(rows: Tensor, lk: int, band: Band) -> Tensor:
    """Bool ``(len(rows), Lk)``: True where query ``rows[r]`` may see key ``j``."""
    lo, hi = band
    j = torch.arange(lk, device=rows.device)  # (Lk,)
    p = rows[:, None]  # (n, 1)
    ok = torch.ones(len(rows), lk, dtype=torch.bool, device=rows.device)  # (n, Lk)
    if lo is not None:
        ok &= j >= p + lo
    if hi is not None:
        ok &= j <= p + hi
    return ok


def selected_weights(q: Tensor, k: Tensor, *, mask: Tensor | None, band: Band,
                     scale: float, heads: list[int] | None, queries: list[int] | None,
                     budget: int | None = None) -> Tensor:
    """Exact attention weights ``(B, len(heads), len(queries), Lk)`` in float32.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (query head
            ``h`` reads key head ``h // (Hq // Hkv)``).
        mask: bool (True = may attend) or float (added to the scaled scores),
            broadcastable to ``(B, Hq, Lq, Lk)``; or None.
        band: ``(lo, hi)``, see the module docstring; ``(None, None)`` = no band.
        scale: multiplies ``q @ k^T``.
        heads, queries: indices to keep (None = all).
        budget: bytes of temporaries above which the chunked backend is used
            (default :data:`MEMORY_BUDGET`).

    Rows that see no key are 0. Low-precision inputs are upcast to float32 (float64 stays
    float64 until the result is cast to float32).
    """
    from .functional import attention

    _, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B|1, H|1, Lq|1, Lk|1)
    if heads is not None:
        g = hq // hkv
        q = q[:, heads]  # (B, h, Lq, D)
        k = k[:, [h // g for h in heads]]  # (B, h, Lk, D): GQA resolved by indexing
        if mask is not None and mask.shape[1] > 1:
            mask = mask[:, heads]
    lo, hi = band
    window = None
    keep_lk = lk
    if queries is not None:
        rows = torch.tensor(queries, dtype=torch.long, device=q.device)
        q = q[:, :, rows]  # (B, h, n, D)
        if mask is not None and mask.shape[2] > 1:
            mask = mask[:, :, rows]
        if lo is not None or hi is not None:
            mask = _and(mask, band_rows(rows, lk, band))  # (.., n, Lk)
    elif lo is not None or hi is not None:
        off = lk - lq
        if hi is not None and hi - off < 0:
            # Keys after row Lq-1+hi are hidden from every query: drop them (top-left
            # causal with Lk > Lq), so the band becomes bottom-right aligned.
            keep_lk = max(0, min(lk, lq + hi))
            k = k[:, :, :keep_lk]
            if mask is not None and mask.shape[3] > 1:
                mask = mask[..., :keep_lk]
            off = keep_lk - lq
        right = None if hi is None else hi - off
        left = None if lo is None else off - lo
        if (left is not None and left < 0) or (right is not None and right < 0):
            rows = torch.arange(lq, device=q.device)
            mask = _and(mask, band_rows(rows, keep_lk, band))  # rare: an explicit (Lq, Lk)
        else:
            window = (left, right)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(ct), k.to(ct)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(ct)
    nb, nh, nq = q.shape[0], q.shape[1], q.shape[2]
    kept = nb * nh * nq * keep_lk * 4
    if nq == 0 or keep_lk == 0 or nh == 0:
        w = q.new_zeros(nb, nh, nq, keep_lk)
    elif 3 * kept <= (MEMORY_BUDGET if budget is None else budget):
        if window is not None:  # the band as a (Lq, Lk) bool, shared by every head
            rows = torch.arange(nq, device=q.device)
            mask = _and(mask, band_rows(rows, keep_lk, band))
        w = _direct(q, k, mask, float(scale))
    else:  # block by block, from each row's log-sum-exp: only the kept weights are L x L
        v = k[..., :1]  # (B, h, Lk, 1): the output is not wanted, only the weights
        _, w = attention(q, k, v, mask=mask, window=window, scale=float(scale),
                         return_weights=True, backend="chunked")  # (B, h, n, Lk')
    w = w.to(torch.float32)
    if keep_lk < lk:
        w = torch.nn.functional.pad(w, (0, lk - keep_lk))  # (B, h, n, Lk)
    return w


#: Elements of scores computed and normalised at a time by the direct path on CPU: a slab
#: of this size stays in cache between the matrix product that writes it and the softmax
#: (about twice as fast as one product and one softmax over everything).
SLAB_ELEMENTS: int = 1 << 17


def _direct(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(q @ k^T * scale + mask)`` into one new tensor, slab by slab (a few heads,
    or a few rows of one head) so each slab is normalised while it is in cache; rows that
    see no key are 0."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.empty(b * hq, lq, lk, dtype=q.dtype, device=q.device)  # (B*Hq, Lq, Lk)
    qs = (q * scale).reshape(b * hq, lq, d)  # (B*Hq, Lq, D)
    kt = k.transpose(-1, -2).reshape(b * hkv, d, lk)  # (B*Hkv, D, Lk)
    slab = SLAB_ELEMENTS if q.device.type == "cpu" else b * hq * lq * lk  # GPU: one go
    heads = max(1, slab // max(1, lq * lk)) if lq * lk <= slab else 1
    rows = lq if heads > 1 else max(1, min(lq, slab // lk))
    units = [(h0, min(b * hq, h0 + heads), r0, min(lq, r0 + rows))
             for h0 in range(0, b * hq, heads) for r0 in range(0, lq, rows)]

    def one(h0: int, h1: int, r0: int, r1: int) -> None:
        o = out[h0:h1, r0:r1]  # (n, r, Lk), contiguous: this unit's own rows
        if h1 - h0 == 1:
            kb = kt[h0 // hq * hkv + (h0 % hq) // g].unsqueeze(0)  # (1, D, Lk)
        else:
            bh = torch.arange(h0, h1, device=q.device)  # flat (batch, head) indices
            kb = kt[(bh // hq) * hkv + (bh % hq) // g]  # (n, D, Lk): their key heads
        torch.matmul(qs[h0:h1, r0:r1], kb, out=o)
        if mask is None:
            torch.ops.aten._softmax.out(o, -1, False, out=o)
            return
        if mask.shape[0] == 1 and mask.shape[1] == 1:
            m = mask[0]  # (1, Lq|1, Lk|1), the same for every head
        else:
            bh = torch.arange(h0, h1, device=q.device)
            m = mask[(bh // hq) if mask.shape[0] > 1 else 0,
                     (bh % hq) if mask.shape[1] > 1 else 0]  # (n, Lq|1, Lk|1)
        if m.shape[1] > 1:
            m = m[:, r0:r1]
        if m.dtype == torch.bool:
            o.masked_fill_(~m, -math.inf)
        else:
            o.add_(m).masked_fill_(m == -math.inf, -math.inf)  # NaN keys stay hidden
        empty = o.amax(dim=-1, keepdim=True) == -math.inf  # (n, r, 1): sees no key
        torch.ops.aten._softmax.out(o, -1, False, out=o)
        o.masked_fill_(empty, 0.0)

    # On CPU the units go to qkv's worker threads, each running single-threaded
    # operations (as the chunked backend does): each unit writes only its own rows.
    queue = Queue(units)
    n = min(len(units), workers(q.device))
    run_shares([queue] * n, lambda _i, share: [one(*u) for u in share])
    return out.view(b, hq, lq, lk)


def _and(mask: Tensor | None, ok: Tensor) -> Tensor:
    """Combine a user mask with a bool (n, Lk) band: hidden where either hides."""
    if mask is None:
        return ok[None, None]  # (1, 1, n, Lk)
    if mask.dtype == torch.bool:
        return mask & ok
    return mask.masked_fill(~ok, -math.inf)
