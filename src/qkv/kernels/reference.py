"""The reference backend: the five steps of the mechanism, written out explicitly.

It materialises the (Lq x Lk) scores of every head, so it is the clearest backend and the
one :func:`qkv.explain` uses, but its memory grows with Lq * Lk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Backend, Call


@dataclass
class AttentionSteps:
    """The five steps of the mechanism for one call, each shaped like the inputs' batch.

    ``scores = q @ k^T``; ``scaled = scores * scale``; ``masked`` = scaled scores with the
    additive mask added and ``-inf`` where a key is hidden; ``weights = softmax(masked)``
    (rows of a fully hidden query are 0; after dropout when dropout > 0);
    ``output = weights @ v`` in the input dtype. Shapes: scores/scaled/masked/weights
    ``(..., Hq, Lq, Lk)``, output ``(..., Hq, Lq, Dv)`` (``(B, Hq, ...)`` inside a backend).
    """

    scores: Tensor  # (..., Hq, Lq, Lk)  q @ k^T
    scaled: Tensor  # (..., Hq, Lq, Lk)  scores * scale
    masked: Tensor  # (..., Hq, Lq, Lk)  scaled + bias, -inf where hidden
    weights: Tensor  # (..., Hq, Lq, Lk)  softmax(masked), after dropout when dropout > 0
    output: Tensor  # (..., Hq, Lq, Dv)  weights @ v, in the input dtype
    scale: float

    def __repr__(self) -> str:
        *batch, nh, lq, lk = self.weights.shape
        b = f"batch {tuple(batch)}, " if batch else ""
        return (f"AttentionSteps({b}{nh} head{'s' * (nh != 1)}, Lq={lq}, Lk={lk}, "
                f"Dv={self.output.shape[-1]}, scale={self.scale:.4g}, "
                f"{str(self.weights.dtype).removeprefix('torch.')})")

    def _repr_html_(self) -> str:
        """The five steps as tables in a notebook (see :func:`qkv.viz.steps.to_html`)."""
        from ..viz import steps  # the viewers sit above this module; imported on use only

        return steps.to_html(self)


def masked_softmax(x: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last dim where hidden entries get exactly 0.

    Hidden entries are *selected* away (``where``), never multiplied by 0, so NaN or inf
    in them cannot leak. A row with nothing visible gives all zeros (not NaN), and zero
    gradients.
    """
    if allowed is not None:
        x = torch.where(allowed, x, float("-inf"))
    if x.shape[-1] == 0:
        return x.clone()
    m = x.amax(dim=-1, keepdim=True).detach()  # (..., 1) row max, for stability
    # A fully hidden row has max -inf: shift by 0 instead. A NaN or +inf max stays: its
    # row's weights are all NaN, as the oracle's (exp(x - NaN), or exp(inf - inf)).
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    # Hidden entries are selected to 0 (exp(-inf - NaN) and 0 / NaN would be NaN in a row
    # with a NaN or +inf score).
    hidden = x == float("-inf")  # (..., L)
    e = torch.where(hidden, 0.0, torch.exp(x - m))  # (..., L)
    s = e.sum(dim=-1, keepdim=True)  # (..., 1) 0 only for a fully hidden row
    return torch.where(hidden, 0.0, e / torch.where(s == 0, torch.ones_like(s), s))


def dropout_weights(w: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Zero each weight with probability p and scale the survivors by 1/(1-p)."""
    keep = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype) >= p
    return torch.where(keep, w / (1.0 - p), torch.zeros_like(w))


def reference_steps(call: Call) -> AttentionSteps:
    """Compute attention step by step (upcast to float32, or float64 for float64 input)."""
    b, hq, lq, d = call.q.shape
    hkv, lk, dv = call.kv_heads, call.lk, call.v.shape[-1]
    g = call.groups
    ct = call.compute_dtype
    q = call.q.to(ct).reshape(b, hkv, g, lq, d)  # (B, Hkv, G, Lq, D): heads h = kv*G + g
    k = call.k.to(ct).unsqueeze(2)  # (B, Hkv, 1, Lk, D)
    v = call.v.to(ct).unsqueeze(2)  # (B, Hkv, 1, Lk, Dv)

    scores = (q @ k.transpose(-1, -2)).reshape(b, hq, lq, lk)  # (B, Hq, Lq, Lk)
    scaled = scores * call.scale  # (B, Hq, Lq, Lk)
    allowed, bias = call.mask.dense(call.q.device)  # broadcastable to (B, Hq, Lq, Lk)
    masked = scaled if bias is None else scaled + bias.to(ct)
    if allowed is not None:
        masked = torch.where(allowed, masked, float("-inf"))  # (B, Hq, Lq, Lk)
    weights = masked_softmax(masked, allowed)  # (B, Hq, Lq, Lk)
    if call.dropout > 0:
        weights = dropout_weights(weights, call.dropout, call.generator)
    out = weights.reshape(b, hkv, g, lq, lk) @ v  # (B, Hkv, G, Lq, Dv)
    out = out.reshape(b, hq, lq, dv)  # (B, Hq, Lq, Dv)
    if allowed is not None:  # a query that sees no key gets 0, whatever 0 * value gives
        out = torch.where(allowed.any(dim=-1, keepdim=True), out, 0.0)
    out = out.to(call.q.dtype)
    return AttentionSteps(scores, scaled, masked, weights, out, call.scale)


class ReferenceBackend(Backend):
    name = "reference"

    def run(self, call: Call) -> tuple[Tensor, Tensor | None]:
        steps = reference_steps(call)
        weights = steps.weights.to(call.q.dtype) if call.return_weights else None
        return steps.output, weights
