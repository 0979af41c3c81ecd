"""Shared test helpers: random inputs, the float64 oracle, and the low-precision rule.

The low-precision rule (DESIGN.md, as FlashAttention's tests apply it): a backend's max
error against the float64 oracle may be at most ``factor`` (2 for outputs, 3-5 for
gradients) times the error of a *low-precision baseline* plus ``atol`` (1e-5). The baseline
is the plain textbook computation carried out in the input dtype: ``q @ k^T`` in fp16/bf16,
softmax in float32, weights rounded to the input dtype, ``@ v`` in the input dtype. Its error
is what rounding to that dtype alone costs, so the bound is derived, not guessed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

import qkv
from qkv import causal_mask, reference_numpy, window_mask

#: Backends that run on CPU tensors here (the Triton kernels have their own test file,
#: run under the interpreter).
CPU_BACKENDS = [name for name in qkv.backends() if name != "triton"]


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


def lowp_baseline(q, k, v, *, mask=None, causal=False, window=None, scale=None,
                  operands=None):
    """Attention computed naively in the input dtype (see the module docstring).

    ``operands``, when given, is applied to both matmuls' operands first (e.g. rounding
    float32 to the TF32 a GPU's tensor cores compute with).
    """
    op = operands or (lambda t: t)
    groups = q.shape[-3] // k.shape[-3]
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk = k.repeat_interleave(groups, dim=-3)  # (..., Hq, Lk, D)
    vv = v.repeat_interleave(groups, dim=-3)  # (..., Hq, Lk, Dv)
    scores = (op(q) @ op(kk).transpose(-1, -2)).float() * scale  # (..., Hq, Lq, Lk)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)  # (Lq, Lk)
    if causal:
        allowed &= causal_mask(lq, lk, device=q.device)
    if window is not None:
        allowed = allowed & window_mask(lq, lk, window, device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask  # broadcasts to (..., Hq, Lq, Lk)
    elif mask is not None:
        scores = scores + mask.float()
    # Selected away, never multiplied: a fully hidden row gives weights 0, not NaN.
    scores = torch.where(allowed, scores, float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)  # (..., Hq, Lq, Lk)
    return op(w) @ op(vv)  # (..., Hq, Lq, Dv)


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


def assert_grads_lowp_rule(grads, q, k, v, dout, *, factor=3.0, baseline=None, **kw):
    """``grads`` (dq, dk, dv) of a call with options ``kw`` and output gradient ``dout``,
    against the float64 reference backend's by the derived rule: at most ``factor`` times
    the error of ``baseline`` (:func:`lowp_baseline` unless given) + 1e-5."""
    baseline = baseline or lowp_baseline
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(qkv.attention(q64, k64, v64, backend="reference", **kw),
                               (q64, k64, v64), dout.double())
    base = torch.autograd.grad(baseline(q, k, v, **kw), (q, k, v), dout)
    for name, g, w, b in zip("qkv", grads, want, base, strict=True):
        assert g.dtype == q.dtype and g.shape == w.shape, f"d{name}: {g.dtype} {g.shape}"
        assert_lowp_rule(g, w, b, factor=factor, what=f"d{name}")


@contextmanager
def one_thread():
    """Run torch on one thread: tiny models are fastest so, and a busy second core stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
