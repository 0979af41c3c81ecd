"""Pieces every Triton kernel of qkv shares: the band, tile loads, and launch arguments.

The band is qkv's canonical causal/window rule (see :mod:`qkv.masks`): with
``OFF = Lk - Lq``, query ``i`` may see key ``j`` iff ``-LEFT <= j - (i + OFF) <= RIGHT``
(each side only when present), and ``j < kv_len`` (the per-batch key length, ``Lk``
without padding). A kernel keeps one tile of one axis *resident* and streams the other axis
in blocks; :func:`span` tells it which streamed blocks can hold a visible pair at all
(the others are skipped without being loaded) and which hold only visible pairs (those
run without any masking).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import offline


@triton.jit
def span(r0, r1, t_len, OFF, LEFT, RIGHT,
         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Streamed range for the resident indices ``r0 <= r < r1``.

    Streamed index ``t`` (``0 <= t < t_len``) is visible to resident ``r`` iff
    ``r + OFF - LEFT <= t <= r + OFF + RIGHT`` (a side only when ``HAS_*``). Returns
    ``(start, full_lo, full_hi, end)``, all multiples of ``BLOCK`` except ``end``:
    blocks in ``[start, end)`` may hold visible pairs, every pair of the blocks in
    ``[full_lo, full_hi)`` is visible (no mask needed there), and
    ``start <= full_lo <= full_hi <= end``. An empty resident range gives empty ranges.
    """
    zero = r0 * 0
    last = r1 - 1
    # Smallest streamed index *any* resident sees, and the smallest *every* resident sees.
    if HAS_LEFT:
        any_lo = tl.maximum(r0 + OFF - LEFT, zero)
        all_lo = tl.maximum(last + OFF - LEFT, zero)
    else:
        any_lo = zero
        all_lo = zero
    # One past the largest streamed index any / every resident sees.
    if HAS_RIGHT:
        any_hi = tl.maximum(tl.minimum(last + OFF + RIGHT + 1, t_len), zero)
        all_hi = tl.maximum(tl.minimum(r0 + OFF + RIGHT + 1, t_len), zero)
    else:
        any_hi = zero + t_len
        all_hi = zero + t_len
    start = (any_lo // BLOCK) * BLOCK
    end = tl.maximum(any_hi, start)
    end = tl.where(r1 > r0, end, start)  # no resident index at all: nothing to visit
    full_lo = tl.minimum(tl.maximum(((all_lo + BLOCK - 1) // BLOCK) * BLOCK, start), end)
    full_hi = tl.minimum(tl.maximum((all_hi // BLOCK) * BLOCK, full_lo), end)
    return start, full_lo, full_hi, end


@triton.jit
def tile_and_head(L, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """Split the flat program id into (tile of a length-``L`` axis, batch*head).

    A 1-D grid of ``cdiv(L, BLOCK) * B * H`` programs has no limit on ``B * H`` (a grid's
    second dim stops at 65535). The tiles of one head are consecutive programs, so they
    share that head's keys and values in L2. With ``HEAVY_LAST`` (causal-like: later query
    tiles see more keys) the tiles run last-first, so the longest ones start first.
    """
    n_tiles = (L + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    tile = pid % n_tiles
    if HEAVY_LAST:
        tile = n_tiles - 1 - tile
    return tile, pid // n_tiles


@triton.jit
def visible(qi, kj, kv_len, OFF, LEFT, RIGHT,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool, broadcast of ``qi`` (query indices) and ``kj`` (key indices): True = visible."""
    ok = kj < kv_len
    d = kj - qi - OFF  # the key's distance from the query's aligned position
    if HAS_LEFT:
        ok = ok & (d >= -LEFT)
    if HAS_RIGHT:
        ok = ok & (d <= RIGHT)
    return ok


@triton.jit
def at_row(base, row, stride_r):
    """``base`` advanced to row ``row``, the offset computed in 64 bits.

    ``row * stride`` passes 2**31 for long sequences in strided layouts ((B, L, H, D) views
    with H * D = 4096 do at L = 512K; the weights' rows at Lq * Lk = 2**31), so whole-row
    offsets are never int32 products. Offsets *inside* a tile (``arange(BLOCK) * stride``)
    stay int32: they are below ``BLOCK * stride``.
    """
    return base + row.to(tl.int64) * stride_r


@triton.jit
def load_tile(base, rows, cols, stride_r, stride_c, n_rows,
              N_COLS: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load ``base[rows, cols]`` as a (len(rows), BLOCK_C) tile; 0 outside the tensor.

    ``base`` points at the tile's first row (:func:`at_row`) and ``rows`` counts from 0
    (``tl.arange``), so ``rows * stride_r`` is small. Columns past ``N_COLS`` (a head dim
    padded to a power of two) and, when ``CHECK_ROWS``, rows at or past ``n_rows`` (the
    rows left in the tensor from the tile's first row; may be <= 0) read as 0; nothing
    outside the tensor is touched.
    """
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK_ROWS:
        if N_COLS != BLOCK_C:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS),
                        other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if N_COLS != BLOCK_C:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(base, x, rows, cols, stride_r, stride_c, n_rows,
               N_COLS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store the tile ``x`` to ``base[rows, cols]`` for rows < n_rows and cols < N_COLS
    (``base`` at the tile's first row, ``rows`` from 0, as in :func:`load_tile`)."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if N_COLS != BLOCK_C:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))
    else:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)


@triton.jit
def load_lse(base, rows, n_rows):
    """The saved log2-sum-exp of ``rows``, as the backward and weights kernels need it.

    A row with no visible key stored ``-inf``; it reads as ``+inf`` here, and so does a row
    past ``n_rows``, so that ``exp2(s - lse)`` is exactly 0 for them (never ``inf``/NaN).
    """
    lse = tl.load(base + rows, mask=rows < n_rows, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


# ---- the Python side ----------------------------------------------------------------------
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; inside :func:`qkv.kernels.triton.offline.compiling`
    it compiles for that target instead (same arguments, so the same specialisation)."""
    recorder = offline.active()
    if recorder is None:
        kernel[grid](*args, **kwargs)
    else:
        recorder.compile(kernel, grid, args, kwargs)


def block_dim(d: int) -> int:
    """A head dim padded to what ``tl.dot`` takes: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(d))


def band_args(lq: int, lk: int, left: int | None, right: int | None) -> dict:
    """The band as kernel arguments: ``OFF``, ``LEFT``, ``RIGHT`` and the two flags.

    Window sides wider than ``Lq + Lk`` hide nothing; they are clamped so they fit int32.
    """
    reach = lq + lk + 1
    return dict(
        OFF=lk - lq,
        LEFT=0 if left is None else min(left, reach),
        RIGHT=0 if right is None else max(min(right, reach), -reach),
        HAS_LEFT=left is not None,
        HAS_RIGHT=right is not None,
    )
