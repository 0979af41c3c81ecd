"""The KV cache for incremental decoding: keys and values of the tokens seen so far."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Self-attention: each decoding step appends the new tokens' keys/values and attends to
    everything cached (``causal=True`` with bottom-right alignment makes a one-token step
    equal the matching row of the full causal forward). Cross-attention: the first call
    stores the projected context; later calls reuse it and ignore ``context``.

    Storage grows by doubling, so appending one token at a time costs amortised O(1)
    copies instead of re-concatenating the whole history.
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None  # (B, Hkv, capacity, D)
        self._v: Tensor | None = None  # (B, Hkv, capacity, Dv)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def k(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]  # (B, Hkv, L, D)

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]  # (B, Hkv, L, Dv)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add keys ``(B, Hkv, T, D)`` and values ``(B, Hkv, T, Dv)``; return all so far."""
        if not isinstance(k, Tensor) or not isinstance(v, Tensor):
            raise TypeError(f"KVCache.append expects tensors k and v; got "
                            f"{type(k).__name__} and {type(v).__name__}. Fix: pass "
                            "torch.as_tensor(k), torch.as_tensor(v)")
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"KVCache.append expects k (B, H, T, D) and v (B, H, T, Dv); got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}. Fix: one value per key, "
                             "both shaped (batch, heads, tokens, dim)")
        t = k.shape[2]
        if self._k is None:
            if k.dtype != v.dtype or k.device != v.device or not k.is_floating_point():
                raise TypeError(f"KVCache.append expects floating-point k and v of one dtype "
                                f"on one device; got {k.dtype} on {k.device} and {v.dtype} on "
                                f"{v.device}. Fix: v.to(k)")
            cap = max(16, t)
            self._k = k.new_empty(*k.shape[:2], cap, k.shape[3])
            self._v = v.new_empty(*v.shape[:2], cap, v.shape[3])
        elif (k.shape[:2] != self._k.shape[:2] or k.shape[3] != self._k.shape[3]
              or v.shape[3] != self._v.shape[3]):
            raise ValueError(f"KVCache holds keys {tuple(self._k.shape[:2])}+(L, "
                             f"{self._k.shape[3]}); cannot append {tuple(k.shape)}. The batch "
                             "and heads must stay the same. Fix: reorder() selects beams; "
                             "reset() starts over")
        elif k.dtype != self._k.dtype or v.dtype != self._v.dtype or k.device != self._k.device \
                or v.device != self._v.device:
            raise TypeError(f"KVCache holds {self._k.dtype} on {self._k.device}; cannot append "
                            f"{k.dtype} on {k.device} and {v.dtype} on {v.device} without "
                            "changing them. Fix: k.to(cache.k), or reset() to start over")
        return self._append_own(k, v)

    def _reserve(self, capacity: int) -> None:
        """Grow the storage to ``capacity`` tokens now: appends up to it will not move it."""
        if self._k is not None and capacity > self._k.shape[2]:
            for name in ("_k", "_v"):
                old = getattr(self, name)  # (B, Hkv, capacity, D|Dv)
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)

    def _append_own(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`append` without its checks, for k and v of the kind the cache holds."""
        need = self.length + k.shape[2]
        if need > self._k.shape[2]:
            self._reserve(max(need, 2 * self._k.shape[2]))
        self._k.narrow(2, self.length, need - self.length).copy_(k)  # [:, :, a:b], cheaper
        self._v.narrow(2, self.length, need - self.length).copy_(v)
        self.length = need
        return self._k.narrow(2, 0, need), self._v.narrow(2, 0, need)  # (B, Hkv, L, D|Dv)

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams): ``index (B',)``."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (
            torch.int32, torch.int64
        ):
            got = (f"{index.dtype} of shape {tuple(index.shape)}" if isinstance(index, Tensor)
                   else type(index).__name__)
            raise TypeError(f"KVCache.reorder expects an int64 tensor of batch rows (B',); got "
                            f"{got}. Fix: torch.tensor(rows, dtype=torch.long)")
        if self._k is not None:
            b = self._k.shape[0]
            if index.numel() and (int(index.min()) < -b or int(index.max()) >= b):
                raise ValueError(f"KVCache.reorder: rows must be in 0..{b - 1} (the cache holds "
                                 f"{b} rows); got {index.tolist()}. Fix: select among the "
                                 "rows the cache holds")
            if index.device != self._k.device:
                raise ValueError(f"KVCache.reorder: index is on {index.device} but the cache on "
                                 f"{self._k.device}. Fix: index.to(cache.k.device)")
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)

    def _reorder_in_place(self, index: Tensor) -> None:
        """:meth:`reorder` for an owner that holds no view of the cache (beam search): the
        kept rows are written into the same storage, so views made of it stay valid (the
        lean decoding step's) and only the tokens so far are copied, not the capacity."""
        if self._k is not None:
            for buf in (self._k, self._v):  # (B, Hkv, capacity, D|Dv)
                used = buf.narrow(2, 0, self.length)  # (B, Hkv, L, D|Dv)
                used.copy_(used.index_select(0, index))

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
