"""Shared test helpers: random inputs, the float64 oracle, and the low-precision rule.

The low-precision rule (DESIGN.md, as FlashAttention's tests apply it): a backend's max
error against the float64 oracle may be at most ``factor`` (2 for outputs, 3-5 for
gradients) times the error of a *low-precision baseline* plus ``atol`` (1e-5). The baseline
is the plain textbook computation carried out in the input dtype: ``q @ k^T`` in fp16/bf16,
softmax in float32, weights rounded to the input dtype, ``@ v`` in the input dtype. Its error
is what rounding to that dtype alone costs, so the bound is derived, not guessed.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from qkv import reference_numpy
from qkv.backends.reference import masked_softmax
from qkv.functional import _prepare


def rand_qkv(b, hq, hkv, lq, lk, d, dv=None, *, dtype=torch.float64, seed=0, batch=None,
             requires_grad=False):
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) from a seeded generator.

    ``batch`` replaces the single batch dim by a tuple of leading dims (or () for none).
    """
    g = torch.Generator().manual_seed(seed)
    lead = (b,) if batch is None else tuple(batch)
    dv = d if dv is None else dv
    q = torch.randn(*lead, hq, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(*lead, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(*lead, hkv, lk, dv, generator=g, dtype=torch.float64).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def oracle(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    """The float64 NumPy oracle as torch float64 tensors: (out, weights)."""
    def np64(t):
        return None if t is None else t.detach().cpu().to(torch.float64).numpy() \
            if t.dtype != torch.bool else t.detach().cpu().numpy()
    out, w = reference_numpy.attention(np64(q), np64(k), np64(v), mask=np64(mask),
                                       causal=causal, window=window, scale=scale)
    return torch.from_numpy(out), torch.from_numpy(w)


def lowp_baseline(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    """Attention computed naively in the input dtype (see the module docstring)."""
    call, batch_shape = _prepare(q, k, v, mask=mask, causal=causal, window=window,
                                 scale=scale, dropout=0.0, return_weights=False,
                                 generator=None)
    kk = call.k.repeat_interleave(call.groups, dim=1)  # (B, Hq, Lk, D)
    vv = call.v.repeat_interleave(call.groups, dim=1)  # (B, Hq, Lk, Dv)
    scores = (call.q @ kk.transpose(-1, -2)).float() * call.scale  # (B, Hq, Lq, Lk)
    allowed, bias = call.mask.dense(q.device)
    if bias is not None:
        scores = scores + bias.float()
    w = masked_softmax(scores, allowed).to(q.dtype)  # (B, Hq, Lq, Lk)
    out = w @ vv  # (B, Hq, Lq, Dv)
    return out.reshape(*batch_shape, *out.shape[1:])


def max_err(a, b) -> float:
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max()) \
        if a.numel() else 0.0


def assert_lowp_rule(got, want64, baseline, *, factor=2.0, atol=1e-5, what="output"):
    """max|got - want64| <= factor * max|baseline - want64| + atol."""
    err, base = max_err(got, want64), max_err(baseline, want64)
    assert np.isfinite(err), f"{what}: non-finite error"
    assert err <= factor * base + atol, (
        f"{what}: error {err:.3e} exceeds {factor} x baseline error {base:.3e} + {atol:g}"
    )


@contextmanager
def one_thread():
    """Run torch on one thread: tiny models are fastest so, and a busy second core stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
