"""The online-softmax core of the chunked backend: forward, weights, backward, merge.

Per query the forward keeps only ``row_max`` (the largest score seen so far), ``row_sum``
(the sum of ``exp(score - row_max)``) and ``acc`` (the sum of ``exp(score - row_max) *
value``), rescaling both by ``exp(old_max - new_max)`` when a new key block raises the
maximum; after the last block ``out = acc / row_sum`` and ``lse = row_max + log(row_sum)``.
On CPU a fixed shift often stands in for ``row_max`` (:meth:`Blocks.prepare_fixed_shifts`):
0 when every score is small, else each row's bound on its scores, so that most blocks
need neither a max nor rescaling. The backward recomputes each block's weights from
``q``, ``k`` and ``lse``. These are also the building blocks of ring attention
(:mod:`qkv.distributed.ring`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...masks import Mask
from ...validate import check_qkv
from .blocks import Blocks, row_stats
from .planning import plan_blocks
from .threads import run_shares

__all__ = ["chunked_backward", "chunked_forward", "chunked_weights", "merge_partials"]


def _check_qkv(q: Tensor, k: Tensor, v: Tensor | None, mask: Mask) -> None:
    check_qkv(q, k, v, dims=4)
    if (mask.lq, mask.lk) != (q.shape[2], k.shape[2]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match the mask "
                         f"(Lq={mask.lq}, Lk={mask.lk}); build it as Mask(Lq, Lk, ...)")


# ---- forward -------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_forward(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, *,
                    dropout: float = 0.0, seed: int | None = None, block_q: int | None = None,
                    block_k: int | None = None, offsets: tuple[int, int] = (0, 0),
                    stats: bool = False) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
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
        stats: return, instead of ``lse``, the pair ``(row_max, inv_sum)`` (each ``(B, Hq,
            Lq)``: the row's shift (its largest score, or a fixed shift such as 0) and
            ``1 / sum(exp(score - row_max))``), which
            :func:`chunked_weights` and :func:`chunked_backward` accept in place of ``lse``
            and which keeps their precision when scores are large (an additive mask of
            ``-1e9``: ``lse`` as one float rounds ``log(sum)`` away there).

    Returns:
        ``out (B, Hq, Lq, Dv)`` in the compute dtype (float32; float64 for float64 inputs)
        and ``lse (B, Hq, Lq)``, the natural log of each row's sum of ``exp(scores)`` over
        its visible keys (``-inf`` where it sees none, and then ``out`` is 0).

    Keys hidden from every query should hold finite values (``qkv.attention`` zeroes
    them): as in the reference, their values meet a weight of exactly 0.
    """
    _check_qkv(q, k, v, mask)
    plan = plan_blocks(q, k, mask=mask, block_q=block_q, block_k=block_k)
    bl = Blocks(q, k, v, mask, scale, plan, dropout=dropout, seed=seed, offsets=offsets)
    bl.prepare_fixed_shifts()
    dv = v.shape[-1]
    out = torch.empty(bl.b, bl.hkv, bl.g, bl.lq, dv, dtype=bl.ct, device=q.device)
    row_max = torch.empty(bl.b, bl.hkv, bl.g, bl.lq, dtype=bl.ct, device=q.device)
    row_sum = torch.empty_like(row_max)  # (B, Hkv, G, Lq)

    def work(_: int, share: list) -> None:
        for grp, q0, q1 in share:
            b0, b1, h0, h1 = grp
            rows = (b1 - b0, h1 - h0, bl.g, q1 - q0)
            dst = out[b0:b1, h0:h1, :, q0:q1]  # (b, Hkv', G, bq, Dv)
            # With one query head per kv head (or all queries) the rows of the group are
            # one (n, G*bq, Dv) view of out: the online softmax accumulates there directly.
            direct = bl.g == 1 or (q0 == 0 and q1 == bl.lq)
            acc = dst.view(rows[0] * rows[1], -1, dv) if direct else None
            o, m, total = _forward_rows(bl, grp, q0, q1, acc)  # (n, G*bq, Dv), 2x (n, G*bq, 1)
            # Normalised here, while in cache. A row that saw a visible key has row_sum >= 1
            # (its max contributes exp(0)), or NaN (a NaN score propagates); one that saw
            # none has row_sum 0 and output 0 (even where hidden values hold NaN).
            seen = total != 0  # (n, G*bq, 1)
            denom = torch.where(seen, total, bl.one)
            if direct:
                o.div_(denom)
            else:
                torch.div(o.view(*rows, dv), denom.view(*rows, 1), out=dst)
            dst.masked_fill_(seen.logical_not_().view(*rows, 1), 0.0)
            row_max[b0:b1, h0:h1, :, q0:q1] = m.view(rows)
            row_sum[b0:b1, h0:h1, :, q0:q1] = total.view(rows)

    run_shares(bl.shares(fixed=False), work)
    out = out.view(bl.b, bl.hq, bl.lq, dv)
    row_max, row_sum = row_max.view(bl.b, bl.hq, bl.lq), row_sum.view(bl.b, bl.hq, bl.lq)
    seen = row_sum != 0  # (B, Hq, Lq); a row that saw no key: lse -inf
    row_max.masked_fill_(~seen, float("-inf"))
    if stats:
        return out, (row_max, torch.where(seen, 1.0 / row_sum, 0.0))
    return out, torch.where(seen, row_max + torch.log(row_sum), float("-inf"))


def _forward_rows(bl: Blocks, grp, q0: int, q1: int,
                  acc: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The online softmax over every key block for queries q0:q1 of one head group.

    Returns the unnormalised output ``(n, G*bq, Dv)`` (the sum of ``exp(score - shift) *
    value``; in ``acc`` when given, else in a scratch buffer), the row's shift (its max,
    or a fixed shift of :meth:`Blocks.fixed_shift`) and the row's sum of ``exp(score -
    shift)`` (each ``(n, G*bq, 1)``; the sum is 0 where the row sees no key, and its shift
    is then meaningless).
    """
    qb, alpha = bl.q_block(grp, q0, q1)  # (n, G*bq, D), q * scale / alpha
    n, rows = qb.shape[0], qb.shape[1]
    dv = bl.v2.shape[-1]
    row_sum = torch.zeros((n, rows, 1), dtype=bl.ct, device=bl.device)
    if acc is None:
        # The caller copies acc out before this thread's next unit: a reused buffer stays
        # in cache, where a fresh tensor would be written cold by the first product.
        acc = bl.buffer("acc", n, rows, dv)  # (n, G*bq, Dv)
    tiles, unstarted = bl.unit_tiles(q0, q1)  # [(tile, first of its rows)], row tiles first
    if unstarted:
        acc.zero_()  # rows that no tile starts (they see no key) must read 0
    # A fixed shift (Blocks.prepare_fixed_shifts) replaces the running max: 0 from the
    # start when every score is small, else the bound once every row has seen a tile.
    # Tiles then skip the max and the rescaling.
    fixed, shift = bl.unshifted, None
    if fixed:
        row_max = torch.zeros((n, rows, 1), dtype=bl.ct, device=bl.device)
    else:
        # The running max starts at the lowest finite value, not -inf: a row that has seen
        # no visible key yet then shifts its -inf scores to exp(-inf) = 0 and rescales by
        # exp(0) = 1 (its sums are 0), with no per-block test for -inf.
        row_max = torch.full((n, rows, 1), torch.finfo(bl.ct).min, dtype=bl.ct,
                             device=bl.device)
    decided = fixed or unstarted
    for (r0, r1, c0, c1, state, edges), fresh in tiles:
        whole = r0 == q0 and r1 == q1
        if whole and not fresh and not decided:  # row tiles come first: all are done
            decided = True
            shift = bl.fixed_shift(grp, q0, q1, row_max)  # (n, G*bq, 1) or None
            if shift is not None:
                fixed = True
                rescale = row_max.sub_(shift).exp_()  # (n, G*bq, 1), in row_max's storage
                row_sum.mul_(rescale)
                acc.mul_(rescale)
                row_max = shift
        if whole:
            qt, mt, st, at = qb, row_max, row_sum, acc
        else:  # G == 1: rows r0:r1 of the unit, views
            i, r = r0 - q0, r1 - r0
            qt, mt = qb.narrow(1, i, r), row_max.narrow(1, i, r)
            st, at = row_sum.narrow(1, i, r), acc.narrow(1, i, r)
        # With a fixed shift and no tensor mask every score is finite and bounded: the band
        # then zeroes weights after exp rather than hiding scores before it.
        late = fixed and not bl.has_tensor_mask
        p, masked = bl.scores(qt, grp, r0, r1, c0, c1, state, edges, alpha,
                              band=not late)  # (n, r, c)
        vb = bl.kv_rows(bl.v2, grp, c0, c1)  # (n, c, Dv)
        if fixed:  # no max, no rescaling
            bl.exp_shifted_(p, shift, masked)  # shift None: exp(p)
            if late:
                bl.zero_hidden_(p, grp, r0, r1, c0, c1, state, edges)
            if fresh:  # the first tile of these rows: st is 0, at not yet written
                torch.sum(p, dim=-1, keepdim=True, out=st)
            else:
                st.add_(p.sum(dim=-1, keepdim=True))
            if bl.dropout > 0:
                bl.drop_(p, grp, r0, r1, c0, c1)
            if fresh:
                torch.bmm(p, vb, out=at)
            else:
                at.baddbmm_(p, vb)
            continue
        if fresh:  # the first tile of these rows: mt holds the lowest float, st and at 0
            torch.maximum(p.amax(dim=-1, keepdim=True), mt, out=mt)  # (n, r, 1)
            bl.exp_shifted_(p, mt, masked)  # unnormalised weights, 0 where hidden
            torch.sum(p, dim=-1, keepdim=True, out=st)
            if bl.dropout > 0:  # the sum normalises; the values get the dropped weights
                bl.drop_(p, grp, r0, r1, c0, c1)
            torch.bmm(p, vb, out=at)
            continue
        new_max = torch.maximum(p.amax(dim=-1, keepdim=True), mt)  # (n, r, 1)
        bl.exp_shifted_(p, new_max, masked)
        rescale = mt.sub_(new_max).exp_()  # (n, r, 1), in row_max's storage
        torch.addcmul(p.sum(dim=-1, keepdim=True), st, rescale, out=st)  # st*rescale + sum
        at.mul_(rescale)
        if bl.dropout > 0:
            bl.drop_(p, grp, r0, r1, c0, c1)
        at.baddbmm_(p, vb)
        if whole:
            row_max = new_max
        else:
            mt.copy_(new_max)
    return acc, row_max, row_sum


# ---- weights -------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_weights(q: Tensor, k: Tensor, mask: Mask, scale: float,
                    lse: Tensor | tuple[Tensor, Tensor], *,
                    out: Tensor, dropout: float = 0.0, seed: int | None = None,
                    block_q: int | None = None, block_k: int | None = None,
                    offsets: tuple[int, int] = (0, 0)) -> Tensor:
    """Write the exact attention weights ``exp(scores - lse)`` into ``out (B, Hq, Lq, Lk)``.

    ``lse (B, Hq, Lq)`` (or the ``(row_max, inv_sum)`` pair of ``stats=True``, which keeps
    the precision for large scores) comes from :func:`chunked_forward` on the same inputs.
    Blocks are
    computed one at a time straight into ``out`` (a contiguous tensor of any float dtype):
    hidden entries are 0, and with ``dropout`` the weights are the ones applied to the
    values (dropped = 0, kept scaled by ``1/(1-p)``). Returns ``out``.
    """
    _check_qkv(q, k, None, mask)
    plan = plan_blocks(q, k, mask=mask, block_q=block_q, block_k=block_k)
    bl = Blocks(q, k, None, mask, scale, plan, dropout=dropout, seed=seed, offsets=offsets)
    row_max, inv_sum = row_stats(lse)  # (B, Hq, Lq) each
    max5 = None if _all_zero(row_max) else row_max.view(bl.b, bl.hkv, bl.g, bl.lq, 1)
    inv5 = inv_sum.view(bl.b, bl.hkv, bl.g, bl.lq, 1)
    out.zero_()  # blocks the band hides stay 0
    out5 = out.view(bl.b, bl.hkv, bl.g, bl.lq, bl.lk)
    # A row with a NaN or +inf score has a NaN or +inf max (or a NaN sum): its visible
    # weights are all NaN, and its hidden ones must still be 0, not exp(-inf - NaN).
    nan_rows = not bool(torch.isfinite(row_max).all() and torch.isfinite(inv_sum).all())

    def work(_: int, share: list) -> None:
        for grp, q0, q1 in share:
            b0, b1, h0, h1 = grp
            qb = bl.q_scaled(grp, q0, q1)  # (n, G*bq, D), q * scale
            mb = None if max5 is None else bl.q_rows(max5, grp, q0, q1)  # (n, G*bq, 1)
            ib = bl.q_rows(inv5, grp, q0, q1)  # (n, G*bq, 1)
            for k0, k1, state in bl.states(q0, q1):
                s, masked = bl.scores(qb, grp, q0, q1, k0, k1, state)  # (n, G*bq, bk)
                hidden = s == float("-inf") if nan_rows else None  # (n, G*bq, bk)
                p = bl.exp_shifted_(s, mb, masked).mul_(ib)  # (n, G*bq, bk)
                if hidden is not None:
                    p.masked_fill_(hidden, 0.0)
                if bl.dropout > 0:
                    bl.drop_(p, grp, q0, q1, k0, k1)
                dst = out5[b0:b1, h0:h1, :, q0:q1, k0:k1]  # (b, Hkv', G, bq, bk)
                dst.copy_(p.view(dst.shape))

    run_shares(bl.shares(fixed=False), work)
    return out


def _all_zero(row_max: Tensor) -> bool:
    """Whether every row's shift is 0: the forward exponentiated the scores unshifted."""
    return row_max.device.type == "cpu" and not bool(row_max.any())


# ---- backward ------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor,
                     lse: Tensor | tuple[Tensor, Tensor], delta: Tensor, mask: Mask,
                     scale: float, *, dropout: float = 0.0, seed: int | None = None,
                     block_q: int | None = None, block_k: int | None = None,
                     offsets: tuple[int, int] = (0, 0), dweights: Tensor | None = None,
                     dbias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention with respect to q, k and v, block by block (FlashAttention-2).

    Args:
        q, k, v, mask, scale, dropout, seed, offsets: as in :func:`chunked_forward`.
        dout: ``(B, Hq, Lq, Dv)``, the gradient of the output (any strides).
        lse: ``(B, Hq, Lq)``, the log-sum-exp of each row over *all* its keys (for ring
            attention, the merged lse, not the shard's), or the ``(row_max, inv_sum)``
            pair of ``chunked_forward(..., stats=True)``, which keeps the precision when
            scores are large.
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
    bl = Blocks(q, k, v, mask, scale, plan, dropout=dropout, seed=seed, offsets=offsets)
    b, hkv, g, lq, lk = bl.b, bl.hkv, bl.g, bl.lq, bl.lk
    d, dv_ = q.shape[-1], v.shape[-1]
    row_max, inv_sum = row_stats(lse)  # (B, Hq, Lq) each
    inv = None
    if not isinstance(lse, Tensor):
        # Blocks recompute exp(score - row_max) = P / inv_sum: exact even at scores of -1e9,
        # where exp(score - lse) would not be (lse rounds at that magnitude). Folding
        # inv_sum into dout (a block of rows at a time) and delta gives dv = P^T dout and
        # dS = P (dP - delta) unchanged.
        inv = inv_sum.unsqueeze(-1)  # (B, Hq, Lq, 1)
        delta = delta.to(bl.ct) * inv_sum
    rows = {
        "do": dout.reshape(b, hkv, g, lq, dv_),  # (B, Hkv, G, Lq, Dv), any dtype
        "inv": None if inv is None else inv.reshape(b, hkv, g, lq, 1),  # (B, Hkv, G, Lq, 1)
        # None: the forward exponentiated the scores unshifted (no subtraction here)
        "max": None if _all_zero(row_max) else row_max.reshape(b, hkv, g, lq, 1),
        "delta": delta.to(bl.ct).reshape(b, hkv, g, lq, 1),  # (B, Hkv, G, Lq, 1)
    }
    dw5 = None if dweights is None else dweights.reshape(b, hkv, g, lq, lk)
    if dw5 is not None and inv is not None:
        dw5 = dw5.to(bl.ct) * inv.reshape(b, hkv, g, lq, 1)  # scaled like dout
    dq = torch.empty(b, hkv, g, lq, d, dtype=bl.ct, device=q.device)  # (B, Hkv, G, Lq, D)
    shares = bl.shares(fixed=True)
    # dk, dv (and dbias) gather contributions from every query block: one private
    # accumulator per share, summed in a fixed order afterwards.
    dks = [torch.zeros(b * hkv, lk, d, dtype=bl.ct, device=q.device) for _ in shares]
    dvs = [torch.zeros(b * hkv, lk, dv_, dtype=bl.ct, device=q.device) for _ in shares]
    dbs = [dbias] + [torch.zeros_like(dbias) for _ in shares[1:]] if dbias is not None else None

    def work(i: int, share: list) -> None:
        for grp, q0, q1 in share:
            b0, b1, h0, h1 = grp
            dst = dq[b0:b1, h0:h1, :, q0:q1]  # (b, Hkv', G, bq, D)
            # As in the forward: dq of the group accumulates in place when it is one view.
            direct = g == 1 or (q0 == 0 and q1 == lq)
            dqb = _backward_rows(bl, grp, q0, q1, rows, dw5, dks[i], dvs[i],
                                 None if dbs is None else dbs[i],
                                 dst.view((b1 - b0) * (h1 - h0), -1, d) if direct else None)
            if not direct:
                dst.copy_(dqb.view(dst.shape))

    run_shares(shares, work)
    dk = dks[0] if dks else torch.zeros(b * hkv, lk, d, dtype=bl.ct, device=q.device)
    dv = dvs[0] if dvs else torch.zeros(b * hkv, lk, dv_, dtype=bl.ct, device=q.device)
    for i in range(1, len(shares)):
        dk.add_(dks[i])
        dv.add_(dvs[i])
        if dbs is not None:
            dbias.add_(dbs[i])
    return dq.view(b, bl.hq, lq, d), dk.view(b, hkv, lk, d), dv.view(b, hkv, lk, dv_)


def _backward_rows(bl: Blocks, grp, q0: int, q1: int, rows: dict[str, Tensor | None],
                   dw5: Tensor | None, dk: Tensor, dv: Tensor, dbias: Tensor | None,
                   dqb: Tensor | None = None) -> Tensor:
    """Gradients from queries q0:q1 of one head group: adds into ``dk``, ``dv`` (and
    ``dbias``), returns this block's ``dq (n, G*bq, D)`` (in ``dqb`` when given, else in
    a scratch buffer; 0 for rows that see no key)."""
    b0, b1, h0, h1 = grp
    qb, alpha = bl.q_block(grp, q0, q1)  # (n, G*bq, D), q * scale / alpha
    dob = bl.q_rows(rows["do"], grp, q0, q1)  # (n, G*bq, Dv)
    if rows["inv"] is not None or dob.dtype != bl.ct:  # times inv_sum, in cache
        dst = bl.buffer("do", *dob.shape)
        if rows["inv"] is None:
            dst.copy_(dob)
        else:
            torch.mul(dob, bl.q_rows(rows["inv"], grp, q0, q1), out=dst)
        dob = dst
    mb = None if rows["max"] is None else bl.q_rows(rows["max"], grp, q0, q1)  # (n, G*bq, 1)
    db = bl.q_rows(rows["delta"], grp, q0, q1)  # (n, G*bq, 1)
    tiles, unstarted = bl.unit_tiles(q0, q1)
    if dqb is None:
        dqb = bl.buffer("dq", *qb.shape)  # (n, G*bq, D)
    if unstarted:
        dqb.zero_()
    for (r0, r1, c0, c1, state, edges), fresh in tiles:
        whole = r0 == q0 and r1 == q1
        kb = bl.kv_rows(bl.k2, grp, c0, c1)  # (n, c, D)
        vb = bl.kv_rows(bl.v2, grp, c0, c1)  # (n, c, Dv)
        if whole:
            qt, dot, mt, dt = qb, dob, mb, db
        else:  # G == 1: rows r0:r1 of the unit, views
            i, r = r0 - q0, r1 - r0
            qt, dot = qb.narrow(1, i, r), dob.narrow(1, i, r)  # (n, r, D), (n, r, Dv)
            mt = None if mb is None else mb.narrow(1, i, r)  # (n, r, 1)
            dt = db.narrow(1, i, r)  # (n, r, 1)
        s, masked = bl.scores(qt, grp, r0, r1, c0, c1, state, edges, alpha)  # (n, r, c)
        p = bl.exp_shifted_(s, mt, masked)  # (n, r, c) weights / inv_sum
        dp = bl.buffer("dp", *p.shape)  # (n, r, c)
        torch.bmm(dot, vb.transpose(1, 2), out=dp)  # gradient of the applied weights
        if dw5 is not None:
            dwb = dw5[b0:b1, h0:h1, :, r0:r1, c0:c1]  # (b, Hkv', G, r, c)
            dp.view(dwb.shape).add_(dwb)
        if bl.dropout > 0:
            pd = bl.buffer("pd", *p.shape)
            bl.drop_(pd.copy_(p), grp, r0, r1, c0, c1)  # the weights applied to the values
            bl.drop_(dp, grp, r0, r1, c0, c1)  # back through the same dropout
        else:
            pd = p
        bl.kv_rows(dv, grp, c0, c1).baddbmm_(pd.transpose(1, 2), dot)
        ds = dp.sub_(dt).mul_(p)  # (n, r, c) gradient of the (masked) scaled scores
        if dbias is not None:
            _add_bias_grad(dbias, bl.heads_view(ds, grp, r1 - r0), grp, bl.g, r0, r1, c0, c1)
        dqt = dqb if whole else dqb.narrow(1, r0 - q0, r1 - r0)  # (n, r, D)
        if fresh:  # the first tile of these rows: beta=0, what dqt held is not read
            torch.baddbmm(dqt, ds, kb, beta=0.0, alpha=bl.scale, out=dqt)
        else:
            dqt.baddbmm_(ds, kb, alpha=bl.scale)
        bl.kv_rows(dk, grp, c0, c1).baddbmm_(ds.transpose(1, 2), qt, alpha=alpha)
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

