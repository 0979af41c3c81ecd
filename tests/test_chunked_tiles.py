"""Row tiles of the chunked backend: blocks that a causal/window band cuts are trimmed to
the keys their rows can see and split into tiles of ``BAND_ROWS`` rows (one query head
per kv head), the band applied only on each tile's edge columns (``tril_``/``triu_`` and
a 0/-inf bias), row tiles first in each unit without rescaling.

The layout is checked pair by pair (every visible pair in exactly one tile, every hidden
pair of a tile inside its edges), and the results against the float64 oracle and the
reference backend's gradients, with tiles forced small so that every path runs: Lq != Lk
both ways, windows, GQA (trimmed columns, no row split), several heads per block, tensor
masks, dropout, NaN in keys the band hides and rows that see no key.
"""

import itertools
import random

import pytest
import torch

import qkv
from qkv.kernels import chunked
from qkv.kernels.chunked import block_sizes
from qkv.kernels.chunked.blocks import Blocks
from qkv.kernels.chunked.planning import plan_blocks
from qkv.masks import BlockState, Mask

from helpers import (
    assert_grads_lowp_rule,
    assert_lowp_rule,
    lowp_baseline,
    max_err,
    oracle,
    rand_qkv,
)

EPS64 = torch.finfo(torch.float64).eps

BANDS = {
    "causal": {"causal": True},
    "window": {"window": (17, 5)},
    "sliding-causal": {"causal": True, "window": 40},
    "one-sided": {"window": (None, 3)},
    "left-only": {"window": (9, None)},
}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 rows on CPU, so that blocks of 64 queries split into four."""
    monkeypatch.setattr(chunked, "BAND_ROWS", {"cpu": 16, "cuda": 0})


def bound64(k, v, d):
    """Rounding bound of a float64 output (see test_chunked.bound64)."""
    return (d + k.shape[-2] + 8) * EPS64 * max(1.0, float(v.detach().abs().max()))


def visible(mask: Mask, i: int, j: int) -> bool:
    d = j - (i + mask.offset)
    return (mask.right is None or d <= mask.right) and (mask.left is None or d >= -mask.left)


# ---- the layout ----------------------------------------------------------------------------------
def test_tiles_cover_each_visible_pair_once_and_edges_hold_every_hidden_pair():
    """For 300 random bands, lengths, block sizes and tile heights: the tiles of a unit are
    disjoint, cover every pair the band shows, contain at least one visible pair each, and
    outside their edge columns hold only visible pairs; row tiles come first, and a tile
    is marked first-of-its-rows exactly when no earlier tile touched any of its rows."""
    rnd = random.Random(0)
    for _ in range(300):
        lq, lk = rnd.randint(1, 90), rnd.randint(1, 90)
        left = rnd.choice([None, 0, 3, 17])
        right = rnd.choice([None, 0, 0, 2, 11]) if left is not None else rnd.choice([0, 4])
        mask = Mask(lq, lk, causal=right == 0, left=left, right=right)
        g = rnd.choice([1, 1, 2])
        q, k = torch.empty(1, 2 * g, lq, 4), torch.empty(1, 2, lk, 4)
        rows = rnd.choice([1, 3, 8, 16])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(chunked, "BAND_ROWS", {"cpu": rows, "cuda": 0})
            plan = plan_blocks(q, k, mask=mask, block_q=rnd.randint(1, 40),
                               block_k=rnd.randint(1, 40))
        assert plan.band_rows == rows
        bl = Blocks(q, k, None, mask, 1.0, plan, dropout=0.0, seed=None, offsets=(0, 0))
        for q0 in range(0, lq, plan.block_q):
            q1 = min(q0 + plan.block_q, lq)
            tiles, unstarted = bl.unit_tiles(q0, q1)
            seen: dict[tuple[int, int], int] = {}
            touched: set[int] = set()
            started: set[int] = set()  # rows whose first tile is marked so
            whole = [(t.r0, t.r1) == (q0, q1) for t, _ in tiles]
            assert whole == sorted(whole), "row tiles come before whole ones"
            for t, fresh in tiles:
                assert q0 <= t.r0 < t.r1 <= q1 and 0 <= t.c0 < t.c1 <= lk
                assert g == 1 or (t.r0, t.r1) == (q0, q1), "no row split with G > 1"
                assert fresh == touched.isdisjoint(range(t.r0, t.r1))
                touched.update(range(t.r0, t.r1))
                if fresh:
                    started.update(range(t.r0, t.r1))
                any_visible = False
                for i, j in itertools.product(range(t.r0, t.r1), range(t.c0, t.c1)):
                    assert (i, j) not in seen, "tiles overlap"
                    seen[(i, j)] = 1
                    vis = visible(mask, i, j)
                    any_visible |= vis
                    in_edge = any(e0 <= j < e1 for e0, e1 in t.edges)
                    assert vis or in_edge, f"hidden pair ({i}, {j}) outside the edges"
                assert any_visible
                assert (t.state is BlockState.VISIBLE) == (not t.edges)
            want = {(i, j) for i in range(q0, q1) for j in range(lk) if visible(mask, i, j)}
            assert want <= set(seen)
            # Rows no first tile starts must be zeroed before the others accumulate.
            assert unstarted == (not set(range(q0, q1)) <= started)


def test_default_cpu_plan_cuts_the_diagonal_into_trimmed_row_tiles():
    """At L=4096 (causal, one query head per kv head) a unit is 1024 queries over blocks of
    256 keys: on its diagonal, each key block is a 256 x 256 tile with the band on its
    keys and, below it, one visible tile of the rows that see the whole block; the
    blocks left of the diagonal are whole. Every tile of the diagonal's first key block
    starts its rows."""
    q = torch.empty(1, 8, 4096, 64)
    mask = Mask(4096, 4096, causal=True, right=0)
    plan = plan_blocks(q, q, mask=mask)
    assert (plan.block_q, plan.block_k, plan.band_rows) == (1024, 256, 256)
    bl = Blocks(q, q, q, mask, 0.125, plan, dropout=0.0, seed=None, offsets=(0, 0))
    tiles, unstarted = bl.unit_tiles(1024, 2048)
    got = [(t.r0, t.r1, t.c0, t.c1, t.edges, fresh) for t, fresh in tiles]
    band = [((r, r + 256, r, r + 256, ((r, r + 256),), r == 1024),
             (r + 256, 2048, r, r + 256, (), r == 1024)) for r in range(1024, 2048, 256)]
    whole = [(1024, 2048, c, c + 256, (), False) for c in range(0, 1024, 256)]
    assert got == [t for pair in band for t in pair][:-1] + whole
    assert not unstarted
    # With G = 2 no rows are split: blocks stay at most as tall as they are wide.
    plan = plan_blocks(q, q[:, :4], mask=mask)
    assert plan.band_rows == 256 and plan.block_q <= plan.block_k == 512


# ---- results -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lq,lk", [(97, 203), (203, 97), (130, 130)])
@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_row_tiles_against_oracle_and_reference_gradients(small_tiles, lq, lk, band, heads):
    """float64 output within the rounding bound of the oracle, gradients within 1e-10 of
    the reference backend's; blocks (64, 48) with 16-row tiles (G = 1) or trimmed whole
    blocks (G = 2), two batch rows whose heads share a block."""
    kw = BANDS[band]
    q, k, v = rand_qkv(2, *heads, lq, lk, 9, 5, seed=lq + lk + heads[0], requires_grad=True)
    want, _ = oracle(q, k, v, **kw)
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", **kw)
    assert max_err(out, want) <= bound64(k, v, 9), band
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(qkv.attention(q, k, v, backend="reference", **kw), (q, k, v), dout)
    for name, a, b in zip("qkv", got, ref, strict=True):
        assert max_err(a, b) <= 1e-10, f"d{name}: {max_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_tiles_change_only_rounding(dtype):
    """The default plan with and without row tiles (BAND_ROWS 0): the same output and
    gradients up to rounding, with dropout (its mask hashes positions, not tiles), in
    float32 and float64, on one thread and on two."""
    # PyTorch's first float64 exp in a process, when it runs on several threads, now and
    # then comes out less accurate (seen: 3e-9 relative); one small exp first avoids it.
    torch.ones(8, dtype=dtype).exp()
    q, k, v = rand_qkv(1, 3, 3, 700, 900, 16, dtype=dtype, seed=4, requires_grad=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for workers, kw in itertools.product([1, 2], [{"causal": True}, {"window": (300, 0)}]):
        res = []
        for rows in (0, 256):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(chunked, "BAND_ROWS", {"cpu": rows, "cuda": 0})
                mp.setattr(chunked, "WORKERS", workers)
                g = torch.Generator().manual_seed(11)
                out = qkv.attention(q, k, v, backend="chunked", dropout=0.25, generator=g,
                                    **kw)
                res.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
        for a, b in zip(*res, strict=True):
            assert max_err(a, b) <= tol * max(1.0, float(b.detach().abs().max())), (workers, kw)


def test_row_tiles_with_a_tensor_mask(small_tiles):
    """A bool mask with the band: tiles take the whole-tile masked path. Rows the mask
    hides entirely give 0 and zero gradients; the rest meet the oracle."""
    q, k, v = rand_qkv(1, 2, 2, 80, 80, 8, seed=6, requires_grad=True)
    mask = torch.rand(1, 1, 80, 80, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 50:70, :] = False  # rows 50..69 see no key
    want, _ = oracle(q, k, v, mask=mask, causal=True)
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", mask=mask, causal=True)
        (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert max_err(out, want) <= bound64(k, v, 8)
    assert not out[..., 50:70, :].any() and not dq[..., 50:70, :].any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_in_keys_the_band_hides_stays_out_of_rows_that_cannot_see_it(small_tiles):
    """A NaN in key 40 (and +inf in key 41's score via an infinite key element): rows
    that the causal band keeps from those keys equal the clean result (up to rounding:
    the clean call may exponentiate unshifted, the dirty one keeps the running max); the
    rows that see them are NaN, as in the oracle."""
    q, k, v = rand_qkv(1, 2, 2, 96, 96, 8, seed=3, dtype=torch.float32)
    with block_sizes(64, 64):
        clean = qkv.attention(q, k, v, backend="chunked", causal=True)
        k2 = k.clone()
        k2[..., 40, 0] = float("nan")
        k2[..., 41, :] = float("inf")
        dirty = qkv.attention(q, k2, v, backend="chunked", causal=True)
    assert max_err(dirty[..., :40, :], clean[..., :40, :]) <= 1e-6
    assert torch.isnan(dirty[..., 40:, :]).all()
    want, _ = oracle(q, k2, v, causal=True)
    assert torch.isnan(want[..., 40:, :]).all()


def test_rows_that_see_no_key_give_zero_and_zero_gradients(small_tiles):
    """Lq > Lk with causal: the first Lq - Lk rows see no key (their tiles are trimmed
    away); their output and gradient are 0 even when a value holds NaN."""
    q, k, v = rand_qkv(1, 2, 2, 150, 60, 8, seed=2, requires_grad=True)
    with block_sizes(64, 32):
        out = qkv.attention(q, k, v, backend="chunked", causal=True)
        (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert not out[..., :90, :].any() and not dq[..., :90, :].any()
    want, _ = oracle(q, k, v, causal=True)
    assert max_err(out, want) <= bound64(k, v, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_tiles_in_low_precision(small_tiles, dtype):
    """float16/bfloat16 queries go through the scaled scratch copy (not the view that
    takes the scale inside the products): with row tiles, within 2x a same-dtype
    baseline's error of the oracle (+1e-5), output and gradients."""
    q, k, v = rand_qkv(1, 3, 3, 97, 150, 16, dtype=dtype, seed=5, requires_grad=True)
    kw = {"causal": True, "window": 40}
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", **kw)
    assert out.dtype == dtype
    want, _ = oracle(q, k, v, **kw)
    assert_lowp_rule(out, want, lowp_baseline(q, k, v, **kw))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_grads_lowp_rule(grads, q, k, v, dout, factor=5.0, **kw)
