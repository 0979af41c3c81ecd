"""The weights kernel: the exact attention weights, from the forward's saved log-sum-exp.

``weights[i, j] = exp2(s'_ij - lse_i)`` where ``s'`` are the scaled scores in log2 units and
``lse`` the forward's log-sum-exp of row ``i``: each tile of the (Lq, Lk) map is one
independent program, so viewers get every weight at the cost of one more pass over q and
k, instead of running the materialising math path. Hidden pairs, and every pair of a query
that sees no key, are exactly 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .common import LOG2E, at_row, band_args, block_dim, launch, load_lse, load_tile, visible


@triton.jit(do_not_specialize=["H", "LQ", "LK", "OFF", "LEFT", "RIGHT", "GROUPS"])
def _weights_kernel(Q, K, LSE, W, LENGTHS,
                    stride_qz, stride_qh, stride_qm, stride_qk,
                    stride_kz, stride_kh, stride_kn, stride_kk,
                    stride_wz, stride_wh, stride_wm, stride_wn,
                    H, LQ, LK, qk_scale, OFF, LEFT, RIGHT,
                    GROUPS, HEAD_DK: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_LENGTHS: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M) * cdiv(Lk, BLOCK_N) * B * Hq,)``: W (B, Hq, Lq, Lk)."""
    n_n = (LK + BLOCK_N - 1) // BLOCK_N
    n_tiles = (LQ + BLOCK_M - 1) // BLOCK_M * n_n
    pid = tl.program_id(0)
    pid_bh = pid // n_tiles  # the tiles of one head are consecutive programs
    pid_m = (pid % n_tiles) // n_n
    pid_n = pid % n_n
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    kv_len = tl.minimum(tl.load(LENGTHS + b), LK) if HAS_LENGTHS else LK
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rows_m = tl.arange(0, BLOCK_M)
    rows_n = tl.arange(0, BLOCK_N)
    offs_m = m0 + rows_m
    offs_n = n0 + rows_n
    offs_d = tl.arange(0, BLOCK_DK)
    Q += b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kz + kvh.to(tl.int64) * stride_kh
    q = load_tile(at_row(Q, m0, stride_qm), rows_m, offs_d, stride_qm, stride_qk, LQ - m0,
                  HEAD_DK, BLOCK_DK, True)  # (BLOCK_M, BLOCK_DK)
    k = load_tile(at_row(K, n0, stride_kn), rows_n, offs_d, stride_kn, stride_kk,
                  kv_len - n0, HEAD_DK, BLOCK_DK, True)  # (BLOCK_N, BLOCK_DK)
    lse = load_lse(LSE + pid_bh.to(tl.int64) * LQ, offs_m, LQ)  # (BLOCK_M,)
    s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
    t = s * qk_scale  # (BLOCK_M, BLOCK_N) scaled scores, log2 units
    p = tl.math.exp2(t - lse[:, None])
    ok = visible(offs_m[:, None], offs_n[None, :], kv_len, OFF, LEFT, RIGHT,
                 HAS_LEFT, HAS_RIGHT)
    # A -inf score hides its key like the mask: weight 0, even in a row whose lse is NaN
    # (a NaN or +inf score elsewhere in it), where exp2(-inf - NaN) would be NaN.
    p = tl.where(ok & (t != float("-inf")), p, 0.0)
    # The tile's corner in 64 bits (m0 * Lk passes 2**31 for large maps), then small offsets.
    W += (b.to(tl.int64) * stride_wz + h.to(tl.int64) * stride_wh
          + m0.to(tl.int64) * stride_wm + n0.to(tl.int64) * stride_wn)
    ptrs = W + rows_m[:, None] * stride_wm + rows_n[None, :] * stride_wn
    tl.store(ptrs, p.to(W.dtype.element_ty),
             mask=(rows_m[:, None] < LQ - m0) & (rows_n[None, :] < LK - n0))


def attention_weights(q, k, lse, lengths, scale: float, left: int | None,
                      right: int | None):
    """Weights (B, Hq, Lq, Lk) in q's dtype, from q (B, Hq, Lq, Dk), k (B, Hkv, Lk, Dk) and
    the forward's ``lse`` (B, Hq, Lq) (log2 units); rows sum to 1, or 0 for a hidden row."""
    b, hq, lq, dk = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    w = torch.empty(b, hq, lq, lk, dtype=q.dtype, device=q.device)  # (B, Hq, Lq, Lk)
    if w.numel() == 0:
        return w
    bdk = block_dim(dk)
    band = band_args(lq, lk, left, right)
    cfg = autotune.candidates("weights", bdk, autotune.arch_of(q.device))[0]
    grid = (triton.cdiv(lq, cfg.block_m) * triton.cdiv(lk, cfg.block_n) * b * hq,)
    launch(_weights_kernel, grid,
        q, k, lse, w, lengths if lengths is not None else lse,
        *q.stride(), *k.stride(), *w.stride(),
        hq, lq, lk, scale * LOG2E, band["OFF"], band["LEFT"], band["RIGHT"],
        GROUPS=hq // hkv, HEAD_DK=dk, BLOCK_DK=bdk, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_LEFT=band["HAS_LEFT"], HAS_RIGHT=band["HAS_RIGHT"], HAS_LENGTHS=lengths is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return w
