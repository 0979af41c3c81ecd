"""What every backend receives and must provide.

:func:`qkv.attention` validates its inputs once and hands each backend a :class:`Call` in
canonical form: the leading batch dims flattened into one, every mask folded into a
:class:`qkv.masks.Mask`. A backend never re-validates user input; it only says which calls
it cannot do (:meth:`Backend.unsupported`) and computes the ones it can.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import Mask


@dataclass
class Call:
    """One attention call in canonical form."""

    q: Tensor  # (B, Hq, Lq, D)
    k: Tensor  # (B, Hkv, Lk, D)
    v: Tensor  # (B, Hkv, Lk, Dv)
    mask: Mask
    scale: float
    dropout: float = 0.0
    generator: torch.Generator | None = None
    return_weights: bool = False

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 = plain multi-head, Hq = multi-query)."""
        return self.q.shape[1] // self.k.shape[1]

    @property
    def lq(self) -> int:
        return self.q.shape[2]

    @property
    def lk(self) -> int:
        return self.k.shape[2]

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 inputs, float32 for everything else (fp16, bf16, fp32)."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.q, self.k, self.v)
        )


class Backend:
    """A way to compute attention. Subclasses set ``name`` and implement the two methods."""

    name: str = ""
    #: True when the backend keeps NaN/inf of fully hidden keys out of its output by
    #: itself; otherwise qkv.attention zeroes such keys and values before the call.
    handles_hidden_keys: bool = False

    def unsupported(self, call: Call) -> str | None:
        """None when the backend can do ``call``; otherwise the option it cannot do."""
        return None

    def run(self, call: Call) -> tuple[Tensor, Tensor | None]:
        """Return ``out (B, Hq, Lq, Dv)`` in the input dtype and, when
        ``call.return_weights``, the weights ``(B, Hq, Lq, Lk)`` (else None)."""
        raise NotImplementedError
