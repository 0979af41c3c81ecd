"""Seeded fuzz of VALID ``qkv.attention`` calls against the float64 oracle.

Each case draws shapes (odd, 0 and 1 lengths, GQA, extra batch dims), a mask (bool, key
padding, additive with ``-inf`` and large finite values), causal/window, a dtype and a
scale, plants NaN in keys hidden from every query, and checks every CPU backend (and
``auto``) for the output, the weights and the gradients of q, k and v:

* float64 inputs: against the float64 oracle to rounding (see ``_tol64``);
* float32/float16/bfloat16: DESIGN.md's rule, at most 2x (outputs, weights) / 3x
  (gradients) the error of a same-dtype baseline (matmuls in the input dtype, softmax in
  float32) on the same inputs, + 1e-5, + one rounding to the dtype at the largest value
  (see ``_rounding``), + for dq and dk the effect of computing ``delta = rowsum(dout *
  out)`` from the output rounded to the dtype, as FlashAttention-2's backward (SDPA's)
  does and the baseline's autograd does not (see ``_delta_terms``).

A backend that cannot do a call must say so with a ValueError naming the option; the case
is then skipped for that backend, explicitly (the message is checked), never passed.

A second test plants NaN/inf in one query and one key element of half as many drawn calls
and checks the forward's NaN pattern and values, weights included.

CI runs ``QKV_FUZZ_CASES`` cases (default 200) from ``QKV_FUZZ_SEED`` (default 0); a longer
run is one command: ``QKV_FUZZ_CASES=5000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

import qkv
from qkv import reference_numpy

from helpers import CPU_BACKENDS, max_err, oracle

CASES = int(os.environ.get("QKV_FUZZ_CASES", "200"))
SEED = int(os.environ.get("QKV_FUZZ_SEED", "0"))
LOWP = (torch.float32, torch.float16, torch.bfloat16)


def _draw(case: int) -> dict:
    """One valid call, drawn from ``random.Random`` seeded by (SEED, case)."""
    rnd = random.Random(SEED * 1_000_003 + case)
    hkv = rnd.choice([1, 1, 2, 3])
    hq = hkv * rnd.choice([1, 1, 2, 3])
    lq = rnd.choice([0, 1, 1, 2, 3, 5, 8, 13, 17, 33, 70])
    lk = rnd.choice([0, 1, 1, 2, 4, 7, 9, 16, 23, 41, 97])
    d, dv = rnd.choice([1, 3, 8, 16, 59]), rnd.choice([1, 4, 7, 16])
    batch = rnd.choice([(), (1,), (2,), (2, 3)])
    dtype = rnd.choice([torch.float64, torch.float64, torch.float32, torch.float32,
                        torch.float16, torch.bfloat16])
    causal = rnd.random() < 0.35
    window = None
    if rnd.random() < 0.3:
        window = rnd.choice([rnd.randint(0, 6), (rnd.randint(0, 6), rnd.choice([None, 0, 2])),
                             (None, rnd.randint(0, 3))])
    scale = None if rnd.random() < 0.7 else rnd.choice([0.05, 0.5, 2.0, -0.3])
    g = torch.Generator().manual_seed(SEED * 7919 + case)
    full = (*batch, hq, lq, lk)
    mask = None
    kind = rnd.choice(["none", "none", "bool", "padding", "bias", "big_bias"])
    if kind == "bool":
        shape = rnd.choice([(lq, lk), (1, hq, lq, lk)[-len(full):] if batch else (hq, lq, lk)])
        mask = torch.rand(shape, generator=g) < 0.7
    elif kind == "padding" and batch:  # also with Lq or Lk = 0
        lengths = torch.randint(0, lk + 1, (math.prod(batch),), generator=g)
        mask = qkv.padding_mask(lengths, lk).reshape(*batch, 1, 1, lk)
    elif kind in ("bias", "big_bias"):
        mdt = torch.float64 if dtype == torch.float64 else torch.float32
        mask = torch.randn(lq, lk, generator=g, dtype=mdt) * 2
        mask[torch.rand(lq, lk, generator=g) < 0.2] = float("-inf")
        if kind == "big_bias" and lq:
            value = rnd.choice([-1e4, -1e6, -1e9, torch.finfo(torch.float32).min])
            mask[rnd.randrange(lq)] = value  # a whole row of large finite values
            mask[:, : max(1, lk // 3)] += value if value > -1e30 else 0.0
    return dict(shape=(batch, hq, hkv, lq, lk, d, dv), dtype=dtype, causal=causal,
                window=window, scale=scale, mask=mask, return_weights=rnd.random() < 0.5,
                seed=SEED * 104729 + case)


def _hidden_everywhere(c) -> torch.Tensor:
    """Bool (Lk,): keys that no query of any batch row or head may see, by the tensor mask
    alone or by causal/window alone (what qkv zeroes; a key hidden only by the two together
    is real data, see docs/semantics.md)."""
    batch, hq, _, lq, lk, _, _ = c["shape"]
    if lq == 0:
        return torch.ones(lk, dtype=torch.bool)
    band = torch.from_numpy(reference_numpy.visible(lq, lk, c["causal"], c["window"]))
    hidden = ~band.any(dim=0)  # (Lk,)
    m = c["mask"]
    if m is not None:
        vis = (m if m.dtype == torch.bool else m != float("-inf")).expand(*batch, hq, lq, lk)
        hidden |= ~vis.reshape(-1, lk).any(dim=0) if vis.numel() else True
    return hidden


def _inputs(c):
    batch, hq, hkv, lq, lk, d, dv = c["shape"]
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(*batch, hq, lq, d, generator=g, dtype=torch.float64).to(c["dtype"])
    k = torch.randn(*batch, hkv, lk, d, generator=g, dtype=torch.float64).to(c["dtype"])
    v = torch.randn(*batch, hkv, lk, dv, generator=g, dtype=torch.float64).to(c["dtype"])
    return q, k, v


def _run(q, k, v, c, backend, dout):
    """(out, weights | None, dq, dk, dv) of one call."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res = qkv.attention(q, k, v, mask=c["mask"], causal=c["causal"], window=c["window"],
                        scale=c["scale"], return_weights=c["return_weights"], backend=backend)
    out, w = res if c["return_weights"] else (res, None)
    out.backward(dout.to(out.dtype))
    return out.detach(), None if w is None else w.detach(), q.grad, k.grad, v.grad


def _baseline(q, k, v, c):
    """Same-dtype baseline: matmuls in the input dtype, mask and softmax in float32."""
    _, hq, hkv, lq, lk, d, _ = c["shape"]
    scale = 1.0 / math.sqrt(d) if c["scale"] is None else c["scale"]
    kk = k.repeat_interleave(hq // hkv, dim=-3)  # (..., Hq, Lk, D)
    vv = v.repeat_interleave(hq // hkv, dim=-3)  # (..., Hq, Lk, Dv)
    s = (q @ kk.transpose(-1, -2)).float() * scale  # (..., Hq, Lq, Lk)
    vis = torch.from_numpy(reference_numpy.visible(lq, lk, c["causal"], c["window"]))
    m = c["mask"]
    if m is not None and m.dtype == torch.bool:
        vis = vis & m
    elif m is not None:
        s = s + m.float()
        vis = vis & (m != float("-inf"))
    s = torch.where(vis, s, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)  # (..., Hq, Lq, Lk)
    return w @ vv, w


def _tol64(c) -> float:
    """float64: rounding of the scores at their magnitude (a -1e9 bias: ulp 1.2e-7)."""
    m = c["mask"]
    big = 0.0
    if m is not None and m.dtype != torch.bool and m.numel():
        fin = m[torch.isfinite(m)]
        big = float(fin.abs().max()) if fin.numel() else 0.0
    if big > 1e30:  # scores are the bias itself: rounding of everything else vanishes
        big = 0.0
    return 1e-9 + 64 * big * 2.0**-52


def _rounding(want: torch.Tensor, dtype: torch.dtype) -> float:
    """One rounding of the result to ``dtype`` at its largest value: unavoidable, and on
    tensors of a few elements the baseline's own error can happen to be below it."""
    return torch.finfo(dtype).eps * float(want.abs().max()) if want.numel() else 0.0


def _delta_terms(c, q, k, dout, want_out, want_w) -> tuple[float, float]:
    """Bounds on the dq and dk errors from ``delta`` computed with the rounded output.

    Rounding ``out`` to the dtype moves ``delta_i`` by at most ``e_i = eps * sum_c
    |dout_ic * out_ic|``; ``dS_ij = P_ij (dP_ij - delta_i)`` moves by ``P_ij e_i``, so
    ``|d dq_i| <= |scale| e_i max|k|`` and ``|d dk_j| <= |scale| max|q| sum_i P_ij e_i``
    (summed over the query heads that share key head j).
    """
    if want_out.numel() == 0 or k.numel() == 0:
        return 0.0, 0.0
    _, hq, hkv, _, lk, d, _ = c["shape"]
    scale = abs(1.0 / math.sqrt(d) if c["scale"] is None else c["scale"])
    eps = torch.finfo(q.dtype).eps
    e = eps * (dout.abs() * want_out.abs()).sum(dim=-1, keepdim=True)  # (..., Hq, Lq, 1)
    dq = scale * float(e.max()) * float(k.double().abs().max())
    col = (want_w * e).sum(dim=-2)  # (..., Hq, Lk)
    col = col.reshape(*col.shape[:-2], hkv, hq // hkv, lk).sum(dim=-2)  # (..., Hkv, Lk)
    dk = scale * float(q.double().abs().max()) * float(col.max())
    return dq, dk


@pytest.mark.parametrize("case", range(CASES))
def test_fuzz_valid_calls(case):
    c = _draw(case)
    q, k, v = _inputs(c)
    hidden = _hidden_everywhere(c)  # (Lk,)
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    kp[..., hidden, :] = float("nan")  # must not leak: no query sees these keys
    vp[..., hidden, :] = float("nan")
    g = torch.Generator().manual_seed(c["seed"] + 1)
    batch, hq, _, lq, _, _, dv = c["shape"]
    dout = torch.randn(*batch, hq, lq, dv, generator=g, dtype=torch.float64)
    m64 = None if c["mask"] is None else (c["mask"] if c["mask"].dtype == torch.bool
                                          else c["mask"].double())
    want_out, want_w = oracle(q, k, v, mask=m64, causal=c["causal"], window=c["window"],
                              scale=c["scale"])
    c64 = dict(c, mask=m64, return_weights=False)
    want = _run(q.double(), k.double(), v.double(), c64, "reference", dout)
    assert max_err(want[0], want_out) <= _tol64(c)  # the reference backend is the oracle
    if c["dtype"] in LOWP:
        bq, bk, bv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        b_out, b_w = _baseline(bq, bk, bv, c)
        b_out.backward(dout.to(b_out.dtype))
        base = (b_out.detach(), b_w.detach(), bq.grad, bk.grad, bv.grad)
    extra = (0.0, 0.0, 0.0, 0.0, 0.0)
    if c["dtype"] in LOWP:
        dq_term, dk_term = _delta_terms(c, q, k, dout, want_out, want_w)
        extra = (0.0, 0.0, dq_term, dk_term, 0.0)
    refused = []
    for backend in ["auto", *CPU_BACKENDS]:
        try:
            got = _run(qp, kp, vp, c, backend, dout)
        except ValueError as e:
            msg = str(e)
            assert backend != "auto" and "cannot do this call: it does not support" in msg
            # the options torch cannot do for these calls (the message names each)
            assert backend == "torch" and ("return_weights" in msg or "additive mask" in msg)
            refused.append(backend)
            continue
        names = ("out", "weights", "dq", "dk", "dv")
        wants = (want_out, want_w, *want[2:])
        for i, (name, a, b) in enumerate(zip(names, got, wants, strict=True)):
            if a is None:
                continue
            assert a.dtype == q.dtype, f"{backend} {name}: dtype {a.dtype}"
            assert not torch.isnan(a).any(), f"{backend} {name}: NaN (case {c})"
            err = max_err(a, b)
            if c["dtype"] == torch.float64:
                tol = _tol64(c)
            else:
                factor = 2.0 if i < 2 else 3.0
                tol = (factor * max_err(base[i], b) + 1e-5 + _rounding(b, q.dtype)
                       + factor * extra[i])
            assert err <= tol, f"{backend} {name}: error {err:.3e} > {tol:.3e} (case {c})"
    assert "reference" not in refused and "chunked" not in refused, refused


NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the oracle
@pytest.mark.parametrize("case", range(CASES // 2))
def test_fuzz_non_finite_queries_and_keys(case):
    """NaN/inf planted in one query element and one key element of a valid call: every
    backend gives the oracle's NaN pattern (a NaN or +inf score makes its row NaN, a -inf
    score hides its key, a key hidden from a query never reaches its row) and, elsewhere,
    the oracle's values. Forward only: gradients of such rows are undefined."""
    c = _draw(case)
    q, k, v = _inputs(c)
    rnd = random.Random(SEED * 31 + case)
    for t in (q, k):
        if t.numel():
            flat = t.view(-1)
            flat[rnd.randrange(flat.numel())] = rnd.choice(NON_FINITE)
    m64 = None if c["mask"] is None else (c["mask"] if c["mask"].dtype == torch.bool
                                          else c["mask"].double())
    want_out, want_w = oracle(q, k, v, mask=m64, causal=c["causal"], window=c["window"],
                              scale=c["scale"])
    kw = dict(mask=c["mask"], causal=c["causal"], window=c["window"], scale=c["scale"],
              return_weights=c["return_weights"])
    if c["dtype"] in LOWP:
        b_out, b_w = _baseline(q, k, v, c)
    for backend in ["auto", *CPU_BACKENDS]:
        try:
            res = qkv.attention(q, k, v, backend=backend, **kw)
        except ValueError as e:
            assert backend == "torch" and "return_weights" in str(e), str(e)
            continue
        out, w = res if c["return_weights"] else (res, None)
        pairs = [("out", out, want_out)] + ([("weights", w, want_w)] if w is not None else [])
        for name, a, b in pairs:
            assert torch.equal(a.isnan(), b.isnan()), (
                f"{backend} {name}: NaN at {a.isnan().nonzero().tolist()[:4]}, oracle at "
                f"{b.isnan().nonzero().tolist()[:4]} (case {c})")
            ok = ~b.isnan()
            if not ok.any():
                continue
            err = max_err(a[ok], b[ok])
            if c["dtype"] == torch.float64:
                tol = _tol64(c)
            else:  # the baseline's rows that the oracle makes NaN are not compared
                base = b_out if name == "out" else b_w
                tol = 2.0 * max_err(base[ok], b[ok]) + 1e-5 + _rounding(b[ok], q.dtype)
            assert err <= tol, f"{backend} {name}: error {err:.3e} > {tol:.3e} (case {c})"
