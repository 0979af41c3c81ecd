"""Defects a hostile probe found in input handling: valid empty inputs that crashed, and
bad inputs that raised the wrong exception type or were accepted silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkv
from qkv import causal_mask, padding_mask, window_mask

from helpers import CPU_BACKENDS, oracle


def _r(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- valid empty inputs --------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_keys_with_a_batched_padding_mask_gives_zeros(backend):
    q, k, v = _r(2, 3, 4, 5), _r(2, 3, 0, 5), _r(2, 3, 0, 6)
    mask = padding_mask(torch.tensor([0, 0]), 0)  # (2, 1, 1, 0)
    kw = {"return_weights": True} if backend != "torch" else {}
    res = qkv.attention(q, k, v, mask=mask, backend=backend, **kw)
    out = res[0] if kw else res
    assert out.shape == (2, 3, 4, 6) and torch.equal(out, torch.zeros_like(out))
    if kw:
        assert res[1].shape == (2, 3, 4, 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_queries_with_a_batched_mask_gives_an_empty_output(backend):
    q, k, v = _r(2, 3, 0, 5), _r(2, 3, 6, 5), _r(2, 3, 6, 5)
    mask = torch.ones(2, 1, 0, 6, dtype=torch.bool)
    out = qkv.attention(q, k, v, mask=mask, backend=backend)
    assert out.shape == (2, 3, 0, 5)


def test_explain_with_no_keys_and_a_batched_mask():
    s = qkv.explain(_r(2, 3, 4, 5), _r(2, 3, 0, 5), _r(2, 3, 0, 5),
                    mask=padding_mask(torch.tensor([0, 0]), 0))
    assert s.weights.shape == (2, 3, 4, 0) and torch.equal(s.output, torch.zeros(2, 3, 4, 5,
                                                                                 dtype=torch.float64))


def test_zero_query_heads_are_refused_at_validation():
    with pytest.raises(ValueError, match=r"0 heads.*Fix"):
        qkv.attention(_r(1, 0, 4, 5), _r(1, 1, 6, 5), _r(1, 1, 6, 5))


# ---- exception types -----------------------------------------------------------------------
def test_a_window_wider_than_any_sequence_bounds_nothing():
    q, k, v = _r(1, 2, 4, 5), _r(1, 2, 6, 5), _r(1, 2, 6, 5)
    out = qkv.attention(q, k, v, causal=True, window=10**30)
    torch.testing.assert_close(out, oracle(q, k, v, causal=True)[0])
    out = qkv.attention(q, k, v, window=(10**30, 1))
    torch.testing.assert_close(out, oracle(q, k, v, window=(10**6, 1))[0])


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.25), np.int64(2)])
def test_numpy_scalars_are_numbers(value):
    q, k, v = _r(1, 2, 4, 5), _r(1, 2, 6, 5), _r(1, 2, 6, 5)
    torch.testing.assert_close(qkv.attention(q, k, v, scale=value),
                               oracle(q, k, v, scale=float(value))[0])
    p = np.float32(0.5)
    g = torch.Generator().manual_seed(0)
    out = qkv.attention(q, k, v, dropout=p, generator=g)
    assert torch.isfinite(out).all()
    assert qkv.MultiHeadAttention(8, 2, dropout=p).dropout == 0.5


@pytest.mark.parametrize("kw,exc", [
    ({"scale": True}, TypeError), ({"scale": "0.5"}, TypeError),
    ({"scale": float("inf")}, ValueError), ({"scale": np.float32("nan")}, ValueError),
    ({"dropout": False}, TypeError), ({"dropout": float("nan")}, ValueError),
    ({"dropout": np.float64(1.0)}, ValueError),
])
def test_scale_and_dropout_refuse_bools_and_non_finite(kw, exc):
    with pytest.raises(exc, match=next(iter(kw)) + ".*Fix"):
        qkv.attention(_r(1, 2, 4, 5), _r(1, 2, 6, 5), _r(1, 2, 6, 5), **kw)


def test_module_refuses_a_dtype_it_does_not_hold():
    m = qkv.MultiHeadAttention(8, 2)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=r"x is torch.float64"):
            m(_r(1, 3, 8))
    with pytest.raises(TypeError, match=r"float64.*Fix"):
        m(_r(1, 3, 8, dtype=torch.float32), _r(1, 4, 8))


@pytest.mark.parametrize("kw,exc", [
    ({"kdim": -1}, ValueError), ({"vdim": 0}, ValueError), ({"kdim": 2.5}, TypeError),
    ({"num_kv_heads": True}, TypeError), ({"dropout": float("nan")}, ValueError),
    ({"dropout": "0.1"}, TypeError),
])
def test_module_constructor_refuses(kw, exc):
    with pytest.raises(exc, match=next(iter(kw)) + ".*Fix"):
        qkv.MultiHeadAttention(8, 2, **kw)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: causal_mask(-1), ValueError, "lq must be >= 0"),
    (lambda: causal_mask(2.5), TypeError, "lq must be an int"),
    (lambda: causal_mask(3, -2), ValueError, "lk must be >= 0"),
    (lambda: causal_mask(3, device="meta"), ValueError, "meta"),
    (lambda: window_mask(4, 4, -2), ValueError, "window left must be >= 0"),
    (lambda: window_mask(4, 4, (1, 2.5)), TypeError, "window right"),
    (lambda: window_mask(True), TypeError, "lq"),
    (lambda: padding_mask(torch.tensor([1, 2], device="meta")), ValueError, "meta"),
    (lambda: padding_mask(torch.tensor([1, 2]), -1), ValueError, "max_len"),
    (lambda: padding_mask(torch.tensor([3]), 2), ValueError, "exceeds max_len"),
])
def test_mask_builders_refuse(call, exc, match):
    with pytest.raises(exc, match=match + ".*Fix"):
        call()


def test_mask_builders_still_build():
    assert torch.equal(causal_mask(2, 3), torch.tensor([[True, True, False], [True] * 3]))
    assert torch.equal(window_mask(3, 3, (1, 0)), torch.tensor(
        [[True, False, False], [True, True, False], [False, True, True]]))
    assert window_mask(2, 3, None).all()


def test_meta_masks_are_refused():
    q, k, v = (t.to("meta") for t in (_r(1, 1, 4, 5), _r(1, 1, 6, 5), _r(1, 1, 6, 5)))
    mask = torch.ones(4, 6, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"meta.*Fix"):
        qkv.attention(q, k, v, mask=mask)
    with pytest.raises(ValueError, match=r"meta.*Fix"):
        qkv.attention(_r(1, 1, 4, 5), _r(1, 1, 6, 5), _r(1, 1, 6, 5), mask=mask)


@pytest.mark.parametrize("index,exc", [
    ([0], TypeError), (torch.tensor([0.0]), TypeError), (torch.tensor([[0]]), TypeError),
    (torch.tensor([5]), ValueError), (torch.tensor([-3]), ValueError),
])
def test_kv_cache_reorder_refuses(index, exc):
    cache = qkv.KVCache()
    cache.append(_r(2, 1, 3, 4), _r(2, 1, 3, 4))
    with pytest.raises(exc, match=r"reorder.*Fix"):
        cache.reorder(index)


@pytest.mark.parametrize("k,v,exc", [
    ([1], [2], TypeError),
    (np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 3, 4)), TypeError),
    (_r(2, 1, 3, 4, dtype=torch.float32), _r(2, 1, 3, 4, dtype=torch.float32), TypeError),
    (_r(2, 1, 3, 4), _r(2, 1, 2, 4), ValueError),
])
def test_kv_cache_append_refuses(k, v, exc):
    cache = qkv.KVCache()
    cache.append(_r(2, 1, 3, 4), _r(2, 1, 3, 4))
    with pytest.raises(exc, match=r"KVCache.*Fix"):
        cache.append(k, v)
    assert len(cache) == 3
