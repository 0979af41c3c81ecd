"""Hypothesis property tests: the invariants of DESIGN.md on random shapes and masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv

from helpers import CPU_BACKENDS, rand_qkv

TOL = 1e-10
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def problems(draw, with_mask=True):
    kv = draw(st.integers(1, 2))
    hq = kv * draw(st.integers(1, 3))
    lq, lk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d, dv = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    q, k, v = rand_qkv(draw(st.integers(1, 2)), hq, kv, lq, lk, d, dv, seed=seed)
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["window"] = (draw(st.one_of(st.none(), st.integers(0, 4))),
                        draw(st.one_of(st.none(), st.integers(0, 4))))
    if with_mask and draw(st.booleans()):
        g = torch.Generator().manual_seed(seed + 1)
        kw["mask"] = torch.rand(q.shape[0], 1, lq, lk, generator=g) > draw(st.floats(0, 0.9))
    return q, k, v, kw


@SETTINGS
@given(problems(), st.sampled_from(CPU_BACKENDS))
def test_every_backend_equals_reference(p, backend):
    q, k, v, kw = p
    want = qkv.attention(q, k, v, backend="reference", **kw)
    assert torch.allclose(qkv.attention(q, k, v, backend=backend, **kw), want, atol=TOL)


@SETTINGS
@given(problems())
def test_weights_rows_sum_to_one_or_zero(p):
    q, k, v, kw = p
    _, w = qkv.attention(q, k, v, return_weights=True, **kw)
    sums = w.sum(-1)
    assert ((sums - 1).abs() < 1e-12).logical_or(sums == 0).all()
    assert (w >= 0).all()


@SETTINGS
@given(problems())
def test_output_within_range_of_visible_values(p):
    q, k, v, kw = p
    out, w = qkv.attention(q, k, v, return_weights=True, **kw)
    g = q.shape[1] // k.shape[1]
    vv = v.repeat_interleave(g, dim=1)  # (B, Hq, Lk, Dv)
    seen = (w > 0).unsqueeze(-1)  # (B, Hq, Lq, Lk, 1)
    big = torch.tensor(float("inf"), dtype=v.dtype)
    lo = torch.where(seen, vv.unsqueeze(2), big).amin(-2)  # (B, Hq, Lq, Dv)
    hi = torch.where(seen, vv.unsqueeze(2), -big).amax(-2)
    rows = seen.any(-2)  # queries with some visible key
    assert ((out >= lo - 1e-12) | ~rows).all() and ((out <= hi + 1e-12) | ~rows).all()


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_permutation_equivariance(p, rnd):
    q, k, v, kw = p
    kw.pop("causal"), kw.pop("window", None)  # positions break the symmetry
    lq, lk = q.shape[-2], k.shape[-2]
    pq = torch.tensor(rnd.sample(range(lq), lq))
    pk = torch.tensor(rnd.sample(range(lk), lk))
    out = qkv.attention(q, k, v, **kw)
    m = kw.get("mask")
    kw2 = {"mask": m[..., pq, :][..., pk]} if m is not None else {}
    out2 = qkv.attention(q[..., pq, :], k[..., pk, :], v[..., pk, :], **kw2)
    assert torch.allclose(out2, out[..., pq, :], atol=TOL)


@SETTINGS
@given(problems(with_mask=False), st.integers(0, 8))
def test_causal_output_ignores_the_future(p, t):
    q, k, v, _ = p
    lq = lk = min(q.shape[-2], k.shape[-2])
    q, k, v = q[..., :lq, :], k[..., :lk, :], v[..., :lk, :]
    t = t % lq
    out = qkv.attention(q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[..., t + 1 :, :] += 3.0
    k2[..., t + 1 :, :] -= 2.0
    v2[..., t + 1 :, :] *= -5.0
    out2 = qkv.attention(q2, k2, v2, causal=True)
    assert torch.equal(out2[..., : t + 1, :], out[..., : t + 1, :])


@SETTINGS
@given(problems(), st.integers(0, 8))
def test_masking_a_key_equals_deleting_it(p, j):
    q, k, v, kw = p
    kw.pop("causal"), kw.pop("window", None)
    lk = k.shape[-2]
    if lk < 2:
        return
    j = j % lk
    keep = kw.get("mask", torch.ones(1, 1, q.shape[-2], lk, dtype=torch.bool)).clone()
    masked = keep.clone()
    masked[..., j] = False
    idx = [i for i in range(lk) if i != j]
    a = qkv.attention(q, k, v, mask=masked)
    b = qkv.attention(q, k[..., idx, :], v[..., idx, :], mask=keep[..., idx])
    assert torch.allclose(a, b, atol=TOL)


@SETTINGS
@given(problems())
def test_multi_head_equals_single_head_calls(p):
    q, k, v, kw = p
    out = qkv.attention(q, k, v, **kw)
    g = q.shape[1] // k.shape[1]
    for h in range(q.shape[1]):
        one = qkv.attention(q[:, h : h + 1], k[:, h // g : h // g + 1],
                            v[:, h // g : h // g + 1], **kw)
        assert torch.allclose(one, out[:, h : h + 1], atol=TOL)
