"""The backward kernels: FlashAttention-2's recomputation, five matmuls per block.

With ``P = softmax(S)`` recomputed from the saved log-sum-exp (``P = exp2(S' - lse)``, ``S'``
the scores in log2 units), the gradients of ``O = P V`` are

* ``dV = P^T dO`` and ``dP = dO V^T``;
* ``dS = P * (dP - delta)`` with ``delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i)``;
* ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``.

1. ``_delta_kernel``: ``delta = rowsum(dO * O)`` per query (float32).
2. ``_dkdv_kernel``: one program per key block of one kv head keeps ``K``, ``V`` and the
   ``dK``, ``dV`` accumulators resident and streams the query blocks of the query heads
   that read this kv head: ``S^T = K Q^T``, ``dV += P^T dO``, ``dP^T = V dO^T``,
   ``dK += dS^T Q`` and, by default, ``dQ += dS K`` added atomically to a float32 buffer
   (the fifth matmul: dQ costs no second pass over the scores). For GQA/MQA the query heads
   of a group are split over ``SPLIT`` programs (so that a few kv heads still fill the
   GPU); their partial dK, dV land in separate float32 slices that are summed afterwards.
3. ``_dq_kernel``, only when deterministic (``deterministic=True`` or
   ``torch.use_deterministic_algorithms(True)``): the float32 atomics add in a varying
   order, so the deterministic backward computes dQ in a separate pass instead, one program
   per query block (two more matmuls: ``S`` and ``dP`` again).

Both big kernels skip the blocks the band hides and mask only the band's edge blocks
(:func:`qkv.kernels.triton.common.span`). Rows with no visible key have ``P = 0`` and so
zero gradients.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import autotune, offline
from .common import (
    LOG2E,
    at_row,
    band_args,
    block_dim,
    launch,
    load_lse,
    load_tile,
    span,
    store_tile,
    tile_and_head,
    visible,
)


@triton.jit(do_not_specialize=["H", "LQ"])
def _delta_kernel(O, DO, DELTA,
                  stride_oz, stride_oh, stride_om, stride_ok,
                  stride_dz, stride_dh, stride_dm, stride_dk,
                  H, LQ,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M) * B * Hq,)``: DELTA (B, Hq, Lq) = rowsum(dO * O), fp32."""
    pid_m, pid_bh = tile_and_head(LQ, BLOCK_M, False)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_DV)
    O += b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
    DO += b.to(tl.int64) * stride_dz + h.to(tl.int64) * stride_dh
    o = load_tile(at_row(O, m0, stride_om), rows, offs_d, stride_om, stride_ok, LQ - m0,
                  HEAD_DV, BLOCK_DV, True)  # (BLOCK_M, BLOCK_DV)
    do = load_tile(at_row(DO, m0, stride_dm), rows, offs_d, stride_dm, stride_dk, LQ - m0,
                   HEAD_DV, BLOCK_DV, True)  # (BLOCK_M, BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, kc, Q, DO, DQ, LSE, DELTA, offs_n, cols_k, cols_v,
                 lo, full_lo, full_hi, hi, LQ, kv_len, qk_scale,
                 stride_qm, stride_qk, stride_dom, stride_dok, stride_dqm, stride_dqk,
                 OFF, LEFT, RIGHT,
                 HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, FUSE_DQ: tl.constexpr,
                 SPLIT_D: tl.constexpr):
    """Add the query blocks ``[lo, hi)`` of one query head to the resident (dK, dV) columns
    ``cols_k``/``cols_v``, and their ``dS K`` to dQ (float32, atomically) when ``FUSE_DQ``.

    One loop, whose edge blocks (outside ``[full_lo, full_hi)``) mask by a run-time
    branch: three loops (edge, middle, edge), as in the forward, make ptxas keep three
    sets of loop state next to the resident accumulators, and spill.
    """
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.arange(0, BLOCK_M)
    Qb = at_row(Q, lo, stride_qm)  # advanced one block per step
    DOb = at_row(DO, lo, stride_dom)
    DQb = at_row(DQ, lo, stride_dqm)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + rows
        q = load_tile(Qb, rows, offs_dk, stride_qm, stride_qk, LQ - start_m,
                      HEAD_DK, BLOCK_DK, True)  # (BLOCK_M, BLOCK_DK)
        lse = load_lse(LSE, offs_m, LQ)  # (BLOCK_M,) +inf for rows that see nothing
        st = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M) raw scores, transposed
        pt = tl.math.exp2(st * qk_scale - lse[None, :])  # P^T
        if (start_m < full_lo) | (start_m >= full_hi):  # an edge block of the band
            ok = visible(offs_m[None, :], offs_n[:, None], kv_len, OFF, LEFT, RIGHT,
                         HAS_LEFT, HAS_RIGHT)
            pt = tl.where(ok, pt, 0.0)
        do = load_tile(DOb, rows, offs_dv, stride_dom, stride_dok, LQ - start_m,
                       HEAD_DV, BLOCK_DV, True)  # (BLOCK_M, BLOCK_DV)
        if SPLIT_D == 1:
            qc = q
            doc = do
        else:  # this program's columns of q and dO (an L1/L2 re-read of the same rows)
            qc = load_tile(Qb, rows, cols_k, stride_qm, stride_qk, LQ - start_m,
                           HEAD_DK, BLOCK_DK, True)  # (BLOCK_M, BLOCK_DK // SPLIT_D)
            doc = load_tile(DOb, rows, cols_v, stride_dom, stride_dok, LQ - start_m,
                            HEAD_DV, BLOCK_DV, True)  # (BLOCK_M, BLOCK_DV // SPLIT_D)
        dv = tl.dot(pt.to(do.dtype), doc, dv)  # (BLOCK_N, BLOCK_DV // SPLIT_D)
        delta = tl.load(DELTA + offs_m, mask=offs_m < LQ, other=0.0)
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)  # dS^T, unscaled
        dk = tl.dot(dst, qc, dk)  # (BLOCK_N, BLOCK_DK // SPLIT_D)
        if FUSE_DQ:
            # This key block's share of dQ (this program's columns), computed transposed:
            # dQ^T = K^T dS^T puts the head dim (>= 64) on the MMA's M side, so Hopper's
            # wgmma reads K from shared memory; dS K with a short query block would fall
            # back to mma.sync, which holds all of K in registers (and spills).
            dqt = tl.dot(tl.trans(kc), dst)  # (BLOCK_DK // SPLIT_D, BLOCK_M)
            ptrs = DQb + rows[None, :] * stride_dqm + cols_k[:, None] * stride_dqk
            tl.atomic_add(ptrs, dqt, mask=(rows[None, :] < LQ - start_m)
                          & (cols_k[:, None] < HEAD_DK), sem="relaxed")
        Qb += BLOCK_M * stride_qm
        DOb += BLOCK_M * stride_dom
        DQb += BLOCK_M * stride_dqm
    return dk, dv


@triton.jit(do_not_specialize=["HQ", "HKV", "LQ", "LK", "OFF", "LEFT", "RIGHT", "GROUPS",
                               "SPLIT"])
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, LENGTHS,
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dks, stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                 stride_dvs, stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                 HQ, HKV, LQ, LK, scale, qk_scale, OFF, LEFT, RIGHT,
                 GROUPS, SPLIT,
                 HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                 FUSE_DQ: tl.constexpr, SPLIT_D: tl.constexpr):
    """Grid ``(cdiv(Lk, BLOCK_N) * SPLIT_D * SPLIT * B * Hkv,)``: dK, dV (SPLIT, B, Hkv, Lk,
    D), and dQ += dS K (fp32) when ``FUSE_DQ``.

    ``SPLIT_D`` programs share one key block, each with ``1 / SPLIT_D`` of the dK, dV
    columns (and of dQ's): the float32 accumulators of a 256-wide head do not fit the
    registers otherwise. Each recomputes the block's full ``S`` and ``dP``.
    """
    pid_n, pid_rest = tile_and_head(LK, BLOCK_N, False)  # key tiles of one head together
    part = pid_rest % SPLIT_D  # which columns of dK, dV
    pid_rest = pid_rest // SPLIT_D
    split = pid_rest % SPLIT  # this program's share of the group's query heads
    pid_bh = pid_rest // SPLIT
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    kv_len = tl.minimum(tl.load(LENGTHS + b), LK) if HAS_LENGTHS else LK
    n0 = pid_n * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    offs_n = n0 + rows
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    K += b.to(tl.int64) * stride_kz + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vz + kvh.to(tl.int64) * stride_vh
    cols_k = part * (BLOCK_DK // SPLIT_D) + tl.arange(0, BLOCK_DK // SPLIT_D)
    cols_v = part * (BLOCK_DV // SPLIT_D) + tl.arange(0, BLOCK_DV // SPLIT_D)
    K = at_row(K, n0, stride_kn)
    V = at_row(V, n0, stride_vn)
    k = load_tile(K, rows, offs_dk, stride_kn, stride_kk, kv_len - n0,
                  HEAD_DK, BLOCK_DK, True)  # (BLOCK_N, BLOCK_DK), resident
    v = load_tile(V, rows, offs_dv, stride_vn, stride_vk, kv_len - n0,
                  HEAD_DV, BLOCK_DV, True)  # (BLOCK_N, BLOCK_DV), resident
    if SPLIT_D == 1:
        kc = k
    else:
        kc = load_tile(K, rows, cols_k, stride_kn, stride_kk, kv_len - n0,
                       HEAD_DK, BLOCK_DK, True)  # (BLOCK_N, BLOCK_DK // SPLIT_D)
    dk = tl.zeros([BLOCK_N, BLOCK_DK // SPLIT_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV // SPLIT_D], tl.float32)

    # The query range that sees these keys: the band seen from the key side (a key j is
    # visible to query i iff j - OFF - RIGHT <= i <= j - OFF + LEFT). Keys at or past
    # kv_len see no query; their gradients stay 0.
    start, full_lo, full_hi, end = span(n0, tl.minimum(n0 + BLOCK_N, kv_len), LQ,
                                        -OFF, RIGHT, LEFT, HAS_RIGHT, HAS_LEFT, BLOCK_M)
    for g in range(split * GROUPS // SPLIT, (split + 1) * GROUPS // SPLIT):
        h = kvh * GROUPS + g  # a query head that reads this kv head
        Qh = Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
        DQh = DQ + b.to(tl.int64) * stride_dqz + h.to(tl.int64) * stride_dqh
        row = (b.to(tl.int64) * HQ + h) * LQ
        dk, dv = _dkdv_blocks(dk, dv, k, v, kc, Qh, DOh, DQh, LSE + row, DELTA + row,
                              offs_n, cols_k, cols_v, start, full_lo, full_hi, end, LQ,
                              kv_len, qk_scale, stride_qm, stride_qk, stride_dom, stride_dok,
                              stride_dqm, stride_dqk, OFF, LEFT, RIGHT,
                              HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_M,
                              HAS_LEFT, HAS_RIGHT, FUSE_DQ, SPLIT_D)

    real = (offs_n < kv_len)[:, None]  # padded keys get exactly 0, whatever the tile held
    dk = tl.where(real, dk * scale, 0.0)
    dv = tl.where(real, dv, 0.0)
    DK += (split.to(tl.int64) * stride_dks + b.to(tl.int64) * stride_dkz
           + kvh.to(tl.int64) * stride_dkh)
    DV += (split.to(tl.int64) * stride_dvs + b.to(tl.int64) * stride_dvz
           + kvh.to(tl.int64) * stride_dvh)
    store_tile(at_row(DK, n0, stride_dkn), dk.to(DK.dtype.element_ty), rows, cols_k,
               stride_dkn, stride_dkk, LK - n0, HEAD_DK, BLOCK_DK)
    store_tile(at_row(DV, n0, stride_dvn), dv.to(DV.dtype.element_ty), rows, cols_v,
               stride_dvn, stride_dvk, LK - n0, HEAD_DV, BLOCK_DV)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K, V, offs_m, lo, full_lo, full_hi, hi, kv_len,
               qk_scale, stride_kn, stride_kk, stride_vn, stride_vk, OFF, LEFT, RIGHT,
               HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Add the key blocks ``[lo, hi)`` to the resident dQ; blocks outside
    ``[full_lo, full_hi)`` mask (one loop, as in the forward)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.arange(0, BLOCK_N)
    Kb = at_row(K, lo, stride_kn)  # advanced one block per step
    Vb = at_row(V, lo, stride_vn)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + rows
        k = load_tile(Kb, rows, offs_dk, stride_kn, stride_kk, kv_len - start_n,
                      HEAD_DK, BLOCK_DK, True)  # (BLOCK_N, BLOCK_DK)
        v = load_tile(Vb, rows, offs_dv, stride_vn, stride_vk, kv_len - start_n,
                      HEAD_DV, BLOCK_DV, True)  # (BLOCK_N, BLOCK_DV)
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):  # an edge block: mask
            ok = visible(offs_m[:, None], offs_n[None, :], kv_len, OFF, LEFT, RIGHT,
                         HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)  # (BLOCK_M, BLOCK_DK)
        Kb += BLOCK_N * stride_kn
        Vb += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["H", "LQ", "LK", "OFF", "LEFT", "RIGHT", "GROUPS"])
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LENGTHS,
               stride_qz, stride_qh, stride_qm, stride_qk,
               stride_kz, stride_kh, stride_kn, stride_kk,
               stride_vz, stride_vh, stride_vn, stride_vk,
               stride_doz, stride_doh, stride_dom, stride_dok,
               stride_dqz, stride_dqh, stride_dqm, stride_dqk,
               H, LQ, LK, scale, qk_scale, OFF, LEFT, RIGHT,
               GROUPS,
               HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M) * B * Hq,)``: dQ (B, Hq, Lq, Dk)."""
    pid_m, pid_bh = tile_and_head(LQ, BLOCK_M, HAS_RIGHT)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    kv_len = tl.minimum(tl.load(LENGTHS + b), LK) if HAS_LENGTHS else LK
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_dk = tl.arange(0, BLOCK_DK)
    K += b.to(tl.int64) * stride_kz + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vz + kvh.to(tl.int64) * stride_vh
    Q += b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
    q = load_tile(at_row(Q, m0, stride_qm), rows, offs_dk, stride_qm, stride_qk, LQ - m0,
                  HEAD_DK, BLOCK_DK, True)  # (BLOCK_M, BLOCK_DK)
    do = load_tile(at_row(DO, m0, stride_dom), rows, tl.arange(0, BLOCK_DV), stride_dom,
                   stride_dok, LQ - m0, HEAD_DV, BLOCK_DV, True)  # (BLOCK_M, BLOCK_DV)
    row = pid_bh.to(tl.int64) * LQ
    lse = load_lse(LSE + row, offs_m, LQ)  # (BLOCK_M,)
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < LQ, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)

    start, full_lo, full_hi, end = span(m0, tl.minimum(m0 + BLOCK_M, LQ), kv_len,
                                        OFF, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, offs_m, start, full_lo, full_hi, end, kv_len,
                    qk_scale, stride_kn, stride_kk, stride_vn, stride_vk, OFF, LEFT, RIGHT,
                    HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    DQ += b.to(tl.int64) * stride_dqz + h.to(tl.int64) * stride_dqh
    store_tile(at_row(DQ, m0, stride_dqm), (dq * scale).to(DQ.dtype.element_ty), rows,
               offs_dk, stride_dqm, stride_dqk, LQ - m0, HEAD_DK, BLOCK_DK)


def backward(do, q, k, v, out, lse, lengths, scale: float, left: int | None,
             right: int | None, deterministic: bool = False):
    """Gradients of :func:`qkv.kernels.triton.fwd.forward`'s output.

    Args:
        do: (B, Hq, Lq, Dv), the gradient of ``out``; any strides (even 0).
        q, k, v, lengths, scale, left, right: as given to the forward.
        out: (B, Hq, Lq, Dv) and lse: (B, Hq, Lq) float32, as the forward returned them.
        deterministic: compute dQ in its own pass (bitwise reproducible) instead of with
            float32 atomics in the dK/dV pass (faster: five matmuls per block, not seven).

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    b, hq, lq, dk_ = q.shape
    hkv, lk, dv_ = k.shape[1], k.shape[2], v.shape[3]
    if lq == 0 or b * hq == 0 or lk == 0:  # no query or no key: nothing flows back
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    delta = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
    bdk, bdv = block_dim(dk_), block_dim(dv_)
    band = band_args(lq, lk, left, right)
    lens = lengths if lengths is not None else delta
    groups = hq // hkv
    common = dict(HEAD_DK=dk_, HEAD_DV=dv_, BLOCK_DK=bdk, BLOCK_DV=bdv,
                  HAS_LEFT=band["HAS_LEFT"], HAS_RIGHT=band["HAS_RIGHT"],
                  HAS_LENGTHS=lengths is not None)
    bands = (band["OFF"], band["LEFT"], band["RIGHT"])
    arch = autotune.arch_of(q.device)
    shape_class = (str(q.device), q.dtype, dk_, dv_, band["HAS_LEFT"], band["HAS_RIGHT"],
                   autotune.bucket(lq), autotune.bucket(lk), autotune.bucket(b * hq),
                   groups > 1, deterministic)

    block = 64
    launch(_delta_kernel, (triton.cdiv(lq, block) * b * hq,),
           out, do, delta, *out.stride(), *do.stride(), hq, lq,
           HEAD_DV=dv_, BLOCK_DV=bdv, BLOCK_M=block)

    # dQ: float32 atomics from the dK/dV pass, or its own pass when deterministic.
    if deterministic:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, Hq, Lq, Dk)
        dq_acc = dq  # not written by the dK/dV pass
    else:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (B, Hq, Lq, Dk)

    cands = autotune.candidates("dkdv", max(bdk, bdv), arch)
    dk = dv = None

    def run_dkdv(cfg: autotune.Config) -> None:
        nonlocal dk, dv
        # GQA/MQA: split a group's query heads over programs when the kv heads alone would
        # leave the GPU idle; each split writes its own float32 slice, summed below.
        tiles = triton.cdiv(lk, cfg.block_n) * b * hkv
        split = split_heads(groups, tiles, arch)
        if split == 1:
            dk = torch.empty(1, *k.shape, dtype=k.dtype, device=k.device)  # (1, B, Hkv, Lk, Dk)
            dv = torch.empty(1, *v.shape, dtype=v.dtype, device=v.device)  # (1, B, Hkv, Lk, Dv)
        else:
            dk = torch.empty(split, *k.shape, dtype=torch.float32, device=k.device)
            dv = torch.empty(split, *v.shape, dtype=torch.float32, device=v.device)
        if not deterministic:
            dq_acc.zero_()  # the tuner runs this more than once
        launch(_dkdv_kernel, (tiles * split * cfg.split_d,),
               q, k, v, do, lse, delta, dk, dv, dq_acc, lens,
               *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
               *dv.stride(), *dq_acc.stride(), hq, hkv, lq, lk, scale, scale * LOG2E, *bands,
               groups, split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
               FUSE_DQ=not deterministic, SPLIT_D=cfg.split_d, **common,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    run_dkdv(autotune.choose(("dkdv", *shape_class), cands, run_dkdv))
    dk = dk[0] if dk.shape[0] == 1 else dk.sum(0).to(k.dtype)  # (B, Hkv, Lk, Dk)
    dv = dv[0] if dv.shape[0] == 1 else dv.sum(0).to(v.dtype)  # (B, Hkv, Lk, Dv)
    if not deterministic:
        return (dq_acc * scale).to(q.dtype), dk, dv

    def run_dq(cfg: autotune.Config) -> None:
        launch(_dq_kernel, (triton.cdiv(lq, cfg.block_m) * b * hq,),
               q, k, v, do, lse, delta, dq, lens,
               *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
               hq, lq, lk, scale, scale * LOG2E, *bands, groups,
               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cands = autotune.candidates("dq", max(bdk, bdv), arch)
    run_dq(autotune.choose(("dq", *shape_class), cands, run_dq))
    return dq, dk, dv


#: Streaming multiprocessors assumed when the device cannot be asked (compiling offline).
_SMS = {80: 108, 90: 132, 100: 148}


def split_heads(groups: int, tiles: int, arch: int | None) -> int:
    """How many programs share a GQA group's query heads in the dK/dV pass: enough that
    ``tiles * split`` programs fill the GPU twice over, at most one head each."""
    if groups == 1:
        return 1
    if arch is None:  # the interpreter: split in two, so that the tests cover splitting
        return min(groups, 2)
    sms = _SMS.get(arch, 132)
    if torch.cuda.is_available() and offline.active() is None:
        sms = _sm_count(torch.cuda.current_device())
    return max(1, min(groups, -(-2 * sms // tiles)))


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
