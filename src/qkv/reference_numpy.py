"""The mechanism in float64 NumPy, written as plainly as a textbook: the test oracle.

Nothing here is fast or clever; every step is the formula. One head at a time:

1. scores  = q @ k.T                        (Lq, Lk)
2. scaled  = scores * scale                 scale = 1 / sqrt(D) unless given
3. masked  = scaled + bias, -inf where a key is hidden
4. weights = softmax(masked) over the keys   (a row with no visible key is all 0)
5. output  = weights @ v                     (Lq, Dv)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["attention", "multi_head_attention", "softmax", "visible"]


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; entries of -inf get 0 and an all -inf row gives all 0."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        seen = row != -np.inf
        if not seen.any():
            continue  # no visible key: the row stays 0
        with np.errstate(invalid="ignore"):  # inf - inf: NaN propagates, as it should
            e = np.exp(row[seen] - row[seen].max())
        out[idx][seen] = e / e.sum()
    return out


def visible(lq: int, lk: int, causal: bool = False, window=None) -> np.ndarray:
    """Bool (Lq, Lk): which keys each query may see under causal/window (bottom-right)."""
    left, right = (window, window) if isinstance(window, int) else (window or (None, None))
    out = np.ones((lq, lk), dtype=bool)
    for i in range(lq):
        aligned = i + (lk - lq)  # the key position query i lines up with
        for j in range(lk):
            if causal and j > aligned:
                out[i, j] = False
            if left is not None and j < aligned - left:
                out[i, j] = False
            if right is not None and j > aligned + right:
                out[i, j] = False
    return out


def attention(q, k, v, mask=None, causal=False, window=None, scale=None):
    """Attention of q (..., Hq, Lq, D), k (..., Hkv, Lk, D), v (..., Hkv, Lk, Dv).

    ``mask``: bool (True = may attend) or float (added), broadcastable to (..., Hq, Lq, Lk).
    Returns ``(output (..., Hq, Lq, Dv), weights (..., Hq, Lq, Lk))`` in float64.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    *batch, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[-3], k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    full = (*batch, hq, lq, lk)
    hidden = ~visible(lq, lk, causal, window)
    bias = np.zeros(full)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            hidden = hidden | ~np.broadcast_to(mask, full)
        else:
            bias = np.broadcast_to(mask.astype(np.float64), full)
    hidden = np.broadcast_to(hidden, full)

    out = np.zeros((*batch, hq, lq, dv))
    weights = np.zeros(full)
    for b in np.ndindex(*batch):
        for h in range(hq):
            kv = h // (hq // hkv)  # the key/value head this query head reads (GQA)
            scores = q[b][h] @ k[b][kv].T  # step 1: (Lq, Lk)
            scaled = scores * scale  # step 2
            blocked = hidden[b][h] | (bias[b][h] == -np.inf)  # (Lq, Lk): -inf hides too
            masked = np.where(blocked, -np.inf, scaled + bias[b][h])  # step 3
            w = softmax(masked)  # step 4
            vals = np.where(blocked.all(axis=0)[:, None], 0.0, v[b][kv])
            # step 5 (keys nobody sees contribute nothing; a query that sees no key gets 0,
            # even where a value it cannot see holds NaN)
            out[b][h] = np.where(blocked.all(axis=1)[:, None], 0.0, w @ vals)
            weights[b][h] = w
    return out, weights


def multi_head_attention(x, context, w_q, w_k, w_v, w_o, b_q=None, b_k=None, b_v=None,
                         b_o=None, num_heads=1, num_kv_heads=None, mask=None, causal=False):
    """Multi-head attention of x (B, Lq, E) over context (B, Lk, Ek) (None: x itself).

    Weights are stored like ``torch.nn.Linear``: ``w_q (E, E)``, ``w_k (Hkv*Dh, Ek)``, ...
    Returns ``(output (B, Lq, E), weights (B, Hq, Lq, Lk))``.
    """
    x = np.asarray(x, dtype=np.float64)
    context = x if context is None else np.asarray(context, dtype=np.float64)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads

    def linear(t, w, bias):
        y = t @ np.asarray(w, dtype=np.float64).T
        return y if bias is None else y + np.asarray(bias, dtype=np.float64)

    def split(t, heads):  # (B, L, H*Dh) -> (B, H, L, Dh)
        bsz, length, _ = t.shape
        return t.reshape(bsz, length, heads, -1).transpose(0, 2, 1, 3)

    q = split(linear(x, w_q, b_q), num_heads)
    k = split(linear(context, w_k, b_k), num_kv_heads)
    v = split(linear(context, w_v, b_v), num_kv_heads)
    heads, weights = attention(q, k, v, mask=mask, causal=causal)
    bsz, _, lq, _ = heads.shape
    concat = heads.transpose(0, 2, 1, 3).reshape(bsz, lq, -1)  # (B, Lq, Hq*Dh)
    return linear(concat, w_o, b_o), weights
