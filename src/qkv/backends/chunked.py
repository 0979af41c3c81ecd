"""The chunked backend: exact attention in O(L) memory with the online softmax.

The reference materialises the ``(Lq x Lk)`` scores of every head. This backend never
does: it walks over blocks of queries and blocks of keys (FlashAttention-2's algorithm in
plain PyTorch operations, so it runs on any device) and keeps per query only

* ``row_max``: the largest score seen so far,
* ``row_sum``: the sum of ``exp(score - row_max)`` over the keys seen so far,
* ``acc``: the sum of ``exp(score - row_max) * value`` over the same keys.

When a new block raises a row's maximum, the earlier sums are rescaled by
``exp(old_max - new_max)``; after the last block ``out = acc / row_sum`` and the
log-sum-exp of the row is ``lse = row_max + log(row_sum)``. That is the softmax, exactly,
up to rounding. The backward (an :class:`torch.autograd.Function`) recomputes each block's
weights from ``q``, ``k`` and the saved ``lse`` (``weights = exp(score - lse)``), so only
``out`` and ``lse`` are kept between the passes.

Scores are computed in base 2: ``q`` is multiplied once by ``scale * log2(e)``, so a
block's weights are ``exp2(score2 - max2)``; ``exp2`` is about twice as fast as ``exp`` on
CPU and the result is the same softmax.

Masks. A :class:`~qkv.masks.Mask` hides keys from queries; a hidden position is *selected*
to ``-inf`` (``torch.where``), so NaN stored there does not leak. A block that the band
(causal/window) hides entirely is skipped without computing it, so causal attention costs
about half; a block the band leaves entirely visible and with no tensor mask is computed
with no mask at all. Tensor masks are sliced per block with :meth:`Mask.block`; size-1
(broadcast) dimensions stay size 1. A query that sees no key gets output 0, ``lse = -inf``
and zero gradients.

GQA: ``q (B, Hq, Lq, D)`` is viewed as ``(B, Hkv, G, Lq, D)``; the ``G`` query heads of a
key/value head are stacked along the rows of one matrix product with that head's keys, so
``k`` and ``v`` are never repeated. Low precision: float16/bfloat16 inputs are computed in
float32 (float64 inputs in float64) and the output is cast back.

Dropout is reproducible without storing a mask: the keep/drop decision for the weight of
query ``i`` on key ``j`` of batch row ``b`` and head ``h`` is a hash of ``(seed, b, h, i,
j)`` (:func:`dropout_keep`), so the backward regenerates exactly the forward's mask and the
mask does not depend on the block sizes. The seed is drawn once per call from the call's
generator (or torch's global RNG).

Building blocks (ring attention shards the keys over processes and builds on these):

* :func:`chunked_forward` ``(q, k, v, mask, scale) -> (out, lse)``: one partial attention,
  ``out`` in the compute dtype, ``lse (B, Hq, Lq)`` with ``-inf`` on rows that see no key;
* :func:`merge_partials` ``(out1, lse1, out2, lse2) -> (out, lse)``: the exact attention
  over the union of two disjoint key sets from the two partial attentions;
* :func:`chunked_backward` ``(q, k, v, dout, lse, delta, mask, scale) -> (dq, dk, dv)``:
  the gradients of the keys given, with ``lse`` and ``delta = (dout * out).sum(-1)`` of the
  *global* output, so partial gradients over key shards add up to the full gradient;
* :func:`chunked_attention`: the differentiable function that the backend runs.

Block sizes. :func:`plan_blocks` picks them per device and compute dtype so that one block
of scores stays small (:data:`BLOCK_ELEMENTS`; cache-sized on CPU; :data:`BLOCK_K` keys),
and splits the heads into groups when even the smallest query block would exceed it. Tests
and experiments override them with the :func:`block_sizes` context manager
(``with block_sizes(64, 128): ...``) or the ``block_q``/``block_k`` arguments.

CPU threads. The blocks of queries are spread over :data:`WORKERS` threads (default
``torch.get_num_threads()``), each running PyTorch operations single-threaded; the
caller's thread setting is restored afterwards. In the forward an idle thread takes the
next block (each block writes its own rows); in the backward the blocks are dealt
beforehand and the gradients of k and v are summed over the threads' shares in a fixed
order. So results never depend on thread timing.

``backend="auto"`` prefers this backend when the reference would need more than
:data:`REFERENCE_MEMORY_BUDGET` bytes (:func:`memory_reason`).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import BlockState, Mask
from .base import Backend, Call

__all__ = [
    "BLOCK_ELEMENTS",
    "BLOCK_K",
    "REFERENCE_MEMORY_BUDGET",
    "WORKERS",
    "ChunkedBackend",
    "Plan",
    "block_sizes",
    "chunked_attention",
    "chunked_backward",
    "chunked_forward",
    "chunked_weights",
    "draw_seed",
    "dropout_keep",
    "memory_reason",
    "merge_partials",
    "plan_blocks",
    "reference_memory",
    "sdpa_needs_dense_mask",
]

LOG2E = 1.0 / math.log(2.0)  # scores * LOG2E turn exp(x) into exp2(x * LOG2E)
LN2 = math.log(2.0)

#: ``backend="auto"`` puts ``chunked`` before ``reference`` (and before ``torch`` when SDPA
#: would need a dense mask) when the reference would need more bytes than this.
REFERENCE_MEMORY_BUDGET: int = 1 << 30

#: Most elements of one block of scores, ``heads x block_q x block_k``, per device type.
#: On CPU a block (2 MiB of float32) stays in cache between the matrix product that
#: writes it and the ones that read it; on GPUs larger blocks amortise kernel launches.
BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 19, "cuda": 1 << 24}
#: Keys per block, per device type (queries per block follow from BLOCK_ELEMENTS).
BLOCK_K: dict[str, int] = {"cpu": 256, "cuda": 1024}
_MIN_BLOCK_Q, _MAX_BLOCK_Q = 32, 1024

#: CPU threads a chunked call is split over (None: ``torch.get_num_threads()``). Each
#: thread runs its share of the blocks with single-threaded PyTorch operations: many small
#: multi-threaded operations would each end in a barrier that stalls whenever another
#: process holds one of the cores. Results do not depend on thread timing.
WORKERS: int | None = None

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


def plan_blocks(q: Tensor, k: Tensor, *, mask: Mask | None = None, block_q: int | None = None,
                block_k: int | None = None) -> Plan:
    """Block sizes for ``q (B, Hq, Lq, D)`` and ``k (B, Hkv, Lk, D)``.

    Explicit arguments win, then :func:`block_sizes`, then the device defaults: ``block_k``
    from :data:`BLOCK_K` and ``block_q`` as large as :data:`BLOCK_ELEMENTS` allows for all
    heads at once (a power of two from 32 to 1024; at most ``block_k`` when ``mask`` has a
    causal/window band, so that blocks on the diagonal waste little), halved while that
    leaves fewer than two blocks of queries per CPU thread. When even 32 rows of every head
    exceed the budget, the heads are processed in groups.
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
    if bk is None:
        bk = BLOCK_K[dev]
    bk = max(1, min(bk, lk))
    auto_q = bq is None
    if auto_q:
        rows = budget // max(1, b * hq * bk)
        bq = 1 << max(0, rows.bit_length() - 1)  # a power of two
        bq = min(max(bq, _MIN_BLOCK_Q), _MAX_BLOCK_Q)
        if mask is not None and mask.has_band:
            bq = min(bq, max(_MIN_BLOCK_Q, bk))
    bq = max(1, min(bq, lq))
    heads = max(1, min(hkv, budget // max(1, g * bq * bk)))
    if auto_q:
        groups = b * -(-hkv // heads) if heads < hkv else -(-b // max(1, heads // hkv))
        while bq > _MIN_BLOCK_Q and groups * -(-lq // bq) < 2 * _workers(q.device):
            bq //= 2
    return Plan(bq, bk, heads)


def _workers(device: torch.device) -> int:
    """Threads a call on ``device`` is split over: 1 off the CPU and inside a worker."""
    if device.type != "cpu" or getattr(_worker_state, "active", False):
        return 1
    return max(1, WORKERS if WORKERS is not None else torch.get_num_threads())


# ---- memory of the reference, for backend="auto" ----------------------------------------------
def reference_memory(call: Call) -> int:
    """Bytes the reference backend keeps alive for ``call``: its four ``(B, Hq, Lq, Lk)``
    steps (scores, scaled, masked, weights) in the compute dtype, plus the dense bool mask
    when there is one."""
    cells = call.batch * call.heads * call.lq * call.lk
    itemsize = torch.empty((), dtype=call.compute_dtype).element_size()
    return cells * (4 * itemsize + (0 if call.mask.is_empty else 1))


def memory_reason(call: Call) -> str | None:
    """Why ``auto`` should prefer ``chunked`` for ``call`` (None when it need not)."""
    need = reference_memory(call)
    if need <= REFERENCE_MEMORY_BUDGET:
        return None
    return (f"the reference would need {need / 2**30:.2f} GiB for the (Lq x Lk) steps, over "
            f"qkv.backends.chunked.REFERENCE_MEMORY_BUDGET = "
            f"{REFERENCE_MEMORY_BUDGET / 2**30:.2f} GiB; chunked needs O(Lq + Lk)")


def sdpa_needs_dense_mask(call: Call) -> bool:
    """True when the ``torch`` backend would pass SDPA an (Lq x Lk) mask for ``call`` (any
    mask other than none or square causal), so its memory grows with Lq * Lk too."""
    m = call.mask
    square_causal = m.causal and m.lq == m.lk and m.left is None and m.right == 0
    return not m.is_empty and not (square_causal and not m.has_tensor)


# ---- dropout that the backward can regenerate --------------------------------------------------
_U32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 is exact.
_MUL_A, _MUL_B = 0x2C1B3C6D, 0x297A2D39
_COL_SALT = 0x3C6EF372


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit hash of ``x`` (int64 holding values in [0, 2**32))."""
    x = ((x ^ (x >> 16)) * _MUL_A) & _U32
    x = ((x ^ (x >> 15)) * _MUL_B) & _U32
    return x ^ (x >> 16)


def dropout_keep(seed: int, bh: Tensor, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """Which weights survive dropout: bool ``(B, H, bq, bk)``, True = kept.

    ``bh (B, H, 1, 1)`` is the global index ``b * Hq + h`` of each (batch row, query head),
    ``rows (bq,)`` and ``cols (bk,)`` the global query and key positions. The decision for
    one (b, h, i, j) depends only on ``seed`` and those four numbers (not on blocking), and
    each weight is kept with probability ``1 - p`` (to within 2**-32).
    """
    s_lo, s_hi = seed & _U32, (seed >> 32) & _U32
    head = _mix32(_mix32(bh ^ s_lo) ^ s_hi)  # (B, H, 1, 1)
    row = _mix32(head ^ _mix32(rows & _U32)[:, None])  # (B, H, bq, 1)
    col = _mix32((cols + _COL_SALT) & _U32)  # (bk,)
    u = _mix32(row ^ col)  # (B, H, bq, bk) uniform on [0, 2**32)
    return u >= round(p * 2**32)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """One 63-bit seed from ``generator`` (or the global RNG of ``device``)."""
    if generator is not None:
        device = generator.device
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))


# ---- running shares of the work on CPU threads ---------------------------------------------------
_worker_state = threading.local()  # .active: this thread is running a share
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start afresh."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < size:
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="qkv-chunked")
        return _pool


def _run_shares(shares: list[list], work: Callable[[int, list], None]) -> None:
    """Run ``work(i, shares[i])`` for every share: share 0 on this thread, the others on
    pool threads, each with one intra-op thread; returns when all are done."""
    if len(shares) <= 1:
        for i, share in enumerate(shares):
            work(i, share)
        return

    inference = torch.is_inference_mode_enabled()  # grad modes are per thread: carry it

    def run(i: int) -> None:
        torch.set_num_threads(1)
        _worker_state.active = True
        try:
            # inference_mode(False) switches grad mode on, so no_grad goes inside it
            with torch.inference_mode(inference), torch.no_grad():
                work(i, shares[i])
        finally:
            _worker_state.active = False

    saved = torch.get_num_threads()
    pool = _get_pool(len(shares) - 1)
    futures = [pool.submit(run, i) for i in range(1, len(shares))]
    try:
        run(0)
    finally:
        wait(futures)
        torch.set_num_threads(saved)
    for f in futures:
        f.result()  # re-raise a worker's error


class _Queue:
    """Units handed to whichever thread asks first (a thread-safe iterator)."""

    def __init__(self, units: list):
        self._it = iter(units)
        self._lock = threading.Lock()

    def __iter__(self) -> _Queue:
        return self

    def __next__(self):
        with self._lock:
            return next(self._it)


def _split(units: list, costs: list[int], workers: int) -> list[list]:
    """Deal units to at most ``workers`` shares of about equal cost (largest first, each to
    the least loaded share), keeping each share in the original order. Deterministic."""
    workers = max(1, min(workers, len(units)))
    loads = [0] * workers
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: -costs[i]):
        w = loads.index(min(loads))
        owner[i] = w
        loads[w] += costs[i]
    return [[u for u, o in zip(units, owner, strict=True) if o == w] for w in range(workers)]


# ---- one block of scores ------------------------------------------------------------------------
class _Blocks:
    """What one call needs at every block: inputs in compute layout, masks, dropout.

    ``q2`` is ``q * scale * log2(e)`` viewed ``(B, Hkv, G, Lq, D)``; ``k2``/``v2`` are
    ``(B*Hkv, Lk, D|Dv)``. A *unit* of work is a head group ``grp = (b0, b1, h0, h1)``
    (batch rows and kv heads) with a block of queries ``q0:q1``; units write disjoint rows.
    """

    def __init__(self, q, k, v, mask: Mask, scale: float, plan: Plan, *, dropout: float,
                 seed: int | None, offsets: tuple[int, int]):
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        self.b, self.hq, self.hkv, self.g, self.lq, self.lk = b, hq, hkv, hq // hkv, lq, lk
        self.ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.device = q.device
        self.mask, self.plan = mask, plan
        if dropout > 0 and seed is None:
            raise ValueError("dropout > 0 needs a seed (an int) so the backward can regenerate "
                             "the mask; got seed=None. Fix: pass seed=draw_seed(generator, dev)")
        self.dropout, self.seed, self.offsets = dropout, seed, offsets
        self.q2 = (q.to(self.ct) * (scale * LOG2E)).reshape(b, hkv, self.g, lq, d)
        self.k2 = k.to(self.ct).reshape(b * hkv, lk, d)  # (B*Hkv, Lk, D)
        self.v2 = None if v is None else v.to(self.ct).reshape(b * hkv, lk, v.shape[-1])
        self.neg_inf = torch.full((), float("-inf"), dtype=self.ct, device=self.device)
        self.zero = torch.zeros((), dtype=self.ct, device=self.device)
        self._band_cache: dict[tuple[int, int, int], Tensor] = {}
        self._local = threading.local()  # scratch buffers, one set per thread

    # -- the work, cut into units and shares --
    def groups(self) -> Iterator[tuple[int, int, int, int]]:
        """Head groups as (batch rows b0:b1, kv heads h0:h1): whole batch rows at a time
        when all their heads fit, else one batch row and part of its heads."""
        step = self.plan.heads
        if step >= self.hkv:
            rows = max(1, step // self.hkv)
            for b0 in range(0, self.b, rows):
                yield b0, min(b0 + rows, self.b), 0, self.hkv
        else:
            for b0 in range(self.b):
                for h0 in range(0, self.hkv, step):
                    yield b0, b0 + 1, h0, min(h0 + step, self.hkv)

    def shares(self, *, fixed: bool) -> list:
        """Every unit (grp, q0, q1), for the CPU threads. ``fixed``: dealt beforehand by the
        keys each unit visits (results then do not depend on timing; the backward needs
        that); else one queue from which idle threads take the next unit, costliest first
        (units write disjoint rows, so the order does not matter)."""
        units, costs = [], []
        for grp in self.groups():
            heads = (grp[1] - grp[0]) * (grp[3] - grp[2])
            for q0 in range(0, self.lq, self.plan.block_q):
                q1 = min(q0 + self.plan.block_q, self.lq)
                units.append((grp, q0, q1))
                costs.append(heads * (q1 - q0) * sum(k1 - k0 for k0, k1, _ in
                                                     self.states(q0, q1)))
        workers = max(1, min(_workers(self.device), len(units)))
        if fixed:
            return _split(units, costs, workers)
        order = sorted(range(len(units)), key=lambda i: -costs[i])
        return [_Queue([units[i] for i in order])] * workers

    def states(self, q0: int, q1: int) -> Iterator[tuple[int, int, BlockState]]:
        """Key blocks (k0, k1, state) for queries q0:q1, skipping the band's HIDDEN ones."""
        for k0 in range(0, self.lk, self.plan.block_k):
            k1 = min(k0 + self.plan.block_k, self.lk)
            state = self.mask.band_block_state(q0, q1, k0, k1)
            if state is not BlockState.HIDDEN:
                yield k0, k1, state

    # -- slicing --
    def buffer(self, name: str, n: int, rows: int, cols: int) -> Tensor:
        """A contiguous (n, rows, cols) scratch tensor in the compute dtype, reused."""
        bufs = self._local.__dict__.setdefault("bufs", {})
        size = n * rows * cols
        buf = bufs.get(name)
        if buf is None or buf.numel() < size:
            buf = bufs[name] = torch.empty(size, dtype=self.ct, device=self.device)
        return buf[:size].view(n, rows, cols)

    def q_rows(self, t: Tensor, grp, q0: int, q1: int) -> Tensor:
        """Rows q0:q1 of a (B, Hkv, G, Lq, X) tensor for the group: (n, G*bq, X)."""
        b0, b1, h0, h1 = grp
        n = (b1 - b0) * (h1 - h0)
        return t[b0:b1, h0:h1, :, q0:q1].reshape(n, self.g * (q1 - q0), t.shape[-1])

    def kv_rows(self, t: Tensor, grp, k0: int, k1: int) -> Tensor:
        """Keys k0:k1 of a (B*Hkv, Lk, X) tensor for the group: (n, bk, X)."""
        b0, b1, h0, h1 = grp
        # A view (never a copy): the backward accumulates gradients into it in place.
        return t.view(self.b, self.hkv, *t.shape[1:])[b0:b1, h0:h1, k0:k1].view(
            (b1 - b0) * (h1 - h0), k1 - k0, t.shape[-1])

    def heads_view(self, s: Tensor, grp, rows: int) -> Tensor:
        """(n, G*bq, X) viewed as (b, Hq', bq, X), the layout of the masks."""
        b0, b1, h0, h1 = grp
        return s.view(b1 - b0, (h1 - h0) * self.g, rows, s.shape[-1])

    # -- one block --
    def scores(self, qb: Tensor, grp, q0: int, q1: int, k0: int, k1: int,
               state: BlockState) -> Tensor:
        """Base-2 masked scores of the block: ``(n, G*bq, bk)``, ``-inf`` where hidden.

        ``qb (n, G*bq, D)`` holds the group's queries q0:q1 times ``scale * log2(e)``. The
        result lives in this thread's scratch buffer "s" until the next call.
        """
        kb = self.kv_rows(self.k2, grp, k0, k1)  # (n, bk, D)
        s = self.buffer("s", qb.shape[0], qb.shape[1], k1 - k0)  # (n, G*bq, bk)
        torch.bmm(qb, kb.transpose(1, 2), out=s)
        allowed, bias = self.block_mask(grp, q0, q1, k0, k1, state)
        if allowed is not None or bias is not None:
            s4 = self.heads_view(s, grp, q1 - q0)  # (b, Hq', bq, bk)
            if bias is not None:
                s4.add_(bias, alpha=LOG2E)
            if allowed is not None:  # select, never multiply: NaN there cannot leak
                torch.where(allowed, s4, self.neg_inf, out=s4)
        return s

    def block_mask(self, grp, q0, q1, k0, k1, state) -> tuple[Tensor | None, Tensor | None]:
        """(allowed, bias) of the block for the group's batch rows and heads; None, None
        when the block needs no mask at all."""
        m = self.mask
        if not m.has_tensor:
            if state is BlockState.VISIBLE:
                return None, None
            # The band alone depends only on where the block sits relative to the diagonal.
            key = (q0 + m.offset - k0, q1 - q0, k1 - k0)
            band = self._band_cache.get(key)
            if band is None:
                band = m.band(q0, q1, k0, k1, self.device)[None, None]  # (1, 1, bq, bk)
                self._band_cache[key] = band
            return band, None
        allowed, bias = m.block(q0, q1, k0, k1, self.device)
        b0, b1, h0, h1 = grp
        hs = slice(h0 * self.g, h1 * self.g)
        allowed = None if allowed is None else _slice_heads(allowed, slice(b0, b1), hs)
        bias = None if bias is None else _slice_heads(bias, slice(b0, b1), hs)
        return allowed, bias

    def keep(self, grp, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """Dropout's keep mask of the block, bool (b, Hq', bq, bk)."""
        b0, b1, h0, h1 = grp
        dev = self.device
        bidx = torch.arange(b0, b1, device=dev)[:, None]
        hidx = torch.arange(h0 * self.g, h1 * self.g, device=dev)[None, :]
        bh = (bidx * self.hq + hidx)[:, :, None, None]  # (b, Hq', 1, 1)
        qo, ko = self.offsets
        rows = torch.arange(q0 + qo, q1 + qo, device=dev)
        cols = torch.arange(k0 + ko, k1 + ko, device=dev)
        return dropout_keep(self.seed, bh, rows, cols, self.dropout)

    def drop_(self, p: Tensor, grp, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """Apply dropout to a block ``(n, G*bq, bk)`` in place: dropped = 0, kept / (1-p)."""
        p4 = self.heads_view(p, grp, q1 - q0)  # (b, Hq', bq, bk)
        torch.where(self.keep(grp, q0, q1, k0, k1), p4, self.zero, out=p4)
        return p.mul_(1.0 / (1.0 - self.dropout))


def _slice_heads(t: Tensor, bs: slice, hs: slice) -> Tensor:
    """Slice the batch and head dims of a broadcastable 4-D mask, leaving size-1 dims."""
    return t[bs if t.shape[0] > 1 else slice(None), hs if t.shape[1] > 1 else slice(None)]


def _check_qkv(q: Tensor, k: Tensor, v: Tensor | None, mask: Mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or (v is not None and v.dim() != 4):
        raise ValueError(f"expected q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{None if v is None else tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or (mask.lq, mask.lk) != (q.shape[2], k.shape[2]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match each other "
                         f"or the mask (Lq={mask.lq}, Lk={mask.lk}); Hq must be a multiple "
                         "of Hkv")


def _lse2(lse: Tensor) -> Tensor:
    """Base-2 lse for recomputing weights: rows that see no key get +inf, so that
    ``exp2(-inf - lse2) = 0`` there instead of NaN."""
    return (lse * LOG2E).masked_fill(lse == float("-inf"), float("inf"))


# ---- forward -------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_forward(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, *,
                    dropout: float = 0.0, seed: int | None = None, block_q: int | None = None,
                    block_k: int | None = None,
                    offsets: tuple[int, int] = (0, 0)) -> tuple[Tensor, Tensor]:
    """Attention of q over the keys given, by blocks: ``(out, lse)``.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``.
        mask: the :class:`~qkv.masks.Mask` of these queries and keys (``Mask(Lq, Lk)`` for
            none); ``allowed`` False / ``bias`` ``-inf`` / outside the band = hidden.
        scale: multiplies ``q @ k^T``.
        dropout: probability of dropping each weight (survivors scaled by ``1/(1-p)``);
            needs ``seed``. offsets: global positions of ``q[..., 0, :]`` and
            ``k[..., 0, :]``, used only to place the dropout pattern (so shards of one
            sequence draw the same mask as the whole would).
        block_q, block_k: block sizes (default: :func:`plan_blocks`).

    Returns:
        ``out (B, Hq, Lq, Dv)`` in the compute dtype (float32; float64 for float64 inputs)
        and ``lse (B, Hq, Lq)``, the natural log of each row's sum of ``exp(scores)`` over
        its visible keys (``-inf`` where it sees none, and then ``out`` is 0).

    Keys hidden from every query should hold finite values (``qkv.attention`` zeroes
    them): as in the reference, their values meet a weight of exactly 0.
    """
    _check_qkv(q, k, v, mask)
    plan = plan_blocks(q, k, mask=mask, block_q=block_q, block_k=block_k)
    bl = _Blocks(q, k, v, mask, scale, plan, dropout=dropout, seed=seed, offsets=offsets)
    dv = v.shape[-1]
    out = torch.empty(bl.b, bl.hkv, bl.g, bl.lq, dv, dtype=bl.ct, device=q.device)
    lse = torch.empty(bl.b, bl.hkv, bl.g, bl.lq, dtype=bl.ct, device=q.device)

    def work(_: int, share: list) -> None:
        for grp, q0, q1 in share:
            b0, b1, h0, h1 = grp
            o, l2 = _forward_rows(bl, grp, q0, q1)  # (n, G*bq, Dv), (n, G*bq, 1)
            rows = (b1 - b0, h1 - h0, bl.g, q1 - q0)
            out[b0:b1, h0:h1, :, q0:q1] = o.view(*rows, dv)
            lse[b0:b1, h0:h1, :, q0:q1] = l2.view(rows) * LN2

    _run_shares(bl.shares(fixed=False), work)
    return out.view(bl.b, bl.hq, bl.lq, dv), lse.view(bl.b, bl.hq, bl.lq)


def _forward_rows(bl: _Blocks, grp, q0: int, q1: int) -> tuple[Tensor, Tensor]:
    """The online softmax over every key block for queries q0:q1 of one head group.

    Returns the normalised output ``(n, G*bq, Dv)`` and the base-2 log-sum-exp
    ``(n, G*bq, 1)``.
    """
    qb = bl.q_rows(bl.q2, grp, q0, q1)  # (n, G*bq, D)
    n, rows = qb.shape[0], qb.shape[1]
    dv = bl.v2.shape[-1]
    row_max = torch.full((n, rows, 1), float("-inf"), dtype=bl.ct, device=bl.device)
    row_sum = torch.zeros((n, rows, 1), dtype=bl.ct, device=bl.device)
    acc = torch.zeros((n, rows, dv), dtype=bl.ct, device=bl.device)  # (n, G*bq, Dv)
    first = True
    for k0, k1, state in bl.states(q0, q1):
        s = bl.scores(qb, grp, q0, q1, k0, k1, state)  # (n, G*bq, bk) base 2, -inf = hidden
        new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))  # (n, G*bq, 1)
        # Rows that have seen no visible key yet keep max -inf: shift them by 0 instead.
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        p = s.sub_(shift).exp2_()  # (n, G*bq, bk) unnormalised weights, 0 where hidden
        if first:
            torch.sum(p, dim=-1, keepdim=True, out=row_sum)
        else:
            rescale = (row_max - shift).exp2_()  # (n, G*bq, 1); exp2(-inf) = 0
            row_sum.mul_(rescale).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(rescale)
        if bl.dropout > 0:  # the sum above normalises; the values get the dropped weights
            bl.drop_(p, grp, q0, q1, k0, k1)
        vb = bl.kv_rows(bl.v2, grp, k0, k1)  # (n, bk, Dv)
        if first:
            torch.bmm(p, vb, out=acc)
        else:
            acc.baddbmm_(p, vb)
        row_max = new_max
        first = False
    seen = row_sum > 0  # (n, G*bq, 1); False: the row saw no key
    out = torch.where(seen, acc / torch.where(seen, row_sum, 1.0), 0.0)  # (n, G*bq, Dv)
    lse2 = torch.where(seen, row_max + torch.log2(row_sum), float("-inf"))  # (n, G*bq, 1)
    return out, lse2


# ---- weights -------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_weights(q: Tensor, k: Tensor, mask: Mask, scale: float, lse: Tensor, *,
                    out: Tensor, dropout: float = 0.0, seed: int | None = None,
                    block_q: int | None = None, block_k: int | None = None,
                    offsets: tuple[int, int] = (0, 0)) -> Tensor:
    """Write the exact attention weights ``exp(scores - lse)`` into ``out (B, Hq, Lq, Lk)``.

    ``lse (B, Hq, Lq)`` comes from :func:`chunked_forward` on the same inputs. Blocks are
    computed one at a time straight into ``out`` (a contiguous tensor of any float dtype):
    hidden entries are 0, and with ``dropout`` the weights are the ones applied to the
    values (dropped = 0, kept scaled by ``1/(1-p)``). Returns ``out``.
    """
    _check_qkv(q, k, None, mask)
    plan = plan_blocks(q, k, mask=mask, block_q=block_q, block_k=block_k)
    bl = _Blocks(q, k, None, mask, scale, plan, dropout=dropout, seed=seed, offsets=offsets)
    lse5 = _lse2(lse).view(bl.b, bl.hkv, bl.g, bl.lq, 1)
    out.zero_()  # blocks the band hides stay 0
    out5 = out.view(bl.b, bl.hkv, bl.g, bl.lq, bl.lk)

    def work(_: int, share: list) -> None:
        for grp, q0, q1 in share:
            b0, b1, h0, h1 = grp
            qb = bl.q_rows(bl.q2, grp, q0, q1)  # (n, G*bq, D)
            lb = bl.q_rows(lse5, grp, q0, q1)  # (n, G*bq, 1)
            for k0, k1, state in bl.states(q0, q1):
                p = bl.scores(qb, grp, q0, q1, k0, k1, state).sub_(lb).exp2_()  # (n, G*bq, bk)
                if bl.dropout > 0:
                    bl.drop_(p, grp, q0, q1, k0, k1)
                dst = out5[b0:b1, h0:h1, :, q0:q1, k0:k1]  # (b, Hkv', G, bq, bk)
                dst.copy_(p.view(dst.shape))

    _run_shares(bl.shares(fixed=False), work)
    return out


# ---- backward ------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor,
                     mask: Mask, scale: float, *, dropout: float = 0.0, seed: int | None = None,
                     block_q: int | None = None, block_k: int | None = None,
                     offsets: tuple[int, int] = (0, 0), dweights: Tensor | None = None,
                     dbias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention with respect to q, k and v, block by block (FlashAttention-2).

    Args:
        q, k, v, mask, scale, dropout, seed, offsets: as in :func:`chunked_forward`.
        dout: ``(B, Hq, Lq, Dv)``, the gradient of the output (any strides).
        lse: ``(B, Hq, Lq)``, the log-sum-exp of each row over *all* its keys (for ring
            attention, the merged lse, not the shard's).
        delta: ``(B, Hq, Lq)``, ``(dout * out).sum(-1)`` with the *full* output ``out``
            (plus ``(dweights * weights).sum(-1)`` when ``dweights`` is given).
        dweights: optional ``(B, Hq, Lq, Lk)`` gradient of the returned weights.
        dbias: optional tensor shaped like ``mask.bias`` (compute dtype) into which the
            gradient of the additive mask is *added*.

    Returns:
        ``dq (B, Hq, Lq, D)``, ``dk (B, Hkv, Lk, D)``, ``dv (B, Hkv, Lk, Dv)`` in the compute
        dtype. With each block's weights ``P = exp(scores - lse)`` recomputed (``Pd`` with
        dropout applied): ``dv = Pd^T dout``, ``dP = dout v^T`` (dropout applied),
        ``dS = P * (dP - delta)``, ``dq = scale dS k``, ``dk = scale dS^T q``.
    """
    _check_qkv(q, k, v, mask)
    plan = plan_blocks(q, k, mask=mask, block_q=block_q, block_k=block_k)
    bl = _Blocks(q, k, v, mask, scale, plan, dropout=dropout, seed=seed, offsets=offsets)
    b, hkv, g, lq, lk = bl.b, bl.hkv, bl.g, bl.lq, bl.lk
    d, dv_ = q.shape[-1], v.shape[-1]
    rows = {
        "do": dout.to(bl.ct).reshape(b, hkv, g, lq, dv_),  # (B, Hkv, G, Lq, Dv)
        "lse": _lse2(lse).reshape(b, hkv, g, lq, 1),  # (B, Hkv, G, Lq, 1)
        "delta": delta.to(bl.ct).reshape(b, hkv, g, lq, 1),  # (B, Hkv, G, Lq, 1)
    }
    dw5 = None if dweights is None else dweights.reshape(b, hkv, g, lq, lk)
    dq = torch.zeros(b, hkv, g, lq, d, dtype=bl.ct, device=q.device)  # (B, Hkv, G, Lq, D)
    shares = bl.shares(fixed=True)
    # dk, dv (and dbias) gather contributions from every query block: one private
    # accumulator per share, summed in a fixed order afterwards.
    dks = [torch.zeros(b * hkv, lk, d, dtype=bl.ct, device=q.device) for _ in shares]
    dvs = [torch.zeros(b * hkv, lk, dv_, dtype=bl.ct, device=q.device) for _ in shares]
    dbs = [dbias] + [torch.zeros_like(dbias) for _ in shares[1:]] if dbias is not None else None

    def work(i: int, share: list) -> None:
        for grp, q0, q1 in share:
            dqb = _backward_rows(bl, grp, q0, q1, rows, dw5, dks[i], dvs[i],
                                 None if dbs is None else dbs[i])
            if dqb is not None:
                b0, b1, h0, h1 = grp
                dq[b0:b1, h0:h1, :, q0:q1] = dqb.view(b1 - b0, h1 - h0, g, q1 - q0, d)

    _run_shares(shares, work)
    dk = dks[0] if dks else torch.zeros(b * hkv, lk, d, dtype=bl.ct, device=q.device)
    dv = dvs[0] if dvs else torch.zeros(b * hkv, lk, dv_, dtype=bl.ct, device=q.device)
    for i in range(1, len(shares)):
        dk.add_(dks[i])
        dv.add_(dvs[i])
        if dbs is not None:
            dbias.add_(dbs[i])
    dq.mul_(scale)
    dk.mul_(1.0 / LOG2E)  # q2 carried scale * log2(e); dk = scale * dS^T q
    return dq.view(b, bl.hq, lq, d), dk.view(b, hkv, lk, d), dv.view(b, hkv, lk, dv_)


def _backward_rows(bl: _Blocks, grp, q0: int, q1: int, rows: dict[str, Tensor],
                   dw5: Tensor | None, dk: Tensor, dv: Tensor,
                   dbias: Tensor | None) -> Tensor | None:
    """Gradients from queries q0:q1 of one head group: adds into ``dk``, ``dv`` (and
    ``dbias``), returns this block's unscaled ``dq (n, G*bq, D)`` (None: it sees no key)."""
    b0, b1, h0, h1 = grp
    qb = bl.q_rows(bl.q2, grp, q0, q1)  # (n, G*bq, D), q * scale * log2(e)
    dob = bl.q_rows(rows["do"], grp, q0, q1)  # (n, G*bq, Dv)
    lb = bl.q_rows(rows["lse"], grp, q0, q1)  # (n, G*bq, 1)
    db = bl.q_rows(rows["delta"], grp, q0, q1)  # (n, G*bq, 1)
    dqb = None
    for k0, k1, state in bl.states(q0, q1):
        kb = bl.kv_rows(bl.k2, grp, k0, k1)  # (n, bk, D)
        vb = bl.kv_rows(bl.v2, grp, k0, k1)  # (n, bk, Dv)
        p = bl.scores(qb, grp, q0, q1, k0, k1, state).sub_(lb).exp2_()  # (n, G*bq, bk)
        dp = bl.buffer("dp", *p.shape)  # (n, G*bq, bk)
        torch.bmm(dob, vb.transpose(1, 2), out=dp)  # gradient of the applied weights
        if dw5 is not None:
            dwb = dw5[b0:b1, h0:h1, :, q0:q1, k0:k1]  # (b, Hkv', G, bq, bk)
            dp.view(dwb.shape).add_(dwb)
        if bl.dropout > 0:
            pd = bl.buffer("pd", *p.shape)
            bl.drop_(pd.copy_(p), grp, q0, q1, k0, k1)  # the weights applied to the values
            bl.drop_(dp, grp, q0, q1, k0, k1)  # back through the same dropout
        else:
            pd = p
        bl.kv_rows(dv, grp, k0, k1).baddbmm_(pd.transpose(1, 2), dob)
        ds = dp.sub_(db).mul_(p)  # (n, G*bq, bk) gradient of the (masked) scaled scores
        if dbias is not None:
            _add_bias_grad(dbias, bl.heads_view(ds, grp, q1 - q0), grp, bl.g, q0, q1, k0, k1)
        if dqb is None:
            dqb = torch.bmm(ds, kb)  # (n, G*bq, D)
        else:
            dqb.baddbmm_(ds, kb)
        bl.kv_rows(dk, grp, k0, k1).baddbmm_(ds.transpose(1, 2), qb)
    return dqb


def _add_bias_grad(dbias: Tensor, ds4: Tensor, grp, g: int, q0, q1, k0, k1) -> None:
    """Add the block's ``dS (b, Hq', bq, bk)`` into the broadcast ``dbias`` it came from."""
    b0, b1, h0, h1 = grp
    idx = (slice(b0, b1), slice(h0 * g, h1 * g), slice(q0, q1), slice(k0, k1))
    dims = [i for i in range(4) if dbias.shape[i] == 1 and ds4.shape[i] != 1]
    src = ds4.sum(dim=dims, keepdim=True) if dims else ds4
    dst = dbias[tuple(slice(None) if dbias.shape[i] == 1 else idx[i] for i in range(4))]
    dst.add_(src)


# ---- merging partial attentions (ring attention) -------------------------------------------------
def merge_partials(out1: Tensor, lse1: Tensor, out2: Tensor,
                   lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    ``out1/out2 (B, Hq, Lq, Dv)`` and ``lse1/lse2 (B, Hq, Lq)`` come from
    :func:`chunked_forward` on each key set. The union's weights are each part's weights
    times ``exp(lse_part - lse)`` with ``lse = log(exp(lse1) + exp(lse2))``, so
    ``out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2``, exactly. A part whose row saw no
    key (``lse = -inf``) contributes nothing (its ``out`` is never read); a row that saw no
    key in either part gets ``out = 0``, ``lse = -inf``.
    """
    m = torch.maximum(lse1, lse2)  # (B, Hq, Lq)
    m = m.masked_fill(m == float("-inf"), 0.0)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # (B, Hq, Lq), 0 for an empty part
    total = w1 + w2
    lse = m + torch.log(total)  # -inf when both parts are empty
    safe = torch.where(total > 0, total, 1.0)
    a1 = (w1 / safe).unsqueeze(-1)  # (B, Hq, Lq, 1)
    a2 = (w2 / safe).unsqueeze(-1)
    out = (torch.where(a1 > 0, a1 * out1, 0.0) + torch.where(a2 > 0, a2 * out2, 0.0))
    return out, lse


# ---- autograd ------------------------------------------------------------------------------------
class _ChunkedAttention(torch.autograd.Function):
    """out (and weights) of chunked attention; the backward recomputes the blocks."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, dropout, seed, return_weights, blocks):
        opts = {"dropout": dropout, "seed": seed, "block_q": blocks[0], "block_k": blocks[1]}
        out, lse = chunked_forward(q, k, v, mask, scale, **opts)
        out = out.to(q.dtype)  # (B, Hq, Lq, Dv)
        weights = None
        if return_weights:
            b, hq, lq, _ = q.shape
            weights = torch.empty(b, hq, lq, k.shape[2], dtype=q.dtype, device=q.device)
            chunked_weights(q, k, mask, scale, lse, out=weights, **opts)
        ctx.save_for_backward(q, k, v, out, lse, weights)
        ctx.mask, ctx.scale, ctx.opts, ctx.bias = mask, scale, opts, bias
        ctx.set_materialize_grads(False)
        return (out, weights) if return_weights else out

    @staticmethod
    def backward(ctx, dout, dweights=None):
        q, k, v, out, lse, weights = ctx.saved_tensors
        ct = lse.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout.to(ct) * out.to(ct)).sum(dim=-1)  # (B, Hq, Lq)
        if dweights is not None:
            delta += _row_dot(dweights, weights, ct)
        dbias = None
        if ctx.bias is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(ctx.bias.shape, dtype=ct, device=q.device)
        dq, dk, dv = chunked_backward(q, k, v, dout, lse, delta, ctx.mask, ctx.scale,
                                      dweights=dweights, dbias=dbias, **ctx.opts)
        if dbias is not None:
            dbias = dbias.to(ctx.bias.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias,
                None, None, None, None, None, None)


def _row_dot(a: Tensor, b: Tensor, ct: torch.dtype, rows: int = 1024) -> Tensor:
    """``(a * b).sum(-1)`` of two (B, H, Lq, Lk) tensors, ``rows`` queries at a time."""
    out = torch.empty(a.shape[:-1], dtype=ct, device=a.device)  # (B, H, Lq)
    for r0 in range(0, a.shape[2], rows):
        sl = slice(r0, r0 + rows)
        out[:, :, sl] = (a[:, :, sl].to(ct) * b[:, :, sl].to(ct)).sum(dim=-1)
    return out


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, *,
                      dropout: float = 0.0, seed: int | None = None,
                      return_weights: bool = False, block_q: int | None = None,
                      block_k: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Differentiable chunked attention in the input dtype (what the backend runs).

    Shapes as in :func:`chunked_forward`; returns ``out (B, Hq, Lq, Dv)``, or ``(out,
    weights (B, Hq, Lq, Lk))``. Gradients flow to q, k, v, the additive mask
    (``mask.bias``) and the returned weights. The same ``seed`` gives the same dropout
    mask in every call and in the backward.
    """
    return _ChunkedAttention.apply(q, k, v, mask.bias, mask, float(scale), float(dropout),
                                   seed, bool(return_weights), (block_q, block_k))


class ChunkedBackend(Backend):
    """``backend="chunked"``: every option of the reference in O(Lq + Lk) memory."""

    name = "chunked"

    def run(self, call: Call) -> tuple[Tensor, Tensor | None]:
        seed = draw_seed(call.generator, call.q.device) if call.dropout > 0 else None
        res = chunked_attention(call.q, call.k, call.v, call.mask, call.scale,
                                dropout=call.dropout, seed=seed,
                                return_weights=call.return_weights)
        return res if call.return_weights else (res, None)
