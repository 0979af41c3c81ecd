"""Where a token stands: sinusoidal position encodings and rotary position embeddings.

Attention by itself is blind to order (permuting the keys permutes nothing in the output
but the order of the weights). Two ways of telling it where each token is:

* :func:`sinusoidal` - the table of "Attention Is All You Need", added to the token
  embeddings: dimension ``2i`` holds ``sin(pos / base^(2i/D))``, dimension ``2i+1`` holds
  ``cos(pos / base^(2i/D))``. Each pair of dimensions is a clock at its own frequency.
* :class:`RotaryEmbedding` - rotates each pair of query/key dimensions by an angle
  proportional to the position (RoFormer). The dot product of a query at ``m`` and a key at
  ``n`` then depends on their content and on ``m - n`` only, so attention sees relative
  positions. :class:`qkv.MultiHeadAttention` applies it to queries and keys when built with
  ``rotary=``, shifting positions by the KV-cache length during incremental decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "sinusoidal"]


def _check_dim(name: str, dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"{name} must be an even int >= 2 (dimensions come in sin/cos "
                         f"pairs); got {dim!r}. Fix: an even size, such as 64")


def _inverse_frequencies(dim: int, base: float, device=None) -> Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. dim/2 - 1``, in float64 for exact tables."""
    i = torch.arange(0, dim, 2, dtype=torch.float64, device=device)  # (dim/2,)
    return base ** (-i / dim)  # (dim/2,)


def sinusoidal(length: int, dim: int, *, offset: int = 0, base: float = 10000.0,
               dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The sinusoidal position table of positions ``offset .. offset + length - 1``.

    Returns a ``(length, dim)`` tensor: ``table[p, 2i] = sin(pos / base^(2i/dim))`` and
    ``table[p, 2i+1] = cos(pos / base^(2i/dim))`` with ``pos = offset + p``. Computed in
    float64 and then cast, so row ``p`` of a long table equals row 0 of a table that starts
    at ``offset=p`` (incremental decoding relies on this).
    """
    _check_dim("dim", dim)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0; got {length!r}. Fix: the number of "
                         "positions")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0; got {offset!r}. Fix: the first "
                         "position, 0 or more")
    pos = torch.arange(offset, offset + length, dtype=torch.float64, device=device)  # (L,)
    angle = pos[:, None] * _inverse_frequencies(dim, base, device)[None, :]  # (L, dim/2)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1)  # (L, dim/2, 2)
    return table.reshape(length, dim).to(dtype)  # (L, dim)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for queries and keys of one head size.

    ``rotary(x, offset)`` takes ``x (B, H, L, Dh)`` whose row ``l`` stands at position
    ``offset + l`` and returns a tensor of the same shape and dtype in which each pair of
    dimensions ``(2i, 2i+1)`` is rotated by the angle ``pos * base^(-2i/Dh)``. Rotations
    keep norms, and ``<rotary(q, m), rotary(k, n)>`` depends on ``m - n`` only.

    Args:
        head_dim: Dh, even.
        base: the longest wavelength is ``2*pi*base``.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        _check_dim("head_dim", head_dim)
        if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 1:
            raise ValueError(f"base must be a number > 1; got {base!r}. Fix: base=10000.0")
        self.head_dim = head_dim
        self.base = float(base)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def _cos_sin(self, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles of positions ``0 .. end-1``, each ``(end, Dh/2)``."""
        c = self._cache
        if c is None or c[0] < end or c[1] != device:
            n = max(end, 2 * c[0] if c is not None else 64)
            pos = torch.arange(n, dtype=torch.float64, device=device)  # (n,)
            angle = pos[:, None] * _inverse_frequencies(self.head_dim, self.base, device)
            c = (n, device, angle.cos(), angle.sin())  # (n, Dh/2) each, float64
            self._cache = c
        return c[2][:end], c[3][:end]

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary expects x of shape (B, H, L, {self.head_dim}); got "
                             f"{tuple(x.shape)}. Fix: split the heads first, head dim "
                             f"{self.head_dim}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0; got {offset!r}. Fix: the position "
                             "of x's first row (the KV-cache length)")
        length = x.shape[2]
        cos, sin = self._cos_sin(offset + length, x.device)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos = cos[offset:].to(ct)  # (L, Dh/2)
        sin = sin[offset:].to(ct)  # (L, Dh/2)
        pairs = x.to(ct).unflatten(-1, (self.head_dim // 2, 2))  # (B, H, L, Dh/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]  # (B, H, L, Dh/2) each
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # (.., Dh/2, 2)
        return rotated.flatten(-2).to(x.dtype)  # (B, H, L, Dh)
