"""The chunked backend: online-softmax attention in O(L) memory (qkv.kernels.chunked).

Equality with the float64 oracle for many block sizes and every mask kind, the
low-precision rule, gradcheck, returned weights, fully masked rows, NaN in masked
positions, reproducible dropout, the ring-attention building blocks, ``auto``'s choice,
and a check that a long sequence never materialises an (L x L) tensor.
"""

import functools
import logging
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv import kernels
from qkv.functional import prepare_call
from qkv.kernels import auto_order, chunked
from qkv.kernels.chunked import (
    block_sizes,
    chunked_attention,
    chunked_backward,
    chunked_forward,
    dropout_keep,
    merge_partials,
)
from qkv.masks import Mask

from helpers import (
    assert_grads_lowp_rule,
    assert_lowp_rule,
    lowp_baseline,
    max_err,
    oracle,
    rand_qkv,
)

EPS64 = torch.finfo(torch.float64).eps


def bound64(k, v, d):
    """Rounding bound for a float64 attention output: each output is a convex combination
    of values, built from dot products of length D and sums over Lk keys, so its error is
    at most about (D + Lk) * eps * max|v| (a few more eps for exp and the division)."""
    return (d + k.shape[-2] + 8) * EPS64 * max(1.0, float(v.detach().abs().max()))


def chunked_vs_oracle(q, k, v, block, *, want=None, **kw):
    with block_sizes(*block):
        out = qkv.attention(q, k, v, backend="chunked", **kw)
    if want is None:
        want, _ = oracle(q, k, v, **kw)
    assert out.shape == want.shape and out.dtype == q.dtype
    err = max_err(out, want)
    assert err <= bound64(k, v, q.shape[-1]), f"error {err:.3e} with blocks {block}, {kw}"
    return out


def call_of(q, k, v, **kw):
    """The canonical Call of qkv.attention for these inputs (mask folded into a Mask)."""
    return prepare_call(q, k, v, **kw)[0]


# ---- equality with the oracle -------------------------------------------------------------------
MASK_KINDS = {
    "none": lambda g, b, h, lq, lk: {},
    "bool": lambda g, b, h, lq, lk: {"mask": torch.rand(lq, lk, generator=g) > 0.3},
    "additive": lambda g, b, h, lq, lk: {"mask": torch.randn(b, h, lq, lk, generator=g,
                                                             dtype=torch.float64)},
    "padding": lambda g, b, h, lq, lk: {"mask": qkv.padding_mask(torch.tensor([lk, lk // 2]))},
    "per-head-keys": lambda g, b, h, lq, lk: {"mask": torch.rand(h, 1, lk, generator=g) > 0.4},
    "per-query": lambda g, b, h, lq, lk: {"mask": torch.rand(lq, 1, generator=g) > 0.2},
    "causal": lambda g, b, h, lq, lk: {"causal": True},
    "window": lambda g, b, h, lq, lk: {"window": (5, 3)},
    "one-sided-window": lambda g, b, h, lq, lk: {"window": (None, 4)},
    "sliding-causal": lambda g, b, h, lq, lk: {"causal": True, "window": 9},
    "causal+bool": lambda g, b, h, lq, lk: {"causal": True,
                                            "mask": torch.rand(b, 1, lq, lk, generator=g) > 0.3},
    "window+additive": lambda g, b, h, lq, lk: {
        "window": (20, 20),
        "mask": torch.randn(1, h, 1, lk, generator=g, dtype=torch.float64)},
}


@pytest.mark.parametrize("kind", list(MASK_KINDS))
def test_odd_sizes_every_mask_against_oracle(kind):
    """Lq=97, Lk=203, D=59, Dv=31, 6 query heads on 3 kv heads (GQA); blocks that divide
    nothing, square and not, and larger than both lengths."""
    q, k, v = rand_qkv(2, 6, 3, 97, 203, 59, 31, seed=11)
    kw = MASK_KINDS[kind](torch.Generator().manual_seed(5), 2, 6, 97, 203)
    want, _ = oracle(q, k, v, **kw)
    for block in [(7, 7), (64, 64), (512, 512), (7, 64), (64, 7), (None, None)]:
        chunked_vs_oracle(q, k, v, block, want=want, **kw)


@pytest.mark.parametrize("kind", ["none", "causal", "window", "causal+bool", "window+additive"])
def test_block_size_one(kind):
    q, k, v = rand_qkv(2, 4, 2, 13, 29, 5, 3, seed=2)
    kw = MASK_KINDS[kind](torch.Generator().manual_seed(1), 2, 4, 13, 29)
    chunked_vs_oracle(q, k, v, (1, 1), **kw)


@pytest.mark.parametrize("lq,lk", [(203, 97), (97, 203), (1, 203), (203, 1), (1, 1)])
@pytest.mark.parametrize("heads", [(6, 3), (4, 1), (3, 3)])
def test_unequal_lengths_and_gqa(lq, lk, heads):
    q, k, v = rand_qkv(1, heads[0], heads[1], lq, lk, 16, 24, seed=lq + lk)
    for kw in ({}, {"causal": True}, {"window": (3, 2)}):
        chunked_vs_oracle(q, k, v, (32, 48), **kw)


@pytest.mark.parametrize("lq,lk", [(0, 5), (5, 0), (0, 0)])
def test_zero_lengths_give_zeros_and_zero_grads(lq, lk):
    q, k, v = rand_qkv(2, 4, 2, lq, lk, 8, 3, requires_grad=True)
    out, w = qkv.attention(q, k, v, backend="chunked", return_weights=True)
    assert out.shape == (2, 4, lq, 3) and w.shape == (2, 4, lq, lk)
    assert not out.any()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is None or not t.grad.any()


def test_block_sizes_must_be_positive_ints():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block_q must be a positive int"), block_sizes(bad):
            pass
    with block_sizes(block_k=3):
        q, k, _ = rand_qkv(1, 2, 2, 10, 10, 4)
        assert chunked.plan_blocks(q, k).block_k == 3


def test_explicit_and_zero_scale():
    q, k, v = rand_qkv(1, 2, 2, 30, 41, 8)
    chunked_vs_oracle(q, k, v, (8, 16), scale=0.37)
    chunked_vs_oracle(q, k, v, (8, 16), scale=0.0)  # uniform weights


def test_head_groups_when_the_block_budget_is_small(monkeypatch):
    """With a tiny budget the heads are computed a few at a time; per-head masks must be
    sliced to the right heads and batch rows."""
    monkeypatch.setitem(chunked.BLOCK_ELEMENTS, "cpu", 64 * 64)
    q, k, v = rand_qkv(3, 6, 3, 40, 70, 8, 5, seed=4)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(3, 6, 1, 70, generator=g, dtype=torch.float64)
    plan = chunked.plan_blocks(q, k, block_q=32, block_k=64)
    assert plan.heads < 3  # the group path is the one under test
    chunked_vs_oracle(q, k, v, (32, 64), mask=bias, causal=True)
    allowed = torch.rand(3, 6, 40, 70, generator=g) > 0.5
    chunked_vs_oracle(q, k, v, (32, 64), mask=allowed)


def test_threads_do_not_change_the_result(monkeypatch):
    """Forward rows are computed independently, so any number of CPU threads gives the
    same bits; gradients are summed in a fixed order, so repeated runs agree exactly."""
    q, k, v = rand_qkv(1, 4, 2, 90, 130, 16, dtype=torch.float32, seed=8, requires_grad=True)
    dout = torch.randn(1, 4, 90, 16, generator=torch.Generator().manual_seed(2))
    results = {}
    threads = torch.get_num_threads()
    for workers in (1, 3, 3):
        monkeypatch.setattr(chunked, "WORKERS", workers)
        with block_sizes(16, 32):
            out = qkv.attention(q, k, v, backend="chunked", causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results.setdefault(workers, []).append((out, *grads))
    assert torch.equal(results[1][0][0], results[3][0][0])
    for a, b in zip(results[3][0], results[3][1], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(results[1][0], results[3][0], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    with torch.inference_mode():  # the worker threads run in the caller's grad mode
        out = qkv.attention(q, k, v, backend="chunked", causal=True)
    assert out.is_inference()
    assert torch.allclose(out, results[1][0][0], rtol=1e-5, atol=1e-6)


# ---- low precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (9, 4)}])
def test_low_precision_rule_across_blocks(dtype, kw):
    """DESIGN.md's rule (tests/helpers.py): error <= 2 x the error of attention computed
    in the input dtype + 1e-5; gradients within 5 x. Small blocks force many rescalings."""
    q, k, v = rand_qkv(2, 6, 3, 61, 87, 32, 24, dtype=dtype, seed=7, requires_grad=True)
    dout = torch.randn(2, 6, 61, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    with block_sizes(16, 24):
        out = qkv.attention(q, k, v, backend="chunked", **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    want, _ = oracle(q, k, v, **kw)
    assert_lowp_rule(out, want, lowp_baseline(q, k, v, **kw))
    assert_grads_lowp_rule(grads, q, k, v, dout, factor=5.0, **kw)


# ---- gradients ----------------------------------------------------------------------------------
GRAD_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (2, 1)},
    "bool": {"mask": torch.rand(6, 9, generator=torch.Generator().manual_seed(0)) > 0.3},
    "causal-lq>lk": {"causal": True, "lq": 9, "lk": 6},
}


@pytest.mark.parametrize("block", [(1, 1), (2, 3), (4, 16)])
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck(block, case):
    kw = dict(GRAD_CASES[case])
    lq, lk = kw.pop("lq", 6), kw.pop("lk", 9)
    q, k, v = rand_qkv(1, 4, 2, lq, lk, 3, 2, seed=3, requires_grad=True)

    def f(q, k, v):
        with block_sizes(*block):
            return qkv.attention(q, k, v, backend="chunked", **kw)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("shape", [(6, 9), (1, 4, 1, 9), (2, 1, 6, 1)])
def test_gradcheck_additive_mask(shape):
    """The additive mask is differentiable (e.g. a learned position bias), broadcast or not."""
    q, k, v = rand_qkv(2, 4, 2, 6, 9, 3, 2, seed=5, requires_grad=True)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).requires_grad_()

    def f(q, k, v, bias):
        with block_sizes(4, 4):
            return qkv.attention(q, k, v, mask=bias, causal=True, backend="chunked")

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_gradcheck_through_returned_weights():
    q, k, v = rand_qkv(1, 2, 1, 5, 7, 3, 2, seed=6, requires_grad=True)

    def f(q, k, v):
        with block_sizes(2, 3):
            out, w = qkv.attention(q, k, v, window=(3, 1), return_weights=True,
                                   backend="chunked")
        return out, w

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradients_equal_reference_with_noncontiguous_dout():
    """flash-attention #355: a non-contiguous output gradient."""
    q, k, v = rand_qkv(2, 6, 3, 37, 53, 16, 8, seed=9, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    dout = torch.randn(2, 37, 6, 8, generator=g, dtype=torch.float64).transpose(1, 2)
    grads = {}
    for be in ("chunked", "reference"):
        with block_sizes(8, 16):
            out = qkv.attention(q, k, v, causal=True, backend=be)
        grads[be] = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(grads["chunked"], grads["reference"], strict=True):
        assert max_err(a, b) <= 1e3 * EPS64 * float(b.abs().max() + 1)


# ---- weights, fully masked rows, NaN ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["none", "causal", "window+additive", "causal+bool", "padding"])
def test_returned_weights_equal_reference(kind):
    q, k, v = rand_qkv(2, 6, 3, 37, 70, 16, 8, seed=12)
    kw = MASK_KINDS[kind](torch.Generator().manual_seed(2), 2, 6, 37, 70)
    with block_sizes(8, 16):
        out, w = qkv.attention(q, k, v, return_weights=True, backend="chunked", **kw)
    out_r, w_r = qkv.attention(q, k, v, return_weights=True, backend="reference", **kw)
    _, w_o = oracle(q, k, v, **kw)
    assert w.shape == w_r.shape == (2, 6, 37, 70)
    assert max_err(w, w_o) <= bound64(k, v, 16)
    assert max_err(w, w_r) <= bound64(k, v, 16)
    assert max_err(out, out_r) <= bound64(k, v, 16)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    """pytorch #103963: rows that see no key give 0, not NaN, and no gradient."""
    q, k, v = rand_qkv(1, 2, 2, 9, 12, 4, seed=1, requires_grad=True)
    allowed = torch.ones(9, 12, dtype=torch.bool)
    allowed[2] = False  # query 2 sees nothing
    bias = torch.zeros(9, 12, dtype=torch.float64)
    bias[5] = float("-inf")  # query 5 neither
    for mask in (allowed, bias):
        with block_sizes(4, 5):
            out, w = qkv.attention(q, k, v, mask=mask, return_weights=True, backend="chunked")
        dq, dk, dv = torch.autograd.grad(out.sum() + w.sum(), (q, k, v))
        row = 2 if mask.dtype == torch.bool else 5
        assert torch.isfinite(out).all() and torch.isfinite(w).all()
        assert not out[:, :, row].any() and not w[:, :, row].any()
        assert not dq[:, :, row].any()
        assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # causal with Lq > Lk: the first Lq - Lk queries see nothing
    q, k, v = rand_qkv(1, 2, 1, 10, 4, 4, seed=2, requires_grad=True)
    with block_sizes(3, 3):
        out = qkv.attention(q, k, v, causal=True, backend="chunked")
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert not out[:, :, :6].any() and not dq[:, :, :6].any()
    assert out[:, :, 6:].abs().sum() > 0


def test_lse_of_hidden_rows_is_minus_inf():
    q, k, v = rand_qkv(1, 2, 2, 6, 5, 4)
    call = call_of(q, k, v, causal=True, window=(1, 0))
    out, lse = chunked_forward(call.q, call.k, call.v, call.mask, call.scale, block_q=2,
                               block_k=2)
    assert torch.isneginf(lse[:, :, 0]).all() and not out[:, :, 0].any()
    assert torch.isfinite(lse[:, :, 1:]).all()


def test_nan_in_masked_keys_and_values_does_not_leak():
    """pytorch #101967: padded keys/values holding NaN or inf."""
    q, k, v = rand_qkv(2, 4, 2, 21, 33, 8, 5, seed=4, requires_grad=True)
    lengths = torch.tensor([33, 17])
    pad = qkv.padding_mask(lengths)  # (B, 1, 1, Lk)
    k_bad, v_bad = k.detach().clone(), v.detach().clone()
    k_bad[1, :, 17:] = float("nan")
    v_bad[1, :, 17:] = float("inf")
    k_bad.requires_grad_()
    v_bad.requires_grad_()
    with block_sizes(8, 8):
        out = qkv.attention(q, k_bad, v_bad, mask=pad, causal=False, backend="chunked")
    want, _ = oracle(q, k, v, mask=pad)
    assert max_err(out, want) <= bound64(k, v, 8)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k_bad, v_bad))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert not dk[1, :, 17:].any() and not dv[1, :, 17:].any()


# ---- dropout ------------------------------------------------------------------------------------
def test_dropout_keep_is_uniform_and_independent_of_blocking():
    p = 0.3
    bh = torch.arange(4)[None, :, None, None]  # (1, 4, 1, 1)
    keep = dropout_keep(1234, bh, torch.arange(300), torch.arange(500), p)  # (1, 4, 300, 500)
    n = keep.numel()
    frac = keep.double().mean().item()
    # a Bernoulli(1-p) mean over n draws: 6 standard deviations
    assert abs(frac - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n)
    # neighbours are uncorrelated (rows, columns, heads)
    x = keep.double() - frac
    for a, b in ((x[..., 1:, :], x[..., :-1, :]), (x[..., 1:], x[..., :-1]),
                 (x[:, 1:], x[:, :-1])):
        corr = (a * b).mean().item() / (p * (1 - p))
        assert abs(corr) <= 6 / math.sqrt(a.numel())
    # any block of the pattern is the same block of the whole
    part = dropout_keep(1234, bh[:, 1:3], torch.arange(37, 90), torch.arange(123, 321), p)
    assert torch.equal(part, keep[:, 1:3, 37:90, 123:321])
    assert not torch.equal(dropout_keep(1235, bh, torch.arange(300), torch.arange(500), p), keep)


def _attention_with_keep(q, k, v, keep, p, **kw):
    """float64 attention with a given keep mask, by plain autograd ops (the referee)."""
    call = call_of(q, k, v, **kw)
    g = call.groups
    kk = call.k.repeat_interleave(g, dim=1)  # (B, Hq, Lk, D)
    vv = call.v.repeat_interleave(g, dim=1)  # (B, Hq, Lk, Dv)
    s = (call.q @ kk.transpose(-1, -2)) * call.scale  # (B, Hq, Lq, Lk)
    allowed, bias = call.mask.dense(q.device)
    if bias is not None:
        s = s + bias
    w = torch.where(allowed, s, float("-inf")).softmax(-1) if allowed is not None else s.softmax(-1)
    w = torch.where(keep, w / (1 - p), 0.0)
    return w @ vv, w


@pytest.mark.parametrize("kw", [{}, {"causal": True}])
def test_dropout_same_mask_forward_and_backward(kw):
    """Output, weights and gradients equal those of plain attention given the same keep
    mask: the backward regenerated exactly the forward's mask."""
    p, seed = 0.25, 987654321
    q, k, v = rand_qkv(2, 4, 2, 23, 31, 6, 5, seed=13, requires_grad=True)
    call = call_of(q, k, v, **kw)
    bh = (torch.arange(2)[:, None] * 4 + torch.arange(4)[None, :])[:, :, None, None]
    keep = dropout_keep(seed, bh, torch.arange(23), torch.arange(31), p)
    want_out, want_w = _attention_with_keep(q, k, v, keep, p, **kw)
    out, w = chunked_attention(call.q, call.k, call.v, call.mask, call.scale, dropout=p,
                               seed=seed, return_weights=True, block_q=5, block_k=7)
    assert max_err(out, want_out) <= bound64(k, v, 6)
    assert max_err(w, want_w) <= bound64(k, v, 6)
    dout = torch.randn(2, 4, 23, 5, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(want_out, (q, k, v), dout)
    for a, b in zip(got, want, strict=True):
        assert max_err(a, b) <= 1e3 * EPS64 * float(b.abs().max() + 1)


def test_gradcheck_with_dropout():
    q, k, v = rand_qkv(1, 2, 1, 5, 6, 3, 2, seed=2, requires_grad=True)
    call = call_of(q, k, v, causal=True)

    def f(q, k, v):
        return chunked_attention(q, k, v, call.mask, call.scale, dropout=0.4, seed=77,
                                 block_q=2, block_k=4)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_is_reproducible_with_a_generator():
    q, k, v = rand_qkv(1, 2, 2, 40, 50, 8, seed=3)
    outs = []
    for seed in (5, 5, 6):
        gen = torch.Generator().manual_seed(seed)
        outs.append(qkv.attention(q, k, v, dropout=0.5, generator=gen, backend="chunked"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    torch.manual_seed(0)
    a = qkv.attention(q, k, v, dropout=0.5, backend="chunked")
    torch.manual_seed(0)
    b = qkv.attention(q, k, v, dropout=0.5, backend="chunked")
    assert torch.equal(a, b)
    with block_sizes(7, 9):  # the mask does not depend on the blocks
        c = qkv.attention(q, k, v, dropout=0.5, generator=torch.Generator().manual_seed(5),
                          backend="chunked")
    assert max_err(c, outs[0]) <= bound64(k, v, 8)


def test_dropout_needs_a_seed():
    q, k, v = rand_qkv(1, 1, 1, 3, 3, 2)
    with pytest.raises(ValueError, match="seed"):
        chunked_forward(q, k, v, Mask(3, 3), 1.0, dropout=0.1)


# ---- ring-attention building blocks -------------------------------------------------------------
def test_merge_partials_is_exact():
    """Attention over keys [0, 60) and [60, 100) merged == attention over all 100 keys,
    including rows that see no key in one part (causal) or in both (a masked row)."""
    q, k, v = rand_qkv(2, 4, 2, 50, 100, 8, 6, seed=21)
    allowed = torch.ones(50, 100, dtype=torch.bool)
    allowed[7] = False
    full = call_of(q, k, v, mask=allowed, causal=True)
    out, lse = chunked_forward(full.q, full.k, full.v, full.mask, full.scale)
    parts = []
    for k0, k1 in ((0, 60), (60, 100)):
        m = full.mask
        sub = Mask(50, k1 - k0, allowed=m.allowed[..., k0:k1])
        # the causal band of the whole, expressed on this shard's keys
        band = m.band(0, 50, k0, k1, q.device)[None, None]
        sub = Mask(50, k1 - k0, allowed=sub.allowed & band)
        parts.append(chunked_forward(full.q, full.k[:, :, k0:k1], full.v[:, :, k0:k1], sub,
                                     full.scale, block_q=16, block_k=16))
    (o1, l1), (o2, l2) = parts
    assert torch.isneginf(l2[:, :, :10]).all()  # early queries see nothing of shard 2
    merged, lse_m = merge_partials(o1, l1, o2, l2)
    assert torch.isneginf(lse_m[:, :, 7]).all() and not merged[:, :, 7].any()
    fin = torch.isfinite(lse)
    assert torch.equal(fin, torch.isfinite(lse_m))
    assert max_err(lse_m[fin], lse[fin]) <= 64 * EPS64 * float(lse[fin].abs().max())
    assert max_err(merged, out) <= bound64(k, v, 8)
    want, _ = oracle(q, k, v, mask=allowed, causal=True)
    assert max_err(merged, want) <= bound64(k, v, 8)


def test_backward_over_key_shards_adds_up():
    """chunked_backward on each key shard, with the global lse and delta, gives the
    shard's rows of dk/dv and a part of dq; the parts add up to the full gradient."""
    q, k, v = rand_qkv(1, 4, 2, 30, 64, 8, 5, seed=22, requires_grad=True)
    dout = torch.randn(1, 4, 30, 5, generator=torch.Generator().manual_seed(4),
                       dtype=torch.float64)
    call = call_of(q, k, v)
    out, lse = chunked_forward(call.q, call.k, call.v, call.mask, call.scale)
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for k0, k1 in ((0, 40), (40, 64)):
        m = Mask(30, k1 - k0)
        a, b, c = chunked_backward(call.q, call.k[:, :, k0:k1], call.v[:, :, k0:k1], dout, lse,
                                   delta, m, call.scale, block_q=8, block_k=16)
        dq += a
        dks.append(b)
        dvs.append(c)
    want = torch.autograd.grad(qkv.attention(q, k, v, backend="reference"), (q, k, v), dout)
    got = (dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2))
    for a, b in zip(got, want, strict=True):
        assert max_err(a, b) <= 1e3 * EPS64 * float(b.abs().max() + 1)


# ---- backend="auto" -----------------------------------------------------------------------------
def test_settings_named_in_messages_exist_and_work(monkeypatch):
    """The budget that auto's reason tells users to set resolves from ``qkv`` by attribute
    access and changes auto's choice when set; chunked's settings set on the package reach
    the modules that read them."""
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 8, dtype=torch.float32)
    call = call_of(q, k, v, window=4)
    assert kernels.memory_reason(call) is None
    monkeypatch.setattr(kernels, "REFERENCE_MEMORY_BUDGET", 1000)
    why = kernels.memory_reason(call)
    path = re.search(r"(qkv\.[\w.]+) = ", why).group(1)
    assert path == "qkv.kernels.REFERENCE_MEMORY_BUDGET"
    assert functools.reduce(getattr, path.split(".")[1:], qkv) == 1000
    monkeypatch.setattr(qkv.kernels, "REFERENCE_MEMORY_BUDGET", 1 << 30)
    assert kernels.memory_reason(call) is None
    assert auto_order(call)[0][0] == "torch"

    monkeypatch.setattr(qkv.kernels.chunked, "WORKERS", 3)
    assert chunked.threads.workers(torch.device("cpu")) == 3
    monkeypatch.setattr(qkv.kernels.chunked, "BLOCK_K", {"cpu": 5, "cuda": 5})
    assert chunked.plan_blocks(q, k).block_k == 5


def test_auto_picks_chunked_over_the_memory_budget(monkeypatch, caplog):
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 8, dtype=torch.float32)
    call = call_of(q, k, v)
    assert kernels.reference_memory(call) == 1 * 2 * 64 * 64 * 4 * 4
    assert [n for n, _ in auto_order(call)][:2] == ["torch", "reference"]
    monkeypatch.setattr(kernels, "REFERENCE_MEMORY_BUDGET", 1000)
    # torch SDPA runs plain attention in linear memory: it stays first, chunked before reference
    assert [n for n, _ in auto_order(call)] == ["torch", "chunked", "reference"]
    # a window needs a dense mask for SDPA: chunked goes first
    names = [n for n, _ in auto_order(call_of(q, k, v, window=4))]
    assert names[:2] == ["chunked", "torch"]
    with caplog.at_level(logging.DEBUG, logger="qkv"):
        _, w = qkv.attention(q, k, v, return_weights=True)  # SDPA cannot return weights
    assert "auto chose 'chunked'" in caplog.text and "REFERENCE_MEMORY_BUDGET" in caplog.text
    _, w_r = qkv.attention(q, k, v, return_weights=True, backend="reference")
    assert torch.allclose(w, w_r, atol=1e-6)


# ---- memory -------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (its number of elements)."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_long_sequence_never_allocates_an_l_by_l_tensor(monkeypatch):
    """Forward + backward at L=8192 (causal, with a key-padding mask): no operation, in
    either pass, produces a tensor with L*L/16 elements or more (one L x L float32 tensor
    would be 256 MiB); the largest is one block of scores."""
    monkeypatch.setattr(chunked, "WORKERS", 1)  # every op on this thread, where we watch
    length = 8192
    q, k, v = rand_qkv(1, 1, 1, length, length, 16, dtype=torch.float32, seed=1,
                       requires_grad=True)
    pad = qkv.padding_mask(torch.tensor([length - 100]), max_len=length)
    with _LargestTensor() as fwd:
        out = qkv.attention(q, k, v, mask=pad, causal=True, backend="chunked")
    with _LargestTensor() as bwd:
        out.backward(torch.ones_like(out))
    assert bwd.ops > 100  # the backward's blocks did run under the watch
    plan = chunked.plan_blocks(q, k)
    block = plan.block_q * plan.block_k
    for mode in (fwd, bwd):
        assert mode.largest <= max(block, length * 16), mode.largest
        assert mode.largest < length * length // 16
    assert torch.isfinite(q.grad).all()
