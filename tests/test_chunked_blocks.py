"""The chunked backend's block-level paths: float32 masked and unmasked blocks, the running
max's start value, scores far below a row's max, the default block plan, scaled queries.

Masked blocks compute ``exp`` as ``exp2(x * log2(e))`` on CPU and unmasked ones as
``exp``; the running max starts at the lowest finite float. These tests hold both paths
to the float64 oracle (float32: the low-precision rule of ``helpers``; float64: the
rounding bound of ``test_chunked``).
"""

import pytest
import torch

import qkv
from qkv.functional import prepare_call
from qkv.kernels import chunked
from qkv.kernels.chunked import block_sizes

from helpers import assert_lowp_rule, lowp_baseline, max_err, oracle, rand_qkv

EPS64 = torch.finfo(torch.float64).eps


def bound64(k, v, d):
    """Rounding bound of a float64 output (see test_chunked.bound64)."""
    return (d + k.shape[-2] + 8) * EPS64 * max(1.0, float(v.detach().abs().max()))


def run(q, k, v, block, **kw):
    with block_sizes(*block):
        return qkv.attention(q, k, v, backend="chunked", **kw)


BANDS = {
    "causal": {"causal": True},
    "window": {"window": (17, 5)},
    "sliding-causal": {"causal": True, "window": 40},
    "one-sided": {"window": (None, 3)},
}


@pytest.mark.parametrize("lq,lk", [(97, 203), (203, 97), (97, 97)])
@pytest.mark.parametrize("band", list(BANDS))
def test_float32_band_blocks_against_oracle(lq, lk, band):
    """Bottom-right causal and windows with Lq != Lk both ways, D=59, 6 query heads on 3
    kv heads, blocks that divide nothing: diagonal blocks (masked, exp2) and fully visible
    ones (exp) together in every row."""
    q, k, v = rand_qkv(2, 6, 3, lq, lk, 59, 31, seed=lq + 2 * lk, dtype=torch.float32)
    kw = BANDS[band]
    want, _ = oracle(q, k, v, **kw)
    base = lowp_baseline(q, k, v, **kw)
    for block in [(32, 48), (48, 32), (7, 64), (None, None)]:
        got = run(q, k, v, block, **kw)
        assert got.dtype == torch.float32
        assert_lowp_rule(got, want, base, what=f"{band} blocks {block}")


def test_a_mask_that_hides_nothing_matches_no_mask():
    """An all-True tensor mask sends every block down the masked path (exp2), no mask down
    the plain one (exp): both meet the oracle in float32 and agree with each other to
    float32 rounding of the weights (|diff| <= 2 x the baseline's error)."""
    q, k, v = rand_qkv(1, 4, 2, 97, 203, 59, 31, seed=3, dtype=torch.float32)
    want, _ = oracle(q, k, v)
    base = lowp_baseline(q, k, v)
    plain = run(q, k, v, (32, 64))
    masked = run(q, k, v, (32, 64), mask=torch.ones(97, 203, dtype=torch.bool))
    assert_lowp_rule(plain, want, base, what="no mask")
    assert_lowp_rule(masked, want, base, what="all-True mask")
    assert max_err(plain, masked) <= 2 * max_err(base, want) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_far_below_the_max(dtype):
    """Finite biases of -150, -1e4 and -1e9 on some keys: their exp underflows (to 0 in
    float32, to a tiny number in float64) on both exp paths, and the weights the oracle
    gives there are (almost) 0, so the output is the softmax over the other keys."""
    q, k, v = rand_qkv(1, 2, 2, 40, 90, 16, seed=8, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    bias = torch.zeros(40, 90, dtype=torch.float64)
    cols = torch.randperm(90, generator=g)
    bias[:, cols[:20]] = -150.0
    bias[:, cols[20:40]] = -1e4
    bias[:, cols[40:60]] = -1e9
    for extra in ({}, {"causal": True}):
        want, w_want = oracle(q, k, v, mask=bias, **extra)
        with block_sizes(16, 32):
            got, w = qkv.attention(q, k, v, mask=bias.to(dtype), return_weights=True,
                                   backend="chunked", **extra)
        if dtype == torch.float64:
            assert max_err(got, want) <= bound64(k, v, 16)
            assert max_err(w, w_want) <= bound64(k, torch.ones(1), 16)
        else:
            assert_lowp_rule(got, want, lowp_baseline(q, k, v, mask=bias, **extra))
            assert not w[..., cols[20:60]].any()  # exp(-1e4) is 0 in float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_whose_max_is_the_lowest_float(dtype):
    """The running max starts at finfo.min: a row whose every key carries a bias of
    exactly finfo.min still sees its keys (uniform weights: the scores round to
    finfo.min), a row that sees no key gives 0 with lse -inf, and a row whose first key
    blocks are all hidden picks up the later ones."""
    lowest = torch.finfo(dtype).min
    q, k, v = rand_qkv(1, 2, 2, 12, 70, 8, seed=5, dtype=dtype)
    bias = torch.zeros(12, 70, dtype=dtype)
    bias[3] = lowest  # all keys at the lowest finite bias
    bias[7] = float("-inf")  # no key at all
    bias[9, :50] = float("-inf")  # only the last block of keys (block_k 16: 48..63 and 64..)
    with block_sizes(4, 16):
        out = qkv.attention(q, k, v, mask=bias, backend="chunked")
    torch.testing.assert_close(out[:, :, 3], v.mean(dim=2), rtol=0, atol=70 * 8 *
                               torch.finfo(dtype).eps)
    assert not out[:, :, 7].any()
    want, _ = oracle(q, k, v, mask=bias.to(torch.float64).clamp(min=-1e300))
    rows = [r for r in range(12) if r not in (3, 7)]
    err = max_err(out[:, :, rows], want[:, :, rows])
    if dtype == torch.float64:
        assert err <= bound64(k, v, 8)
    else:
        base = lowp_baseline(q, k, v, mask=bias)
        assert err <= 2 * max_err(base[:, :, rows], want[:, :, rows]) + 1e-5
    call = prepare_call(q, k, v, mask=bias)[0]
    _, lse = chunked.chunked_forward(call.q, call.k, call.v, call.mask, call.scale,
                                     block_q=4, block_k=16)
    assert torch.isneginf(lse[:, :, 7]).all()
    assert torch.isfinite(lse[:, :, [*rows, 3]]).all()


def test_default_cpu_plan_keeps_one_block_within_budget():
    """One kv head per block when its rows fill the budget (tall blocks for the matrix
    products), several heads when they are short; G query heads per kv head count
    against the budget; a band with row tiles (G = 1) takes BAND_BLOCK_K keys and tall
    blocks, one without (G > 1) keeps block_q <= block_k."""
    budget, bk = chunked.BLOCK_ELEMENTS["cpu"], chunked.BLOCK_K["cpu"]

    def plan(hq, hkv, lq, lk, **kw):
        q = torch.empty(1, hq, lq, 64)
        k = torch.empty(1, hkv, lk, 64)
        mask = qkv.masks.Mask(lq, lk, **kw) if kw else None
        p = chunked.plan_blocks(q, k, mask=mask)
        assert p.heads * (hq // hkv) * p.block_q * p.block_k <= budget
        return p

    big = plan(8, 8, 4096, 4096)
    assert (big.block_k, big.heads) == (bk, 1) and big.block_q * bk == budget
    gqa = plan(8, 2, 4096, 4096)
    assert gqa.heads == 1 and 4 * gqa.block_q * gqa.block_k == budget
    small = plan(8, 8, 128, 128)
    assert small.heads > 1 and small.block_k == 128
    band = plan(8, 8, 4096, 4096, left=None, right=0)
    assert band.block_k == chunked.BAND_BLOCK_K["cpu"] and band.block_q * band.block_k == budget
    assert band.band_rows == chunked.BAND_ROWS["cpu"]
    band_gqa = plan(8, 2, 4096, 4096, left=None, right=0)
    assert band_gqa.block_k == bk and band_gqa.block_q <= band_gqa.block_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noncontiguous_queries_give_the_same_bits(dtype):
    """Queries are scaled block by block into a scratch buffer: a strided q (the
    (B, L, H, D) layout of a projection, transposed) gives exactly the contiguous result,
    and float16/bfloat16 are converted before they are scaled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 6, 16, generator=g).to(dtype)  # (B, L, Hq, D)
    q = x.transpose(1, 2)  # (B, Hq, L, D), not contiguous
    k, v = (torch.randn(2, 3, 70, 16, generator=g).to(dtype) for _ in range(2))
    for kw in ({}, {"causal": True}):
        a = run(q, k, v, (16, 32), **kw)
        b = run(q.contiguous(), k, v, (16, 32), **kw)
        assert torch.equal(a, b)
    want, _ = oracle(q, k, v)
    assert_lowp_rule(run(q, k, v, (16, 32)), want, lowp_baseline(q, k, v))


@pytest.mark.parametrize("lq,lk", [(700, 900), (900, 700)])
@pytest.mark.parametrize("band", list(BANDS))
def test_default_blocks_on_longer_sequences(lq, lk, band):
    """The default CPU plan (512 keys, tall one-head blocks) on lengths it does not
    divide, bottom-right bands with Lq != Lk, plain and GQA: float64 within the rounding
    bound."""
    for heads in [(2, 2), (4, 1)]:
        q, k, v = rand_qkv(1, *heads, lq, lk, 8, 5, seed=lq + lk + heads[1])
        want, _ = oracle(q, k, v, **BANDS[band])
        got = qkv.attention(q, k, v, backend="chunked", **BANDS[band])
        assert max_err(got, want) <= bound64(k, v, 8), heads
