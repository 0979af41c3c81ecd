"""``qkv.attention`` and ``qkv.explain``: the single entry to the mathematics.

Validation happens here, once; the result is a canonical :class:`~qkv.backends.base.Call`
handed to one backend. Modules, models and the CLI call these functions, never a backend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backends as _backends
from .backends.base import Call
from .backends.reference import reference_steps
from .masks import Mask

__all__ = ["AttentionSteps", "attention", "explain"]

log = logging.getLogger("qkv")


@dataclass
class AttentionSteps:
    """The five steps of the mechanism for one call, each shaped like the inputs' batch.

    ``scores = q @ k^T``; ``scaled = scores * scale``; ``masked`` = scaled scores with the
    additive mask added and ``-inf`` where a key is hidden; ``weights = softmax(masked)``
    (rows of a fully hidden query are 0); ``output = weights @ v``.
    Shapes: scores/scaled/masked/weights ``(..., Hq, Lq, Lk)``, output ``(..., Hq, Lq, Dv)``.
    """

    scores: Tensor
    scaled: Tensor
    masked: Tensor
    weights: Tensor
    output: Tensor
    scale: float


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    return_weights: bool = False,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention: ``softmax(q @ k^T * scale + mask) @ v``.

    Args:
        q: queries ``(..., Hq, Lq, D)``.
        k: keys ``(..., Hkv, Lk, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA:
            query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
        v: values ``(..., Hkv, Lk, Dv)``.
        mask: bool (True = may attend, False = hidden) or float (added to the scaled
            scores; ``-inf`` = hidden), broadcastable to ``(..., Hq, Lq, Lk)``.
        causal: hide future keys, aligned bottom-right: query ``i`` sees key ``j`` iff
            ``j <= i + (Lk - Lq)``. With a KV cache (Lq=1 new query, Lk keys so far) the
            query sees every key; with Lq > Lk the first ``Lq - Lk`` queries see nothing.
        window: ``(left, right)`` or ``w`` for ``(w, w)``: query ``i`` sees keys
            ``i' - left .. i' + right`` with ``i' = i + (Lk - Lq)``; ``None`` on one side
            means unbounded. Intersects with ``causal`` and ``mask``.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        dropout: probability of zeroing each weight (survivors scaled by ``1/(1-p)``).
            Applied whenever > 0: pass 0 at evaluation time (the module does this).
        return_weights: also return the weights ``(..., Hq, Lq, Lk)`` actually applied to
            the values (after dropout).
        backend: ``"auto"`` or one of :func:`qkv.backends`.
        generator: a ``torch.Generator`` that makes dropout reproducible.

    Returns:
        ``out (..., Hq, Lq, Dv)`` in the input dtype, or ``(out, weights)``.

    A query that can see no key gets output 0 and weight 0 (never NaN). Scores, softmax and
    accumulation run in float32 (float64 for float64 inputs).
    """
    call, batch_shape = _prepare(
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout=dropout,
        return_weights=return_weights, generator=generator,
    )
    be = _choose(call, backend)
    if not be.handles_hidden_keys:
        call = _zero_hidden_keys(call)
    out, weights = be.run(call)
    out = out.reshape(*batch_shape, *out.shape[1:])  # (..., Hq, Lq, Dv)
    if return_weights:
        return out, weights.reshape(*batch_shape, *weights.shape[1:])  # (..., Hq, Lq, Lk)
    return out


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    return_weights: bool = False,
    backend: str = "reference",
    generator: torch.Generator | None = None,
) -> AttentionSteps:
    """Attention step by step: same arguments as :func:`attention`, returns every step.

    The steps are computed by the reference backend (the only one that keeps them) in
    float32 (float64 for float64 inputs); ``output`` has the input dtype.
    """
    if backend not in ("auto", "reference"):
        raise ValueError(
            f"explain computes the steps with the reference backend; got backend={backend!r}. "
            "Fix: leave backend at its default"
        )
    call, batch_shape = _prepare(
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout=dropout,
        return_weights=return_weights, generator=generator,
    )
    s = reference_steps(_zero_hidden_keys(call))

    def unflat(t: Tensor) -> Tensor:
        return t.expand(call.batch, *t.shape[1:]).reshape(*batch_shape, *t.shape[1:])

    return AttentionSteps(
        scores=unflat(s.scores), scaled=unflat(s.scaled), masked=unflat(s.masked),
        weights=unflat(s.weights), output=unflat(s.output), scale=call.scale,
    )


# ---- choosing a backend -------------------------------------------------------------------
def _choose(call: Call, name: str):
    if name != "auto":
        be = _backends.get(name)
        why = be.unsupported(call)
        if why is not None:
            raise ValueError(
                f"backend {name!r} cannot do this call: it does not support {why}. "
                f"Fix: use backend='auto' or one of {_backends.names()}"
            )
        return be
    reasons = []
    for candidate, rule in _backends.auto_order(call):
        be = _backends.get(candidate)
        why = be.unsupported(call)
        if why is None:
            log.debug("qkv.attention auto chose %r (%s)%s", candidate, rule,
                      "; skipped " + "; ".join(reasons) if reasons else "")
            return be
        reasons.append(f"{candidate}: no {why}")
    raise ValueError("no backend supports this call: " + "; ".join(reasons))


def _zero_hidden_keys(call: Call) -> Call:
    """Zero keys and values that no query may see, so NaN/inf stored there cannot leak."""
    hidden = call.mask.hidden_keys(call.kv_heads)  # (B|1, Hkv|1, Lk, 1) or None
    if hidden is None:
        return call
    k = torch.where(hidden, torch.zeros((), dtype=call.k.dtype, device=call.k.device), call.k)
    v = torch.where(hidden, torch.zeros((), dtype=call.v.dtype, device=call.v.device), call.v)
    return Call(call.q, k, v, call.mask, call.scale, call.dropout, call.generator,
                call.return_weights)


# ---- validation ---------------------------------------------------------------------------
def _prepare(q, k, v, *, mask, causal, window, scale, dropout, return_weights, generator):
    """Check every input and build the canonical Call; returns (call, batch_shape)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}. "
                            f"Fix: pass torch.as_tensor({name})")
        if t.dim() < 3:
            raise ValueError(
                f"{name} must have shape (..., heads, length, dim) with at least 3 dims; got "
                f"shape {tuple(t.shape)}. Fix: add a heads dimension, e.g. {name}.unsqueeze(-3)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}. "
                            f"Fix: {name}.float()")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. "
                        "Fix: cast them with .to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}. Fix: move them with .to(q.device)")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"q, k and v must have the same number of dims; got {q.dim()}, "
                         f"{k.dim()}, {v.dim()} (shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)})")
    batch_shape = tuple(q.shape[:-3])
    if tuple(k.shape[:-3]) != batch_shape or tuple(v.shape[:-3]) != batch_shape:
        raise ValueError(f"q, k and v must share their leading (batch) dims; got "
                         f"{tuple(q.shape[:-3])}, {tuple(k.shape[:-3])}, {tuple(v.shape[:-3])}")
    hq, lq, d = q.shape[-3:]
    hkv, lk, dk = k.shape[-3:]
    hv, lv, dv = v.shape[-3:]
    if dk != d:
        raise ValueError(f"k has head dim {dk} but q has {d}; the query and key dims must "
                         "match (the scores are q @ k^T)")
    if d == 0:
        raise ValueError("q and k have head dim 0; expected at least 1")
    if hv != hkv or lv != lk:
        raise ValueError(f"v has {hv} heads and length {lv} but k has {hkv} heads and length "
                         f"{lk}; each key needs exactly one value")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k has {hkv} heads but q has {hq}; the query heads must be a "
                         "multiple of the key heads (GQA)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be True or False; got {return_weights!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
        0.0 <= dropout < 1.0
    ):
        raise ValueError(f"dropout must be a probability in [0, 1); got {dropout!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(
        scale
    ):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    left, right = _parse_window(window)
    if causal:
        right = 0 if right is None else min(right, 0)

    b = math.prod(batch_shape)
    allowed, bias = _canonical_mask(mask, batch_shape, (hq, lq, lk), q.device)
    m = Mask(lq, lk, causal=causal, left=left, right=right, allowed=allowed, bias=bias)
    call = Call(
        q=q.reshape(b, hq, lq, d), k=k.reshape(b, hkv, lk, d), v=v.reshape(b, hkv, lk, dv),
        mask=m, scale=float(scale), dropout=float(dropout), generator=generator,
        return_weights=return_weights,
    )
    return call, batch_shape


def _parse_window(window) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if isinstance(window, bool):
        raise TypeError(f"window must be an int or a (left, right) pair; got {window!r}")
    if isinstance(window, int):
        window = (window, window)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be an int w or a (left, right) pair; got {window!r}. "
                        "Fix: window=(128, 0) for 128 keys to the left and none to the right")
    out = []
    for side, w in zip(("left", "right"), window, strict=True):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window {side} must be an int or None; got {w!r}")
        if w < 0:
            raise ValueError(f"window {side} must be >= 0; got {w}. Fix: window=(left, right) "
                             "counts keys on each side of the query's own position")
        out.append(w)
    return out[0], out[1]


def _canonical_mask(mask, batch_shape, hql, device):
    """Return (allowed, bias): 4-D views of the user's mask broadcastable to (B, Hq, Lq, Lk)."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor (bool or float); got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = may attend) or float (added to the scores); got dtype "
            f"{mask.dtype}. Fix: mask.bool() if 1 means 'may attend'"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}. Fix: mask.to(q.device)")
    full = (*batch_shape, *hql)
    try:
        ok = mask.dim() <= len(full) and torch.broadcast_shapes(mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (..., Hq, Lq, Lk) = "
            f"{full}. Fix: give it shape (Lq, Lk), (B, 1, 1, Lk) for key padding, or {full}"
        )
    m = mask.reshape((1,) * (len(full) - mask.dim()) + tuple(mask.shape))
    nb = len(batch_shape)
    if all(s == 1 for s in m.shape[:nb]):
        m = m.reshape(1, *m.shape[nb:])  # (1, Hq|1, Lq|1, Lk|1)
    else:
        m = m.expand(*batch_shape, *m.shape[nb:]).reshape(-1, *m.shape[nb:])
    if mask.dtype == torch.bool:
        return m, None
    return None, m
