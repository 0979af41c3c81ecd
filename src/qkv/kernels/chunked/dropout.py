"""Dropout that the backward can regenerate without storing a mask.

The keep/drop decision for the weight of query ``i`` on key ``j`` of batch row ``b`` and
head ``h`` is a hash of ``(seed, b, h, i, j)`` (:func:`dropout_keep`), so the backward
regenerates exactly the forward's mask and the mask does not depend on the block sizes.
The seed is drawn once per call (:func:`draw_seed`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["draw_seed", "dropout_keep"]

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

