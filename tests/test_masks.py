"""Masks: every kind, their alignment, fully hidden rows and NaN in hidden positions."""

import pytest
import torch

import qkv
from qkv.masks import BlockState, Mask

from helpers import oracle, rand_qkv

TOL = 1e-10


def test_bool_and_additive_masks_agree(backend):
    q, k, v = rand_qkv(2, 3, 3, 11, 19, 8)
    keep = torch.rand(2, 3, 11, 19, generator=torch.Generator().manual_seed(1)) > 0.3
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    a = qkv.attention(q, k, v, mask=keep, backend=backend)
    b = qkv.attention(q, k, v, mask=additive, backend=backend)
    assert torch.allclose(a, b, atol=TOL, rtol=0)


def test_additive_bias_values(backend):
    q, k, v = rand_qkv(1, 2, 2, 5, 7, 4)
    bias = torch.randn(5, 7, dtype=torch.float64)
    out = qkv.attention(q, k, v, mask=bias, backend=backend)
    want, _ = oracle(q, k, v, mask=bias)
    assert torch.allclose(out, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("lq,lk", [(3, 7), (7, 3), (5, 5)])
def test_causal_is_bottom_right_aligned(lq, lk):
    m = qkv.causal_mask(lq, lk)
    for i in range(lq):
        for j in range(lk):
            assert bool(m[i, j]) == (j <= i + lk - lq)
    # Lq > Lk: the first Lq - Lk queries see nothing; Lq < Lk: the last query sees all.
    assert m[-1].all()


def test_causal_decode_step_equals_last_row(backend):
    q, k, v = rand_qkv(1, 2, 2, 9, 9, 8)
    full = qkv.attention(q, k, v, causal=True, backend=backend)
    step = qkv.attention(q[:, :, -1:], k, v, causal=True, backend=backend)  # Lq=1, Lk=9
    assert torch.allclose(step, full[:, :, -1:], atol=TOL, rtol=0)


@pytest.mark.parametrize("window", [0, 2, (3, 0), (0, 2), (None, 1), (2, None)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_and_causal_against_oracle(backend, window, causal):
    q, k, v = rand_qkv(2, 2, 1, 13, 17, 6)
    out = qkv.attention(q, k, v, window=window, causal=causal, backend=backend)
    want, _ = oracle(q, k, v, window=window, causal=causal)
    assert torch.allclose(out, want, atol=TOL, rtol=0)


def test_window_intersects_with_mask(backend):
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 4)
    m = torch.rand(8, 8, generator=torch.Generator().manual_seed(5)) > 0.5
    out = qkv.attention(q, k, v, mask=m, window=1, causal=True, backend=backend)
    band = qkv.window_mask(8, 8, 1) & qkv.causal_mask(8, 8)
    want, _ = oracle(q, k, v, mask=m & band)
    assert torch.allclose(out, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [(19,), (1, 19), (11, 1), (2, 1, 1, 19), (3, 11, 19),
                                   (2, 3, 11, 19), (1, 1, 1, 1)])
def test_broadcast_mask_shapes(backend, shape):
    q, k, v = rand_qkv(2, 3, 3, 11, 19, 8)
    m = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.3
    out = qkv.attention(q, k, v, mask=m, backend=backend)
    want, _ = oracle(q, k, v, mask=m)
    assert torch.allclose(out, want, atol=TOL, rtol=0)


def test_padding_mask_builder(backend):
    q, k, v = rand_qkv(3, 2, 2, 4, 6, 5)
    lengths = torch.tensor([6, 2, 0])
    m = qkv.padding_mask(lengths)
    assert m.shape == (3, 1, 1, 6)
    out = qkv.attention(q, k, v, mask=m, backend=backend)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # no key at all: output 0
    short = qkv.attention(q[1:2], k[1:2, :, :2], v[1:2, :, :2], backend=backend)
    assert torch.allclose(out[1:2], short, atol=TOL, rtol=0)  # padding == deleting keys
    assert torch.equal(qkv.padding_mask(torch.tensor([[True, False]])),
                       torch.tensor([True, False]).view(1, 1, 1, 2))


def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    q, k, v = rand_qkv(2, 2, 2, 6, 5, 4, requires_grad=True)
    m = torch.ones(2, 2, 6, 5, dtype=torch.bool)
    m[:, :, 2] = False  # query 2 sees nothing
    m[1, 0] = False  # one whole head of one batch sees nothing
    out = qkv.attention(q, k, v, mask=m, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    assert torch.equal(q.grad[1, 0], torch.zeros_like(q.grad[1, 0]))


def test_fully_masked_rows_weights(backend):
    q, k, v = rand_qkv(1, 1, 1, 4, 3, 2)
    try:
        _, w = qkv.attention(q, k, v, mask=torch.zeros(4, 3, dtype=torch.bool),
                             return_weights=True, backend=backend)
    except ValueError:
        pytest.skip(f"{backend} does not return weights")
    assert torch.equal(w, torch.zeros_like(w))


def test_causal_with_more_queries_than_keys_hides_first_rows(backend):
    q, k, v = rand_qkv(1, 2, 2, 7, 3, 4)
    out = qkv.attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    want, _ = oracle(q, k, v, causal=True)
    assert torch.allclose(out, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_nan_in_hidden_keys_and_values_does_not_leak(backend, poison):
    """pytorch #101967: garbage in padded keys/values must not reach the output."""
    q, k, v = rand_qkv(2, 2, 2, 5, 8, 4, requires_grad=False)
    lengths = torch.tensor([5, 3])
    m = qkv.padding_mask(lengths, 8)
    clean = qkv.attention(q, k, v, mask=m, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:] = poison
    v2[0, :, 5:] = poison
    k2[1, :, 3:] = poison
    v2[1, :, 3:] = poison
    k2.requires_grad_()
    v2.requires_grad_()
    out = qkv.attention(q, k2, v2, mask=m, backend=backend)
    assert torch.equal(out, clean)
    out.sum().backward()
    assert torch.isfinite(k2.grad).all() and torch.isfinite(v2.grad).all()
    assert torch.equal(v2.grad[1, :, 3:], torch.zeros_like(v2.grad[1, :, 3:]))


def test_additive_minus_inf_hides_like_false(backend):
    q, k, v = rand_qkv(1, 1, 1, 3, 4, 2)
    bias = torch.zeros(3, 4, dtype=torch.float64)
    bias[:, 3] = float("-inf")
    v2 = v.clone()
    v2[..., 3, :] = float("nan")
    out = qkv.attention(q, k, v2, mask=bias, backend=backend)
    want = qkv.attention(q, k[..., :3, :], v[..., :3, :], backend=backend)
    assert torch.allclose(out, want, atol=TOL, rtol=0)


def test_band_block_states():
    m = Mask(8, 8, causal=True, right=0)
    assert m.band_block_state(0, 4, 4, 8) is BlockState.HIDDEN
    assert m.band_block_state(4, 8, 0, 4) is BlockState.VISIBLE
    assert m.band_block_state(0, 4, 0, 4) is BlockState.PARTIAL
    w = Mask(16, 16, left=2, right=2)
    assert w.band_block_state(8, 12, 0, 4) is BlockState.HIDDEN
    assert w.band_block_state(8, 12, 12, 16) is BlockState.PARTIAL
    assert Mask(4, 4).band_block_state(0, 4, 0, 4) is BlockState.VISIBLE
    # The classification agrees with the element-wise band on every rectangle.
    for mask in (m, w, Mask(5, 9, causal=True, left=3, right=0), Mask(9, 5, right=0)):
        for q0 in range(mask.lq):
            for k0 in range(mask.lk):
                q1, k1 = min(q0 + 3, mask.lq), min(k0 + 2, mask.lk)
                dense = mask.band(q0, q1, k0, k1, torch.device("cpu"))
                state = mask.band_block_state(q0, q1, k0, k1)
                expect = (BlockState.HIDDEN if not dense.any() else
                          BlockState.VISIBLE if dense.all() else BlockState.PARTIAL)
                assert state is expect
