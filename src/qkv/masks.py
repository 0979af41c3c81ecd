"""Every way of hiding keys from queries, reduced to one canonical form.

A call to :func:`qkv.attention` may combine a boolean mask, an additive float mask, a causal
rule and a local window. They are all folded into one :class:`Mask`:

* a *band* of visible keys per query, from ``causal`` and ``window``. With
  ``off = Lk - Lq`` (bottom-right alignment), query ``i`` may see key ``j`` iff
  ``-left <= j - (i + off) <= right``; ``causal`` sets ``right = min(right, 0)``;
* ``allowed``: an optional bool tensor, True = may attend, 4-D and broadcastable to
  ``(B, Hq, Lq, Lk)`` (size-1 dims are kept, never expanded);
* ``bias``: an optional float tensor added to the scaled scores, same broadcasting;
  ``-inf`` entries hide their key exactly like ``allowed=False`` does.

Backends ask the mask for the rectangle of queries ``q0:q1`` and keys ``k0:k1`` they are
about to compute (:meth:`Mask.block`), and whether a rectangle is hidden entirely by the
band (:meth:`Mask.band_block_state`), so they can skip it without looking at it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

__all__ = ["BlockState", "Mask", "causal_mask", "padding_mask", "window_mask"]


class BlockState(Enum):
    """What the band (causal/window) does to a rectangle of queries x keys."""

    HIDDEN = 0  # every query of the rectangle is barred from every key: skip it
    PARTIAL = 1  # some pairs are visible, some are not: apply the band element-wise
    VISIBLE = 2  # the band hides nothing in it (tensor masks may still apply)


@dataclass(frozen=True)
class Mask:
    """The canonical mask of one attention call (see the module docstring).

    ``lq``/``lk`` are the query and key lengths; ``left``/``right`` bound the band
    (``None`` = unbounded on that side); ``allowed`` and ``bias`` are 4-D tensors that
    broadcast to ``(B, Hq, Lq, Lk)``.
    """

    lq: int
    lk: int
    causal: bool = False
    left: int | None = None
    right: int | None = None
    allowed: Tensor | None = None  # bool (B|1, Hq|1, Lq|1, Lk|1), True = may attend
    bias: Tensor | None = None  # float (B|1, Hq|1, Lq|1, Lk|1), added to scaled scores

    # ---- what kind of mask this is ------------------------------------------------------
    @property
    def offset(self) -> int:
        """Diagonal offset of the bottom-right alignment: query i lines up with key i+offset."""
        return self.lk - self.lq

    @property
    def has_band(self) -> bool:
        return self.left is not None or self.right is not None

    @property
    def has_tensor(self) -> bool:
        return self.allowed is not None or self.bias is not None

    @property
    def is_empty(self) -> bool:
        """True when nothing is hidden and nothing is added."""
        return not self.has_band and not self.has_tensor

    # ---- the band ------------------------------------------------------------------------
    def band_block_state(self, q0: int, q1: int, k0: int, k1: int) -> BlockState:
        """Classify the rectangle queries [q0, q1) x keys [k0, k1) under the band alone."""
        if not self.has_band:
            return BlockState.VISIBLE
        # Relative position d = j - (i + off) ranges over [k0 - (q1-1) - off, k1-1 - q0 - off].
        d_min = k0 - (q1 - 1) - self.offset
        d_max = (k1 - 1) - q0 - self.offset
        lo = -self.left if self.left is not None else None
        hi = self.right
        if (hi is not None and d_min > hi) or (lo is not None and d_max < lo):
            return BlockState.HIDDEN
        if (hi is None or d_max <= hi) and (lo is None or d_min >= lo):
            return BlockState.VISIBLE
        return BlockState.PARTIAL

    def band(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> Tensor | None:
        """Bool (q1-q0, k1-k0), True = visible under the band; None when the band is absent."""
        if not self.has_band:
            return None
        i = torch.arange(q0, q1, device=device).unsqueeze(1)  # (bq, 1)
        j = torch.arange(k0, k1, device=device).unsqueeze(0)  # (1, bk)
        d = j - (i + self.offset)  # (bq, bk)
        ok = torch.ones_like(d, dtype=torch.bool)
        if self.right is not None:
            ok &= d <= self.right
        if self.left is not None:
            ok &= d >= -self.left
        return ok

    # ---- one rectangle of the full mask --------------------------------------------------
    def block(
        self, q0: int, q1: int, k0: int, k1: int, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """The mask restricted to queries [q0, q1) and keys [k0, k1).

        Returns ``(allowed, bias)``: ``allowed`` is a bool tensor broadcastable to
        ``(B, Hq, q1-q0, k1-k0)`` that combines the band, the bool mask and the ``-inf``
        entries of the bias (None when everything is visible); ``bias`` is the additive part
        (None when there is none). Broadcast dimensions stay of size 1.
        """
        allowed = None
        state = self.band_block_state(q0, q1, k0, k1)
        if state is BlockState.HIDDEN:
            return torch.zeros(1, 1, q1 - q0, k1 - k0, dtype=torch.bool, device=device), None
        if state is BlockState.PARTIAL:
            allowed = self.band(q0, q1, k0, k1, device)[None, None]  # (1, 1, bq, bk)
        if self.allowed is not None:
            t = _slice_last2(self.allowed, q0, q1, k0, k1)
            allowed = t if allowed is None else allowed & t
        bias = None
        if self.bias is not None:
            bias = _slice_last2(self.bias, q0, q1, k0, k1)
            finite = bias != float("-inf")
            allowed = finite if allowed is None else allowed & finite
        return allowed, bias

    def dense(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """The whole mask: ``block(0, lq, 0, lk)``."""
        return self.block(0, self.lq, 0, self.lk, device)

    def key_lengths(self) -> Tensor | None:
        """Keys per batch row, int64 (B|1,), when the tensor mask is only key padding.

        That is: no bias, and ``allowed`` of shape (B|1, 1, 1, Lk|1) whose every row is True
        on a prefix of the keys and False after it (what :func:`padding_mask` builds); key
        ``j`` of row ``b`` is then hidden iff ``j >= lengths[b]``. None for any other mask
        (or none). Reads the mask's values, so a CUDA mask costs one synchronisation.
        """
        a = self.allowed
        if a is None or self.bias is not None or a.shape[1] != 1 or a.shape[2] != 1:
            return None
        keep = a[:, 0, 0, :].expand(a.shape[0], self.lk)  # (B|1, Lk)
        lengths = keep.sum(dim=-1)  # (B|1,)
        prefix = torch.arange(self.lk, device=a.device) < lengths[:, None]  # (B|1, Lk)
        return lengths if torch.equal(prefix, keep) else None

    # ---- keys no query can see -----------------------------------------------------------
    def band_key_range(self) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that the band (causal/window) lets at least one query see.

        Query ``i`` sees keys ``i + off - left .. i + off + right``; over all queries these
        windows overlap (each is at least one key wide and moves by one), so their union is
        one range: ``[off - left, Lq - 1 + off + right]``, clipped to ``[0, Lk)``. Keys
        outside it are hidden from every query. ``(0, 0)`` when no query sees any key.
        """
        if self.lq == 0:
            return 0, 0
        lo = 0 if self.left is None else max(0, self.offset - self.left)
        hi = self.lk if self.right is None else min(self.lk,
                                                    self.lq + self.offset + self.right)
        return (lo, hi) if lo < hi else (0, 0)

    def hidden_keys(self, num_kv_heads: int, *, tensor: bool = True, band: bool = True,
                    device: torch.device | None = None) -> Tensor | None:
        """Bool (B|1, Hkv|1, Lk, 1): True where a key is hidden from *every* query.

        Used to zero such keys and values before any matmul, so that NaN or inf stored in
        padding never reaches an output through ``0 * NaN``. ``tensor``: count keys the bool
        mask or ``-inf`` bias hides from every query; ``band``: count keys outside
        :meth:`band_key_range` (a range, no dense mask; built on ``device``). None when no
        key is hidden.
        Conservative: a key hidden only by the combination of the band and a tensor mask
        is not reported.
        """
        hidden = None
        if tensor and self.has_tensor:
            for t in (self.allowed, None if self.bias is None else self.bias != float("-inf")):
                if t is None:
                    continue
                col = ~t.any(dim=-2)  # (B|1, Hq|1, Lk|1)
                hidden = col if hidden is None else hidden | col
            b, h, lk = hidden.shape
            if h > 1:  # a kv head's key is hidden only if all its query heads are barred
                hidden = hidden.reshape(b, num_kv_heads, h // num_kv_heads, lk).all(dim=2)
            if not bool(hidden.any()):
                hidden = None
        if band and self.has_band:
            lo, hi = self.band_key_range()
            if (lo, hi) != (0, self.lk):
                j = torch.arange(self.lk, device=device)
                outside = ((j < lo) | (j >= hi))[None, None]  # (1, 1, Lk)
                hidden = outside if hidden is None else hidden | outside
        if hidden is None:
            return None
        return hidden.expand(hidden.shape[0], hidden.shape[1], self.lk).unsqueeze(-1)


def _slice_last2(t: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor:
    """Slice the (Lq, Lk) dims of a broadcastable 4-D mask, leaving size-1 dims alone."""
    rows = slice(None) if t.shape[-2] == 1 else slice(q0, q1)
    cols = slice(None) if t.shape[-1] == 1 else slice(k0, k1)
    return t[..., rows, cols]


# ---- checks shared by qkv.attention and the builders ------------------------------------------
def parse_window(window) -> tuple[int | None, int | None]:
    """``window`` as (left, right), each an int >= 0 or None (unbounded); refuses others."""
    if window is None:
        return None, None
    if isinstance(window, bool):
        raise TypeError(f"window must be an int or a (left, right) pair; got {window!r}. "
                        "Fix: window=(128, 0) for 128 keys to the left and none to the right")
    if isinstance(window, numbers.Integral):
        window = (window, window)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be an int w or a (left, right) pair; got {window!r}. "
                        "Fix: window=(128, 0) for 128 keys to the left and none to the right")
    out = []
    for side, w in zip(("left", "right"), window, strict=True):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {side} must be an int or None; got {w!r}. Fix: "
                            f"window=(left, right) with ints, None for no bound")
        if w < 0:
            raise ValueError(f"window {side} must be >= 0; got {w}. Fix: window=(left, right) "
                             "counts keys on each side of the query's own position")
        out.append(int(w))
    return out[0], out[1]


def _check_length(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int (a number of tokens); got {n!r}. "
                        f"Fix: pass int({name})")
    if n < 0:
        raise ValueError(f"{name} must be >= 0; got {n}. Fix: pass the number of tokens")
    return int(n)


def _device(device) -> torch.device:
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device; got {device!r}. "
                         "Fix: device='cpu' or device=q.device") from None
    if dev.type == "meta":
        raise ValueError("device is 'meta', which holds no values; a mask must hold them. "
                         "Fix: build it on q's device")
    return dev


# ---- mask builders for users ----------------------------------------------------------------
def causal_mask(lq: int, lk: int | None = None, *, device=None) -> Tensor:
    """Bool (Lq, Lk), True = may attend, bottom-right aligned: j <= i + (Lk - Lq)."""
    lq = _check_length("lq", lq)
    lk = lq if lk is None else _check_length("lk", lk)
    m = Mask(lq, lk, causal=True, right=0)
    return m.band(0, lq, 0, lk, _device(device))


def window_mask(lq: int, lk: int | None = None, window=0, *, device=None) -> Tensor:
    """Bool (Lq, Lk) of a local window ``(left, right)`` (or an int w for (w, w))."""
    lq = _check_length("lq", lq)
    lk = lq if lk is None else _check_length("lk", lk)
    left, right = parse_window(window)
    m = Mask(lq, lk, left=left, right=right)
    if not m.has_band:  # window=None or (None, None): nothing hidden
        return torch.ones(lq, lk, dtype=torch.bool, device=_device(device))
    return m.band(0, lq, 0, lk, _device(device))


def padding_mask(lengths_or_keep: Tensor, max_len: int | None = None) -> Tensor:
    """A key-padding mask shaped (B, 1, 1, Lk) for :func:`qkv.attention`, True = real key.

    Accepts either lengths ``(B,)`` (integers; ``max_len`` defaults to their maximum) or a
    bool ``(B, Lk)`` tensor that is True on real keys.
    """
    t = lengths_or_keep
    if not isinstance(t, Tensor):
        raise TypeError("padding_mask expects a tensor of lengths (B,) or a bool (B, Lk); "
                        f"got {type(t).__name__}. Fix: padding_mask(torch.tensor(lengths))")
    if t.device.type == "meta":
        raise ValueError("padding_mask got a tensor on the meta device, which holds no "
                         "values. Fix: pass the lengths on q's device")
    if t.dtype == torch.bool:
        if t.dim() != 2:
            raise ValueError(f"a bool padding mask must have shape (B, Lk); got "
                             f"{tuple(t.shape)}. Fix: one row of True (real) / False "
                             "(padding) per batch row")
        if max_len is not None:
            raise TypeError("max_len goes with lengths, not with a bool (B, Lk) mask, whose "
                            "Lk is its width. Fix: leave max_len out")
        return t[:, None, None, :]  # (B, 1, 1, Lk)
    if t.is_floating_point() or t.is_complex() or t.dim() != 1:
        raise ValueError(
            "lengths must be an integer tensor of shape (B,); got dtype "
            f"{t.dtype}, shape {tuple(t.shape)}. Fix: torch.tensor([3, 5]) for two rows of "
            "3 and 5 real keys"
        )
    if max_len is not None:
        max_len = _check_length("max_len", max_len)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"lengths must be >= 0; got {t.tolist()}. Fix: count real keys "
                         "per row")
    lk = int(t.max()) if max_len is None and t.numel() else (max_len or 0)
    if t.numel() and int(t.max()) > lk:
        raise ValueError(f"a length of {int(t.max())} exceeds max_len={lk}. Fix: "
                         f"max_len={int(t.max())} or more")
    keep = torch.arange(lk, device=t.device)[None, :] < t[:, None]  # (B, Lk)
    return keep[:, None, None, :]
