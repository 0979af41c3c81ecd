"""Silent wrong results on extreme but valid inputs: large finite biases, NaN/inf in visible
positions, NaN in keys that causal/window hide from every query.

Contract (docs/semantics.md): only ``-inf`` hides a key; a finite bias, however large, is a
real score. NaN/inf in a position a query can see propagates to that query's output (as in
PyTorch's math path); a query that sees no key gives 0; keys hidden from every query (by a
mask or by causal/window) are zeroed first, so nothing stored there leaks.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.kernels.chunked import block_sizes
from qkv.masks import Mask

from helpers import CPU_BACKENDS, lowp_baseline, max_err, oracle, rand_qkv

F32_MIN = torch.finfo(torch.float32).min


def _grads(q, k, v, **kw):
    """(out, dq, dk, dv) of qkv.attention for the fixed output gradient cos(arange)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = qkv.attention(q, k, v, **kw)
    g = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
    out.backward(g.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _baseline_grads(q, k, v, mask, causal=False):
    """Gradients of the same-dtype baseline (matmuls in the input dtype, softmax in fp32)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = lowp_baseline(q, k, v, mask=mask, causal=causal)
    g = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
    out.backward(g.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


# ---- 1. large finite biases: weights sum to 1, gradients right ----------------------------
@pytest.mark.parametrize("dtype,value", [
    (torch.float32, -1e4), (torch.float32, -1e6), (torch.float32, -1e9),
    (torch.float32, F32_MIN), (torch.float64, -1e9), (torch.float64, F32_MIN),
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_of_large_bias_weights_and_gradients(backend, dtype, value):
    q, k, v = rand_qkv(1, 3, 3, 6, 7, 5, dtype=dtype, seed=1)
    m = torch.zeros(6, 7, dtype=dtype)
    m[0] = value  # every key of query 0
    m[2, 3:] = value  # some keys of query 2
    opts = dict(mask=m, backend=backend)
    limit = -(2.0**37 if dtype == torch.float64 else 2.0**8)
    if backend == "torch" and value <= limit:  # SDPA's backward would lose the row's lse
        with pytest.raises(ValueError, match="gradients through an additive mask"):
            _grads(q, k, v, **opts)
        pytest.skip("torch refuses gradients through this mask (auto falls back)")
    if backend != "torch":
        _, w = qkv.attention(q, k, v, return_weights=True, **opts)
        assert torch.allclose(w.sum(-1).double(), torch.ones(1, 3, 6, dtype=torch.float64),
                              atol=1e-6, rtol=0)
    got = _grads(q, k, v, **opts)
    want = _grads(q.double(), k.double(), v.double(), mask=m.double(), backend="reference")
    if dtype == torch.float64:  # the float64 reference is the oracle: agree to rounding
        # The scores round at the bias's magnitude (ulp(1e9) = 1.2e-7); where the bias
        # dwarfs every q.k (finfo(float32).min) the scores are exactly the bias: exact.
        ulp = abs(value) * 2.0**-52
        tol = 1e-10 if abs(value) > 1e30 else max(1e-10, 4 * ulp)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert max_err(a, b) <= tol, name
        return
    base = _baseline_grads(q, k, v, m)
    for i, (name, a, b, c) in enumerate(zip(("out", "dq", "dk", "dv"), got, want, base,
                                            strict=True)):
        factor = 2.0 if i == 0 else 3.0  # DESIGN.md: 2x for outputs, 3x for gradients
        err, berr = max_err(a, b), max_err(c, b)
        assert err <= factor * berr + 1e-5, f"{name}: {err:.3e} vs baseline {berr:.3e}"


def test_chunked_alibi_gradients_within_3x_of_the_baseline():
    """FlashAttention's causal ALiBi test: bias -slope * (i - j), values to about -300."""
    h, n, d = 4, 301, 32
    q, k, v = rand_qkv(1, h, h, n, n, d, dtype=torch.float32, seed=3)
    slopes = torch.tensor([1.0, 0.5, 0.25, 0.125])[:, None, None]  # (H, 1, 1)
    i = torch.arange(n)
    dist = (i[:, None] - i[None, :]).clamp(min=0).float()  # (Lq, Lk)
    bias = (-slopes * dist).unsqueeze(0)  # (1, H, Lq, Lk), down to -300
    with block_sizes(64, 128):
        got = _grads(q, k, v, mask=bias, causal=True, backend="chunked")
    want = _grads(q.double(), k.double(), v.double(), mask=bias.double(), causal=True,
                  backend="reference")
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    base = _baseline_grads(q, k, v, torch.where(causal, bias, float("-inf")))
    for i, (name, a, b, c) in enumerate(zip(("out", "dq", "dk", "dv"), got, want, base,
                                            strict=True)):
        factor = 2.0 if i == 0 else 3.0
        err, berr = max_err(a, b), max_err(c, b)
        assert err <= factor * berr + 1e-5, f"{name}: {err:.3e} vs baseline {berr:.3e}"


# ---- 2. every backend agrees with the reference on large finite biases --------------------
@pytest.mark.parametrize("dtype,value", [
    (torch.float16, -1e5), (torch.bfloat16, -1e38), (torch.float32, F32_MIN),
    (torch.float64, F32_MIN), (torch.float64, -1e300),
])
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_large_finite_bias_hides_nothing(backend, dtype, value):
    q, k, v = rand_qkv(2, 2, 1, 5, 6, 4, dtype=dtype, seed=2)
    m = torch.zeros(5, 6, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    m[1] = value  # every key: uniform weights, the mean of the values
    m[3, :2] = value  # some keys: those get weight 0
    out = qkv.attention(q, k, v, mask=m, backend=backend)
    want, _ = oracle(q, k, v, mask=m.double())
    assert torch.isfinite(out).all() and out[:, :, 1].abs().max() > 0
    if dtype == torch.float64:
        assert max_err(out, want) <= 1e-12
        return
    base = lowp_baseline(q, k, v, mask=m)
    err, berr = max_err(out, want), max_err(base, want)
    assert err <= 2 * berr + 1e-5, f"{err:.3e} vs baseline {berr:.3e}"


def test_torch_refuses_gradients_through_a_row_of_huge_bias_and_auto_falls_back():
    """SDPA's backward recomputes the weights from one float log-sum-exp, which rounds
    log(sum) away when a whole row sits near -1e9: it refuses, and auto picks another."""
    q, k, v = rand_qkv(1, 2, 2, 4, 5, 3, dtype=torch.float32, seed=7, requires_grad=True)
    m = torch.zeros(4, 5)
    m[1] = -1e9
    with pytest.raises(ValueError, match="additive mask"):
        qkv.attention(q, k, v, mask=m, backend="torch")
    with torch.no_grad():  # no gradient: the forward normalises by the sum, and is right
        qkv.attention(q, k, v, mask=m, backend="torch")
    got = _grads(q, k, v, mask=m, backend="auto")
    want = _grads(q.double(), k.double(), v.double(), mask=m.double(), backend="reference")
    base = _baseline_grads(q, k, v, m)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, base, strict=True):
        assert max_err(a, b) <= 3 * max_err(c, b) + 1e-5, name


# ---- 5. NaN/inf in visible positions propagate --------------------------------------------
def _nan_pattern_matches(out, want):
    assert torch.equal(torch.isnan(out), torch.isnan(want)), (
        f"NaN rows differ: got {torch.isnan(out).any(-1)}, want {torch.isnan(want).any(-1)}")
    ok = ~torch.isnan(want)
    assert max_err(out[ok], want[ok]) <= 1e-10


@pytest.mark.parametrize("where", ["q", "k", "v", "bias", "q_inf"])
def test_nan_in_visible_positions_propagates(backend, where):
    q, k, v = rand_qkv(1, 2, 2, 4, 5, 3, seed=4)
    bias = torch.zeros(4, 5, dtype=torch.float64)
    bias[3] = float("-inf")  # query 3 sees no key: stays 0 whatever it holds
    if where == "q":
        q[0, 0, 1, 2] = float("nan")
        q[0, 1, 3, 0] = float("nan")  # in the fully hidden row
    elif where == "q_inf":
        q[0, 0, 1, 2] = float("inf")
    elif where == "k":
        k[0, 1, 2, 0] = float("nan")
    elif where == "v":
        v[0, 0, 4, 1] = float("nan")
    else:
        bias[2, 1] = float("nan")
    out = qkv.attention(q, k, v, mask=bias, backend=backend)
    want, _ = oracle(q, k, v, mask=bias)
    assert torch.isnan(want).any()  # the case is real
    _nan_pattern_matches(out, want)
    assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))


def test_nan_query_propagates_without_a_mask(backend):
    """SDPA's CPU kernel returns 0 for a NaN query row; qkv returns NaN on every backend."""
    q, k, v = rand_qkv(1, 1, 1, 3, 4, 8, seed=5, dtype=torch.float32)
    q[0, 0, 0, 0] = float("nan")
    for causal in (False, True):
        out = qkv.attention(q, k, v, causal=causal, backend=backend)
        assert torch.isnan(out[0, 0, 0]).all()
        assert torch.isfinite(out[0, 0, 1:]).all()



@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the oracle
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("how", ["bool", "additive", "window", "causal"])
def test_a_bad_key_hidden_from_some_queries_does_not_reach_them(backend, value, how):
    """Before: the torch backend let a NaN/inf key into the rows its mask hides it from
    (SDPA adds the mask to the scores: -inf + NaN is NaN)."""
    q, k, v = rand_qkv(1, 2, 2, 4, 6, 3, seed=9)
    kw = {}
    if how in ("bool", "additive"):
        allowed = torch.ones(4, 6, dtype=torch.bool)
        allowed[1:, 0] = False  # key 0: seen by query 0 only
        kw["mask"] = allowed if how == "bool" else torch.zeros(4, 6, dtype=torch.float64) \
            .masked_fill(~allowed, float("-inf"))
    elif how == "window":
        kw["window"] = (1, 1)  # key 0: seen by query 0 (and key 1 by queries 0, 1)
    else:
        kw["causal"] = True  # bottom-right, Lq 4 < Lk 6: key 5 seen by the last query only
    bad = 5 if how == "causal" else 0
    k[0, 1, bad, 1] = value
    out = qkv.attention(q, k, v, backend=backend, **kw)
    want, _ = oracle(q, k, v, **kw)
    _nan_pattern_matches(out, want)
    seen_by = [3] if how == "causal" else [0]
    others = [i for i in range(4) if i not in seen_by]
    assert torch.isfinite(out[0, 1, others]).all()  # the rows that cannot see it

# ---- 6. keys the band hides from every query are zeroed ------------------------------------
@pytest.mark.parametrize("lq,lk,causal,window", [
    (2, 8, True, (2, 0)),  # the report's case: keys 0-4 hidden from both queries
    (3, 9, False, (1, 1)),
    (6, 4, True, None),  # Lq > Lk: nothing hidden from every query
    (5, 12, False, (None, 0)),
    (4, 10, True, (0, None)),
])
def test_nan_in_keys_the_band_hides_from_every_query_does_not_leak(backend, lq, lk, causal,
                                                                   window):
    q, k, v = rand_qkv(1, 2, 1, lq, lk, 4, seed=6)
    m = Mask(lq, lk, causal=causal, left=None if window is None else window[0],
             right=(0 if causal else None) if window is None else
             (min(window[1], 0) if causal and window[1] is not None else
              (0 if causal else window[1])))
    lo, hi = m.band_key_range()
    clean = qkv.attention(q, k, v, causal=causal, window=window, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[..., :lo, :] = float("nan")
    v2[..., :lo, :] = float("nan")
    k2[..., hi:, :] = float("nan")
    v2[..., hi:, :] = float("nan")
    got = _grads(q, k2, v2, causal=causal, window=window, backend=backend)
    assert torch.equal(got[0], clean)
    for g in got[1:]:
        assert torch.isfinite(g).all()
    assert torch.equal(got[3][..., :lo, :], torch.zeros_like(got[3][..., :lo, :]))
    assert torch.equal(got[3][..., hi:, :], torch.zeros_like(got[3][..., hi:, :]))


def test_band_key_range_matches_the_dense_band():
    for lq in range(0, 6):
        for lk in range(0, 7):
            for left in (None, 0, 1, 3):
                for right in (None, 0, 2):
                    m = Mask(lq, lk, left=left, right=right)
                    lo, hi = m.band_key_range()
                    seen = m.band(0, lq, 0, lk, torch.device("cpu"))
                    if seen is None:
                        seen = torch.ones(lq, lk, dtype=torch.bool)
                    cols = seen.any(dim=0)
                    want = torch.zeros(lk, dtype=torch.bool)
                    want[lo:hi] = True
                    assert torch.equal(cols, want), (lq, lk, left, right, lo, hi)
