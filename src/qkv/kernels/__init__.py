"""The registry of attention backends and the rule ``backend="auto"`` follows.

Every backend computes the same function (see :mod:`qkv.kernels.base`); they differ in
how. Backends whose dependencies are optional (Triton) register only when importable.
``auto`` puts ``chunked`` before the reference when the reference would need more than
:data:`REFERENCE_MEMORY_BUDGET` bytes (set ``qkv.kernels.REFERENCE_MEMORY_BUDGET``), and
before ``torch`` too when SDPA would need a dense ``(Lq x Lk)`` mask.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import Backend, Call
from .chunked import ChunkedBackend
from .reference import ReferenceBackend
from .torch_sdpa import TorchSDPABackend

__all__ = [
    "PLANS",
    "REFERENCE_MEMORY_BUDGET",
    "TRITON_MIN_LENGTH",
    "Backend",
    "Call",
    "auto_order",
    "get",
    "memory_reason",
    "names",
    "reference_memory",
    "register",
    "sdpa_needs_dense_mask",
    "triton_first",
]

#: ``backend="auto"`` puts ``chunked`` before ``reference`` (and before ``torch`` when SDPA
#: would need a dense mask) when the reference would need more bytes than this.
REFERENCE_MEMORY_BUDGET: int = 1 << 30

_REGISTRY: dict[str, Backend] = {}

#: What ``qkv.attention`` decided for the signatures of plain calls it has seen (see
#: ``qkv.functional``); emptied by :func:`register`, since ``auto`` may then choose anew.
PLANS: dict[tuple, tuple] = {}


def register(backend: Backend) -> None:
    """Add a backend under ``backend.name`` (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend
    PLANS.clear()  # a cached choice may no longer be what auto would pick


def names() -> list[str]:
    """The names ``qkv.attention(..., backend=name)`` accepts (besides ``"auto"``)."""
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}. "
                        f"Fix: backend='auto' or one of {names()}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; expected 'auto' or one of {names()}. "
            "Fix: backend='auto' picks the fastest that can do the call"
        ) from None


def reference_memory(call: Call) -> int:
    """Bytes the reference backend keeps alive for ``call``: its four ``(B, Hq, Lq, Lk)``
    steps (scores, scaled, masked, weights) in the compute dtype, plus the dense bool mask
    when there is one."""
    cells = call.batch * call.heads * call.lq * call.lk
    itemsize = torch.empty((), dtype=call.compute_dtype).element_size()
    return cells * (4 * itemsize + (0 if call.mask.is_empty else 1))


def memory_reason(call: Call) -> str | None:
    """Why ``auto`` should prefer ``chunked`` for ``call`` (None when it need not)."""
    need = reference_memory(call)
    if need <= REFERENCE_MEMORY_BUDGET:
        return None
    return (f"the reference would need {need / 2**30:.2f} GiB for the (Lq x Lk) steps, over "
            f"qkv.kernels.REFERENCE_MEMORY_BUDGET = "
            f"{REFERENCE_MEMORY_BUDGET / 2**30:.2f} GiB; chunked needs O(Lq + Lk)")


def sdpa_needs_dense_mask(call: Call) -> bool:
    """True when the ``torch`` backend would pass SDPA an (Lq x Lk) mask for ``call`` (any
    mask other than none or square causal), so its memory grows with Lq * Lk too."""
    m = call.mask
    square_causal = m.causal and m.lq == m.lk and m.left is None and m.right == 0
    return not m.is_empty and not (square_causal and not m.has_tensor)


#: ``auto`` prefers the Triton forward to SDPA for calls without gradients whose Lq and Lk
#: are both at least this (see :func:`triton_first`).
TRITON_MIN_LENGTH: int = 4096


def triton_first(call: Call) -> str | None:
    """Why ``auto`` should try ``triton`` before ``torch`` for ``call`` on a CUDA device,
    or None when SDPA comes first.

    Measured on an H200 (bf16, ``benchmarks/gpu.py`` and ``gpu_calls.py``): qkv's forward
    kernel ran 1.14-1.35x SDPA's flash kernel at L = 4096 and 16384 but 0.74-1.19x at 1024;
    its backward 0.77-1.02x flash's; and SDPA's host cost per call is lower, which decides
    small calls (a decoding step, a small training step). Where SDPA would need a dense
    (Lq x Lk) mask (windows, causal with Lq != Lk, key padding), the kernel reads the band
    and key lengths instead, and wins on memory and time alike. float32 runs in TF32 in
    the kernel: only when torch allows TF32 matmuls too
    (``torch.set_float32_matmul_precision("high")``)."""
    if call.q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return None
    if sdpa_needs_dense_mask(call):
        return "fused kernel: torch SDPA would need a dense (Lq x Lk) mask for this band"
    if not call.needs_grad and min(call.lq, call.lk) >= TRITON_MIN_LENGTH:
        return (f"fused forward kernel: no gradients and Lq, Lk >= {TRITON_MIN_LENGTH}, where "
                "it outruns SDPA")
    return None


def auto_order(call: Call) -> list[tuple[str, str]]:
    """Backends in the order ``auto`` tries them for ``call``, each with the reason."""
    order = []
    why_triton = triton_first(call) if call.q.is_cuda else None
    if why_triton:
        order.append(("triton", why_triton))
    big = memory_reason(call)  # why the reference is too big for this call, or None
    dense = big is not None and sdpa_needs_dense_mask(call)
    if dense:
        order.append(("chunked", f"{big}; torch SDPA would need a dense (Lq x Lk) mask"))
    order.append(("torch", "PyTorch's fused SDPA kernels are the fastest general path"))
    if call.q.is_cuda and not why_triton:
        order.append(("triton", "fused kernel on a CUDA device, where SDPA cannot run"))
    if big is not None and not dense:
        order.append(("chunked", big))
    order.append(("reference", "the only backend left that does every option"))
    return [(n, why) for n, why in order if n in _REGISTRY]


register(ReferenceBackend())
register(TorchSDPABackend())
register(ChunkedBackend())

# The fused kernels need Triton (PyTorch's CUDA wheels bring it). Only look for it here:
# importing it costs a quarter of a second that CPU-only commands should not pay.
if importlib.util.find_spec("triton") is not None:
    from .triton import TritonBackend

    register(TritonBackend())
