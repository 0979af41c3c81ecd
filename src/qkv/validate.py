"""The one check of queries, keys and values that every entry point shares.

:func:`qkv.attention`, :func:`qkv.distributed.ring_attention` and the chunked building
blocks (:func:`qkv.kernels.chunked.chunked_forward` and friends) accept q, k and v under the
same rules, so they refuse bad ones with the same messages: what was expected, what
arrived, and how to fix it.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_qkv"]


def check_qkv(q, k, v, *, dims: int | None = None) -> None:
    """Raise TypeError/ValueError unless q, k and v can be attended together.

    Args:
        q: queries ``(..., Hq, Lq, D)``.
        k: keys ``(..., Hkv, Lk, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        v: values ``(..., Hkv, Lk, Dv)``, or None when only q and k are used (weights).
        dims: None for any number of leading (batch) dims shared by q, k and v (at least
            3 dims in all); 4 for exactly ``(B, heads, length, dim)``.
    """
    named = [("q", q), ("k", k)] + ([] if v is None else [("v", v)])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}. "
                            f"Fix: pass torch.as_tensor({name})")
        if dims is None and t.dim() < 3:
            raise ValueError(
                f"{name} must have shape (..., heads, length, dim) with at least 3 dims; got "
                f"shape {tuple(t.shape)}. Fix: add a heads dimension, e.g. {name}.unsqueeze(-3)"
            )
        if dims is not None and t.dim() != dims:
            raise ValueError(f"{name} must have shape (B, heads, length, dim), {dims} dims; got "
                             f"shape {tuple(t.shape)}. Fix: reshape the leading dims into one "
                             "batch dim")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}. "
                            f"Fix: {name}.float()")
    tensors = [t for _, t in named]
    names = ", ".join(n for n, _ in named[:-1]) + f" and {named[-1][0]}"
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"{names} must share one dtype; got "
                        f"{', '.join(str(t.dtype) for t in tensors)}. "
                        "Fix: cast them with .to(q.dtype)")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"{names} must be on one device; got "
                         f"{', '.join(str(t.device) for t in tensors)}. "
                         "Fix: move them with .to(q.device)")
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
    if len({t.dim() for t in tensors}) > 1:
        raise ValueError(f"{names} must have the same number of dims; got "
                         f"{', '.join(str(t.dim()) for t in tensors)} (shapes {shapes}). "
                         "Fix: give each the shape (..., heads, length, dim) with the same "
                         "leading dims")
    if len({tuple(t.shape[:-3]) for t in tensors}) > 1:
        raise ValueError(f"{names} must share their leading (batch) dims; got "
                         f"{', '.join(str(tuple(t.shape[:-3])) for t in tensors)}. "
                         "Fix: expand the smaller ones, e.g. k.expand(*q.shape[:-3], "
                         "*k.shape[-3:])")
    hq, _, d = q.shape[-3:]
    hkv, lk, dk = k.shape[-3:]
    if dk != d:
        raise ValueError(f"k has head dim {dk} but q has {d}; the query and key dims must "
                         "match (the scores are q @ k^T). Fix: project q and k to one head "
                         "dim")
    if d == 0:
        raise ValueError("q and k have head dim 0; expected at least 1. Fix: give each "
                         "head at least one feature")
    if v is not None:
        hv, lv, _ = v.shape[-3:]
        if hv != hkv or lv != lk:
            raise ValueError(f"v has {hv} heads and length {lv} but k has {hkv} heads and "
                             f"length {lk}; each key needs exactly one value. Fix: build k "
                             "and v from the same tokens and heads")
    if hq == 0:
        raise ValueError(f"q has 0 heads (shape {tuple(q.shape)}); expected at least 1. "
                         "Fix: q of shape (..., heads, length, dim) with heads >= 1")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k has {hkv} heads but q has {hq}; the query heads must be a "
                         "multiple of the key heads (GQA). Fix: use Hkv heads for k and v "
                         "with Hq % Hkv == 0")
