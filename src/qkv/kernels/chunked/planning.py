"""Block planning of the chunked backend: how one call is cut into blocks of queries and keys.

:func:`plan_blocks` picks the block sizes per device and compute dtype so that one block of
scores stays small (:data:`BLOCK_ELEMENTS`, cache-sized on CPU; :data:`BLOCK_K` keys) and
splits the heads into groups when even the smallest query block would exceed it;
:func:`block_sizes` overrides the choice for tests and experiments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ...masks import Mask
from .threads import workers

__all__ = ["BAND_BLOCK_K", "BAND_ROWS", "BLOCK_ELEMENTS", "BLOCK_K", "Plan", "block_sizes",
           "plan_blocks"]

#: Most elements of one block of scores, ``heads x block_q x block_k``, per device type.
#: On CPU a block (1 MiB of float32) stays in a core's L2 cache between the matrix product
#: that writes it and the passes that read it (at 2 MiB those passes ran 2-3x slower per
#: element); on GPUs larger blocks amortise kernel launches.
BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 18, "cuda": 1 << 24}
#: Keys per block, per device type (queries per block follow from BLOCK_ELEMENTS).
BLOCK_K: dict[str, int] = {"cpu": 512, "cuda": 1024}
#: Rows per tile on blocks that the band (causal/window) cuts, per device type (0: never
#: split). On CPU each key block on the diagonal is cut into tiles of 256 rows, each
#: trimmed to the keys its rows can see, so the hidden part is mostly skipped and the band
#: is applied only near the diagonal. Tiles of 128 rows skip more but cost as much in all
#: (smaller products, more operations) at one thread and more at two, where threads wait
#: for each other between operations. On GPUs more, smaller operations cost more
#: launches than the skipped work saves.
BAND_ROWS: dict[str, int] = {"cpu": 256, "cuda": 0}
#: Keys per block, per device type, where row tiles apply (a band, one query head per kv
#: head); queries per block follow from BLOCK_ELEMENTS (1024 on CPU). A unit of 1024
#: queries then meets the diagonal as 256 x 256 tiles with the band and, below each, one
#: visible tile: close to the band's own shape, and larger products than 512 x 512
#: blocks cut in two (causal L=4096, 1 thread: 1.22-1.24x SDPA instead of 1.24-1.27x).
BAND_BLOCK_K: dict[str, int] = {"cpu": 256}
_MIN_BLOCK_Q, _MAX_BLOCK_Q = 32, 1024

#: CPU threads a chunked call is split over (None: ``torch.get_num_threads()``). Each
#: thread runs its share of the blocks with single-threaded PyTorch operations: many small
#: multi-threaded operations would each end in a barrier that stalls whenever another

_override: tuple[int | None, int | None] = (None, None)


@contextlib.contextmanager
def block_sizes(block_q: int | None = None, block_k: int | None = None) -> Iterator[None]:
    """Force the query/key block sizes of every chunked call inside the ``with`` block.

    ``None`` keeps the automatic choice for that side. For tests and experiments: the
    result is the same (up to rounding) for every block size.
    """
    global _override
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"{name} must be a positive int or None; got {b!r}")
    saved = _override
    _override = (block_q, block_k)
    try:
        yield
    finally:
        _override = saved


@dataclass(frozen=True)
class Plan:
    """How one call is cut: ``block_q`` x ``block_k`` blocks, ``heads`` kv heads at a time."""

    block_q: int
    block_k: int
    heads: int  # key/value heads (each with its G query heads) computed together
    band_rows: int = 0  # rows per tile on blocks the band cuts (0: whole blocks)


def plan_blocks(q: Tensor, k: Tensor, *, mask: Mask | None = None, block_q: int | None = None,
                block_k: int | None = None) -> Plan:
    """Block sizes for ``q (B, Hq, Lq, D)`` and ``k (B, Hkv, Lk, D)``.

    Explicit arguments win, then :func:`block_sizes`, then the device defaults: ``block_k``
    from :data:`BLOCK_K` (:data:`BAND_BLOCK_K` where a causal/window band is cut into row
    tiles: G = 1 and :data:`BAND_ROWS` set) and ``block_q`` as large as
    :data:`BLOCK_ELEMENTS` allows for one key/value head with its G query heads (a power
    of two from 32 to 1024; at most ``block_k`` for a band without row tiles, so that
    blocks on the diagonal waste little), halved while that leaves fewer than two blocks
    of queries per CPU thread. Tall one-head blocks keep the matrix products at their best
    speed on CPU; as many heads as still fit the budget share a block (short sequences:
    fewer, larger operations).
    """
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device.type if q.device.type in BLOCK_ELEMENTS else "cuda"
    budget = BLOCK_ELEMENTS[dev]
    if q.dtype == torch.float64:
        budget //= 2  # the same bytes per block
    bq = block_q if block_q is not None else _override[0]
    bk = block_k if block_k is not None else _override[1]
    band_rows = BAND_ROWS.get(dev, 0) if mask is not None and mask.has_band else 0
    row_tiles = band_rows > 0 and g == 1 and dev in BAND_BLOCK_K
    if bk is None:
        bk = BAND_BLOCK_K[dev] if row_tiles else BLOCK_K[dev]
    bk = max(1, min(bk, lk))
    auto_q = bq is None
    if auto_q:
        # One kv head's G query heads first: tall blocks of one head keep the matrix
        # products efficient; several heads share a block only when one head's rows fit.
        rows = budget // max(1, g * bk)
        bq = 1 << max(0, rows.bit_length() - 1)  # a power of two
        bq = min(max(bq, _MIN_BLOCK_Q), _MAX_BLOCK_Q)
        if mask is not None and mask.has_band and not row_tiles:
            bq = min(bq, max(_MIN_BLOCK_Q, bk))  # a block on the diagonal computed whole
    bq = max(1, min(bq, lq))
    heads = max(1, min(hkv, budget // max(1, g * bq * bk)))
    if auto_q:
        groups = b * -(-hkv // heads) if heads < hkv else -(-b // max(1, heads // hkv))
        while bq > _MIN_BLOCK_Q and groups * -(-lq // bq) < 2 * workers(q.device):
            bq //= 2
    return Plan(bq, bk, heads, band_rows)
