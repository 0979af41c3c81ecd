"""One block of scores: what a chunked call needs at every (query block, key block) pair.

:class:`Blocks` holds the inputs in compute layout (``q`` pre-multiplied by ``scale``),
cuts the work into units and shares for the CPU
threads, slices masks per block and applies dropout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ...masks import BlockState, Mask
from .dropout import dropout_keep
from .planning import Plan
from .threads import Queue, split, workers

LOG2E = 1.0 / math.log(2.0)  # exp(x) = exp2(x * LOG2E)
_ALIGN = 16  # keys: the band's edges in a tile are widened to multiples of this
#: Fixed shifts (:meth:`Blocks.prepare_fixed_shifts`): scores are exponentiated unshifted
#: when none can exceed UNSHIFTED in absolute value; a row's fixed shift stays at most SPAN
#: above its largest score, so its largest weight is at least exp(-SPAN).
SPAN, UNSHIFTED = 40.0, 40.0


class Blocks:
    """What one call needs at every block: inputs in compute layout, masks, dropout.

    ``q5`` is ``q`` viewed ``(B, Hkv, G, Lq, D)`` (:meth:`q_scaled` gives its rows times
    ``scale`` in the compute dtype); ``k2``/``v2`` are
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
        # q is scaled block by block (q_scaled), in cache, not as a whole new tensor.
        self.q5, self.scale = q.reshape(b, hkv, self.g, lq, d), scale  # (B, Hkv, G, Lq, D)
        self.k2 = k.to(self.ct).reshape(b * hkv, lk, d)  # (B*Hkv, Lk, D)
        self.v2 = None if v is None else v.to(self.ct).reshape(b * hkv, lk, v.shape[-1])
        self.neg_inf = torch.full((), float("-inf"), dtype=self.ct, device=self.device)
        self.zero = torch.zeros((), dtype=self.ct, device=self.device)
        self.one = torch.ones((), dtype=self.ct, device=self.device)
        self.log2e = torch.full((), LOG2E, dtype=self.ct, device=self.device)
        self._band_cache: dict[tuple[int, int, int], Tensor] = {}  # (1, 1, bq, bk) each
        self._edge_cache: dict[tuple[int, int, int], Tensor] = {}  # (r, e) bias each
        self._views: dict[tuple, object] = {}  # kv_rows and kT views, per call
        self._tiles: dict[tuple[int, int], list] = {}  # unit_tiles, per call
        self.has_tensor_mask = mask.has_tensor
        self._local = threading.local()  # scratch buffers, one set per thread
        self.bound5: Tensor | None = None  # (B, Hkv, G, Lq, 1), see prepare_fixed_shifts
        self.unshifted = False  # see prepare_fixed_shifts

    # -- fixed shifts: the online softmax without a running max --
    def prepare_fixed_shifts(self) -> None:
        """Bound every query's scores, for fixed shifts in place of the running max.

        Softmax does not depend on the shift subtracted before ``exp``; a running max
        only keeps ``exp`` from overflowing and the largest weight from underflowing. By
        Cauchy-Schwarz no score of query i exceeds ``bound_i = |scale| |q_i| max_j |k_j|``
        in absolute value (the keys of its kv head; whatever the band or a boolean mask
        hides). So when every bound is at most :data:`UNSHIFTED`, the scores are
        exponentiated as they are (``unshifted``: every weight within ``exp(+-40)``, no
        max at all); else :meth:`fixed_shift` may take the bound as a row's shift.

        Only on CPU, with no additive mask (it could move a score past the bound), and
        with more than one key block (else nothing is saved). A NaN or inf anywhere in q,
        k or v makes some bound non-finite: the call then keeps the running max
        everywhere (a NaN must reach only the rows that see it).
        """
        if self.device.type != "cpu" or self.mask.bias is not None or self.v2 is None:
            return
        if self.lk <= self.plan.block_k:
            return
        qn = torch.linalg.vector_norm(self.q5, dim=-1, keepdim=True, dtype=self.ct)
        kn = torch.linalg.vector_norm(self.k2, dim=-1).amax(-1)  # (B*Hkv,)
        bound = qn.mul_(kn.view(self.b, self.hkv, 1, 1, 1)).mul_(abs(self.scale))
        lo, hi = torch.aminmax(self.v2) if self.v2.numel() else (self.zero, self.zero)
        vmax = max(-float(lo), float(hi))
        top = float(bound.max()) if bound.numel() else 0.0
        if not (math.isfinite(vmax) and math.isfinite(top)):
            return
        self.bound5 = bound  # (B, Hkv, G, Lq, 1)
        # Unshifted weights reach exp(UNSHIFTED): their sum times the values must stay
        # far from overflow.
        self.unshifted = top <= UNSHIFTED and vmax * self.lk * math.exp(UNSHIFTED) < 1e30

    def fixed_shift(self, grp, q0: int, q1: int, row_max: Tensor) -> Tensor | None:
        """Each row's bound as its shift for the rest of a unit's key tiles (they then need
        neither a row max nor rescaling), or None to keep the running max.

        ``row_max (n, G*bq, 1)``: the running max once every row of queries q0:q1 has seen
        a tile, a lower bound of each row's largest score. The bound is taken where it lies
        at most :data:`SPAN` above it: every weight is then at most ``exp(0)`` and the
        largest at least ``exp(-SPAN)``, so none overflows and none that matters
        underflows.
        """
        if self.bound5 is None:
            return None
        bound = self.q_rows(self.bound5, grp, q0, q1)  # (n, G*bq, 1)
        return bound if bool((bound - row_max).le_(SPAN).all()) else None

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
                costs.append(heads * sum((t.r1 - t.r0) * (t.c1 - t.c0)
                                         for t, _ in self.unit_tiles(q0, q1)[0]))
        n = max(1, min(workers(self.device), len(units)))
        if fixed:
            return split(units, costs, n)
        order = sorted(range(len(units)), key=lambda i: -costs[i])
        return [Queue([units[i] for i in order])] * n

    def states(self, q0: int, q1: int) -> Iterator[tuple[int, int, BlockState]]:
        """Key blocks (k0, k1, state) for queries q0:q1, skipping the band's HIDDEN ones."""
        for k0 in range(0, self.lk, self.plan.block_k):
            k1 = min(k0 + self.plan.block_k, self.lk)
            state = self.mask.band_block_state(q0, q1, k0, k1)
            if state is not BlockState.HIDDEN:
                yield k0, k1, state

    def unit_tiles(self, q0: int, q1: int) -> tuple[list[tuple[Tile, bool]], bool]:
        """:meth:`tiles` of queries q0:q1, the tiles of some of the rows first, each with
        whether it is the first to touch any of its rows (an online softmax then starts
        them without rescaling); and whether some rows are not started by such a tile
        (they see no key, or the first tile of theirs also covers rows touched before).
        Made once per call: every head group has the same."""
        hit = self._tiles.get((q0, q1))
        if hit is not None:
            return hit
        # sorted() is stable: key order is kept among the row tiles and the whole ones.
        tiles = sorted(self.tiles(q0, q1), key=lambda t: (t.r0, t.r1) == (q0, q1))
        touched, started = bytearray(q1 - q0), bytearray(q1 - q0)  # 1 per row
        out = []
        for t in tiles:
            i, j = t.r0 - q0, t.r1 - q0
            fresh = not any(touched[i:j])
            out.append((t, fresh))
            touched[i:j] = b"\x01" * (j - i)
            if fresh:
                started[i:j] = b"\x01" * (j - i)
        hit = self._tiles[(q0, q1)] = (out, not all(started))
        return hit

    def tiles(self, q0: int, q1: int) -> Iterator[Tile]:
        """The rectangles to compute for queries q0:q1, in key order: each key block the
        band leaves visible whole; one the band cuts trimmed to the keys its rows can see,
        and (one query head per kv head, ``plan.band_rows`` set) split into tiles of that
        many rows, each trimmed to its own keys, so the hidden part of a block on the
        diagonal is mostly skipped. Consecutive row tiles that the band leaves visible
        over the same keys are one tile (fewer, larger products)."""
        step = self.plan.band_rows if self.g == 1 and self.plan.band_rows > 0 else q1 - q0
        for k0, k1, state in self.states(q0, q1):
            if state is BlockState.VISIBLE:
                yield Tile(q0, q1, k0, k1, state, ())
                continue
            last = None
            for r0 in range(q0, q1, step):
                tile = self._band_tile(r0, min(r0 + step, q1), k0, k1)
                if tile is None:
                    continue
                if (last is not None and not last.edges and not tile.edges
                        and (last.r1, last.c0, last.c1) == (tile.r0, tile.c0, tile.c1)):
                    last = last._replace(r1=tile.r1)
                    continue
                if last is not None:
                    yield last
                last = tile
            if last is not None:
                yield last

    def _band_tile(self, r0: int, r1: int, k0: int, k1: int) -> Tile | None:
        """Queries r0:r1 x keys k0:k1 trimmed to the keys the band lets any of them see,
        with the column ranges where it hides some pairs (None: it hides all)."""
        m = self.mask
        lo, hi = r0 + m.offset, r1 - 1 + m.offset  # the diagonal at the first / last row
        c0 = k0 if m.left is None else max(k0, lo - m.left)
        c1 = k1 if m.right is None else min(k1, hi + m.right + 1)
        if c0 >= c1:
            return None
        state = m.band_block_state(r0, r1, c0, c1)
        if state is BlockState.HIDDEN:
            return None
        if state is BlockState.VISIBLE:
            return Tile(r0, r1, c0, c1, state, ())
        # Keys every row sees: [a, b); the band hides some pairs only left and right of it.
        # Both are rounded inwards to a multiple of _ALIGN keys from c0: element-wise
        # passes over column ranges that start and end aligned run at full vector speed.
        a = c0 if m.left is None else min(max(c0, hi - m.left), c1)
        b = c1 if m.right is None else max(min(c1, lo + m.right + 1), a)
        a = min(c0 + -(-(a - c0) // _ALIGN) * _ALIGN, c1)
        b = max(c0 + (b - c0) // _ALIGN * _ALIGN, a) if b < c1 else c1
        edges = tuple((e0, e1) for e0, e1 in ((c0, a), (b, c1)) if e1 > e0)
        return Tile(r0, r1, c0, c1, state, edges)

    # -- slicing --
    def buffer(self, name: str, n: int, rows: int, cols: int) -> Tensor:
        """A contiguous (n, rows, cols) scratch tensor in the compute dtype, reused."""
        views = self._local.__dict__.setdefault("views", {})
        view = views.get((name, n, rows, cols))  # the same few shapes come back every block
        if view is not None:
            return view
        bufs = self._local.__dict__.setdefault("bufs", {})
        size = n * rows * cols
        buf = bufs.get(name)
        if buf is None or buf.numel() < size:
            buf = bufs[name] = torch.empty(size, dtype=self.ct, device=self.device)
            for key in [key for key in views if key[0] == name]:
                del views[key]  # views of the old buffer
        view = views[(name, n, rows, cols)] = buf[:size].view(n, rows, cols)
        return view

    def q_rows(self, t: Tensor, grp, q0: int, q1: int) -> Tensor:
        """Rows q0:q1 of a (B, Hkv, G, Lq, X) tensor for the group: (n, G*bq, X)."""
        b0, b1, h0, h1 = grp
        n = (b1 - b0) * (h1 - h0)
        return t[b0:b1, h0:h1, :, q0:q1].reshape(n, self.g * (q1 - q0), t.shape[-1])

    def q_scaled(self, grp, q0: int, q1: int) -> Tensor:
        """Queries q0:q1 of the group times ``scale``, in the compute dtype: ``(n, G*bq,
        D)`` in this thread's scratch buffer "q" (valid until its next call)."""
        b0, b1, h0, h1 = grp
        src = self.q5[b0:b1, h0:h1, :, q0:q1]  # (b, Hkv', G, bq, D)
        buf = self.buffer("q", (b1 - b0) * (h1 - h0), self.g * (q1 - q0), src.shape[-1])
        dst = buf.view(src.shape)
        if src.dtype == self.ct:
            torch.mul(src, self.scale, out=dst)
        else:  # float16/bfloat16: converted first, then scaled in float32
            dst.copy_(src).mul_(self.scale)
        return buf

    def q_block(self, grp, q0: int, q1: int) -> tuple[Tensor, float]:
        """Queries q0:q1 of the group in the compute dtype ``(n, G*bq, D)`` and the factor
        the products with them still need: with one query head per kv head, q itself (a
        view) and ``scale``, which the matrix products apply for free; else
        :meth:`q_scaled` and 1."""
        if self.g == 1 and self.q5.dtype == self.ct:
            b0, b1, h0, h1 = grp
            qb = self.q5[b0:b1, h0:h1, 0, q0:q1]  # (b, Hkv', bq, D)
            return qb.reshape((b1 - b0) * (h1 - h0), q1 - q0, qb.shape[-1]), self.scale
        return self.q_scaled(grp, q0, q1), 1.0

    def kv_rows(self, t: Tensor, grp, k0: int, k1: int) -> Tensor:
        """Keys k0:k1 of a (B*Hkv, Lk, X) tensor for the group: (n, bk, X)."""
        # Every query block asks for the same views again: slicing them costs more than
        # a small block's arithmetic, so they are made once per call. The cache holds
        # ``t`` too, so its id cannot be reused by another tensor while this call lasts.
        key = (id(t), grp, k0, k1)
        hit = self._views.get(key)
        if hit is not None:
            return hit[1]
        b0, b1, h0, h1 = grp
        # A view (never a copy): the backward accumulates gradients into it in place.
        view = t.view(self.b, self.hkv, *t.shape[1:])[b0:b1, h0:h1, k0:k1].view(
            (b1 - b0) * (h1 - h0), k1 - k0, t.shape[-1])
        self._views[key] = (t, view)
        return view

    def heads_view(self, s: Tensor, grp, rows: int) -> Tensor:
        """(n, G*bq, X) viewed as (b, Hq', bq, X), the layout of the masks."""
        b0, b1, h0, h1 = grp
        return s.view(b1 - b0, (h1 - h0) * self.g, rows, s.shape[-1])

    # -- one block --
    def scores(self, qb: Tensor, grp, q0: int, q1: int, k0: int, k1: int,
               state: BlockState, edges: tuple[tuple[int, int], ...] = (), alpha: float = 1.0,
               *, band: bool = True) -> tuple[Tensor, bool | tuple[tuple[int, int], ...]]:
        """Masked scaled scores of the block: ``(n, G*bq, bk)``, ``-inf`` where hidden,
        and where a mask was applied (only there can a score be ``-inf`` or very low):
        False (nowhere), True (anywhere) or the column ranges of ``edges`` (from 0).

        ``qb (n, G*bq, D)`` holds the group's queries q0:q1 times ``scale / alpha``
        (:meth:`q_block`). ``edges``: the key ranges of a :class:`Tile` outside which the
        band hides nothing. ``band=False`` (no tensor mask): leave the band to
        :meth:`zero_hidden_` on the weights. The result lives in this thread's scratch
        buffer "s" until the next call.
        """
        kt = self._views.get(("kT", grp, k0, k1))  # (n, D, bk)
        if kt is None:
            kt = self._views[("kT", grp, k0, k1)] = self.kv_rows(self.k2, grp, k0, k1).mT
        s = self.buffer("s", qb.shape[0], qb.shape[1], k1 - k0)  # (n, G*bq, bk)
        if alpha == 1.0:
            torch.bmm(qb, kt, out=s)
        else:  # beta=0: what s held is not read
            torch.baddbmm(s, qb, kt, beta=0.0, alpha=alpha, out=s)
        if not self.has_tensor_mask:
            if state is BlockState.VISIBLE or not band:
                return s, False
            return s, self._band_(s, grp, q0, q1, k0, k1, edges, self._band_edge_)
        allowed, bias = self.block_mask(grp, q0, q1, k0, k1, state)
        if allowed is not None or bias is not None:
            s4 = self.heads_view(s, grp, q1 - q0)  # (b, Hq', bq, bk)
            if bias is not None:
                s4.add_(bias)
            if allowed is not None:  # select, never multiply: NaN there cannot leak
                torch.where(allowed, s4, self.neg_inf, out=s4)
            return s, True
        return s, False

    def zero_hidden_(self, p: Tensor, grp, q0: int, q1: int, k0: int, k1: int,
                     state: BlockState, edges: tuple[tuple[int, int], ...] = ()) -> None:
        """Set the weights ``p (n, G*bq, bk)`` of the pairs the band hides to 0, in place:
        the band of :meth:`scores` applied after ``exp`` instead of before (one pass on
        the columns it cuts instead of four), for scores known finite (no tensor mask)."""
        if state is not BlockState.VISIBLE:
            self._band_(p, grp, q0, q1, k0, k1, edges, self._band_zero_)

    def _band_(self, s: Tensor, grp, q0: int, q1: int, k0: int, k1: int,
               edges: tuple[tuple[int, int], ...], apply) -> bool | tuple[tuple[int, int], ...]:
        """``apply(part, q0, q1, e0, e1)`` on the key ranges ``edges`` of ``s (n, G*bq,
        bk)`` (the whole block when there are none); returns those ranges from 0 (True
        for the whole block)."""
        if not edges:  # the band cuts somewhere in the block (state PARTIAL)
            apply(self.heads_view(s, grp, q1 - q0), q0, q1, k0, k1)
            return True
        rows = q1 - q0
        s4 = s if self.g == 1 else s.view(s.shape[0], self.g, rows, k1 - k0)  # (n, [G,] r, c)
        cols = []
        for e0, e1 in edges:
            apply(s4.narrow(-1, e0 - k0, e1 - e0), q0, q1, e0, e1)  # (n, [G,] r, e), a view
            cols.append((e0 - k0, e1 - k0))
        return tuple(cols)

    def _band_zero_(self, part: Tensor, q0: int, q1: int, e0: int, e1: int) -> None:
        """Set the weights ``part (..., q1-q0, e1-e0)`` of queries q0:q1 x keys e0:e1 that
        the band hides to 0, in place (``tril_``/``triu_``)."""
        m = self.mask
        d = e0 - q0 - m.offset  # key e0 + j sits d + j - i right of query q0 + i's diagonal
        if m.right is not None:
            part.tril_(m.right - d)  # keeps j - i <= right - d
        if m.left is not None:
            part.triu_(-m.left - d)  # keeps j - i >= -left - d

    def _band_edge_(self, part: Tensor, q0: int, q1: int, e0: int, e1: int) -> None:
        """Set the scores ``part (..., q1-q0, e1-e0)`` of queries q0:q1 x keys e0:e1 that
        the band hides to ``-inf``, in place. :meth:`_band_zero_` replaces them (NaN
        too) by 0, then a bias of 0 / ``-inf`` is added: a few times faster than
        ``torch.where`` with a bool mask, and as exact (``x + 0 = x``)."""
        m = self.mask
        key = (e0 - q0 - m.offset, q1 - q0, e1 - e0)  # where the keys sit from the diagonal
        bias = self._edge_cache.get(key)  # (r, e): 0 visible, -inf hidden
        if bias is None:
            band = m.band(q0, q1, e0, e1, self.device)
            bias = torch.zeros(band.shape, dtype=self.ct, device=self.device)
            bias = self._edge_cache[key] = bias.masked_fill_(~band, float("-inf"))
        self._band_zero_(part, q0, q1, e0, e1)
        part.add_(bias)

    def exp_shifted_(self, s: Tensor, shift: Tensor | None,
                     masked: bool | tuple[tuple[int, int], ...]) -> Tensor:
        """``exp(s - shift)`` in place (``s (n, rows, bk)``, ``shift (n, rows, 1)``; None:
        ``exp(s)``).

        On CPU, PyTorch's ``exp`` takes a slow path (several times slower per element) on
        arguments that underflow, as ``-inf`` for hidden keys does; ``exp2`` has no such
        path, so masked blocks go through ``exp2(x * log2(e))``: 0 stays exactly 0.
        ``masked``: as :meth:`scores` returns it; given column ranges, only those columns
        take the ``exp2`` path (``exp`` is faster on the others).
        """
        if shift is not None:
            s.sub_(shift)
        if not masked or self.device.type != "cpu":
            return s.exp_()
        if masked is True:
            return s.mul_(self.log2e).exp2_()
        done = 0  # columns [done, a) lie between the ranges: no mask there
        for a, b in masked:
            if a > done:
                s.narrow(-1, done, a - done).exp_()
            s.narrow(-1, a, b - a).mul_(self.log2e).exp2_()
            done = b
        if done < s.shape[-1]:
            s.narrow(-1, done, s.shape[-1] - done).exp_()
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


class Tile(NamedTuple):
    """Queries r0:r1 x keys c0:c1 of one unit; ``edges``: the key ranges in which the band
    hides some pairs (empty when it hides none)."""

    r0: int
    r1: int
    c0: int
    c1: int
    state: BlockState
    edges: tuple[tuple[int, int], ...]


def _slice_heads(t: Tensor, bs: slice, hs: slice) -> Tensor:
    """Slice the batch and head dims of a broadcastable 4-D mask, leaving size-1 dims."""
    return t[bs if t.shape[0] > 1 else slice(None), hs if t.shape[1] > 1 else slice(None)]



def row_stats(lse: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(row_max, inv_sum)`` with ``weights = exp(score - row_max) * inv_sum``.

    ``lse`` is either the pair :func:`~.core.chunked_forward` keeps (``stats=True``): the
    row's largest score and ``1 / sum(exp(score - max))``, which recomputes the weights
    to the precision of the forward even when every score of the row is near ``-1e9``
    (where ``max + log(sum)`` as one float would round ``log(sum)`` away); or one log-sum-
    exp tensor (ring attention's merged one), read as ``(lse, 1)``. Rows that see no key
    get ``row_max = +inf`` (so ``exp(-inf - inf) = 0``, never NaN) and ``inv_sum = 0``.
    """
    if isinstance(lse, Tensor):
        return lse.masked_fill(lse == float("-inf"), float("inf")), torch.ones_like(lse)
    row_max, inv_sum = lse
    return row_max.masked_fill(row_max == float("-inf"), float("inf")), inv_sum
