"""``qkv.attention`` and ``qkv.explain``: the single entry to the mathematics.

Validation happens here, once (:func:`prepare_call`); the result is a canonical
:class:`~qkv.kernels.base.Call` handed to one backend. Modules, models and the CLI call
these functions, never a backend.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers

import torch
from torch import Tensor

from . import kernels as _kernels
from .kernels.base import Call
from .kernels.reference import AttentionSteps, reference_steps
from .kernels.torch_sdpa import TorchSDPABackend
from .masks import Mask, parse_window
from .validate import check_qkv

__all__ = ["AttentionSteps", "attention", "explain", "prepare_call"]

log = logging.getLogger("qkv")


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
    # The common call (no mask, window, dropout, weights or generator; backend "auto";
    # plain tensors; no capture; DEBUG logging off) reuses what an earlier call of the same
    # signature validated and chose (see _PLANS below).
    key = None
    if (mask is None and window is None and generator is None and return_weights is False
            and backend == "auto" and type(dropout) is float and dropout == 0.0
            and (causal is False or causal is True) and (scale is None or type(scale) is float)
            and type(q) is Tensor and type(k) is Tensor and type(v) is Tensor):
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, causal, scale,
               _kernels.REFERENCE_MEMORY_BUDGET)
        if q.is_cuda:  # auto's choice there also reads these (kernels.triton_first)
            key += (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                 or v.requires_grad),
                    torch.get_float32_matmul_precision(), _kernels.TRITON_MIN_LENGTH)
        plan = _PLANS.get(key)
        if plan is not None and not _observers and not log.isEnabledFor(10):
            fast, flat = plan  # DEBUG: the slow path logs; capture: it records
            try:  # k or v of another dtype or device than q raises: the full path says why
                if flat is None:  # q is (B, Hq, Lq, D) already
                    return fast(q, k, v)
                b, batch_shape = flat
                out = fast(q.reshape(b, *q.shape[-3:]), k.reshape(b, *k.shape[-3:]),
                           v.reshape(b, *v.shape[-3:]))  # (B, Hq, Lq, Dv)
                return out.reshape(*batch_shape, *out.shape[1:])  # (..., Hq, Lq, Dv)
            except RuntimeError:
                pass
    if _observers:  # qkv.capture is recording: it runs the call as is and keeps the weights
        return _observers[-1](_attention, q, k, v, mask=mask, causal=causal, window=window,
                              scale=scale, dropout=dropout, return_weights=return_weights,
                              backend=backend, generator=generator)
    return _attention(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                      dropout=dropout, return_weights=return_weights, backend=backend,
                      generator=generator, plan_key=key)


#: Set by :func:`qkv.capture` while it records: each is called as ``f(run, q, k, v, **opts)``
#: and must return ``run(q, k, v, **opts)``.
_observers: list = []


def _attention(q, k, v, *, mask, causal, window, scale, dropout, return_weights, backend,
               generator, plan_key=None):
    """The full path: validate, choose, run; remembers a plan under ``plan_key`` (a plain
    call's signature) when the call needed no zeroing of hidden keys."""
    plain = plan_key is not None
    call, batch_shape = prepare_call(
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout=dropout,
        return_weights=return_weights, generator=generator,
    )
    be = _choose(call, backend)
    # Keys the band hides from every query are zeroed for every backend (a partial block
    # multiplies their zero weights by their values); tensor-mask ones unless the backend
    # never reads them.
    zeroed = _zero_hidden_keys(call, tensor=not be.handles_hidden_keys)
    plain = plain and zeroed is call  # a plan must not skip zeroing hidden keys
    call = zeroed
    if plain:
        _remember(plan_key, be, call, batch_shape)
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
    generator: torch.Generator | None = None,
) -> AttentionSteps:
    """Attention step by step: the options of :func:`attention`, returns every step.

    ``mask``, ``causal``, ``window`` and ``scale`` mean what they mean there; with
    ``dropout > 0`` the weights (and so the output) are those after dropout, drawn from
    ``generator``. The steps are computed by the reference backend (the only one that keeps
    them) in float32 (float64 for float64 inputs); ``output`` has the input dtype.
    """
    call, batch_shape = prepare_call(
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout=dropout,
        generator=generator,
    )
    s = reference_steps(_zero_hidden_keys(call))

    def unflat(t: Tensor) -> Tensor:
        return t.expand(call.batch, *t.shape[1:]).reshape(*batch_shape, *t.shape[1:])

    return dataclasses.replace(
        s, scores=unflat(s.scores), scaled=unflat(s.scaled), masked=unflat(s.masked),
        weights=unflat(s.weights), output=unflat(s.output),
    )


# ---- plans of plain calls -----------------------------------------------------------------
# A plain call has no tensor mask, window, dropout, returned weights or generator. Its
# signature (the key) is the shapes of q, k and v, q's dtype and device, ``causal``,
# ``scale`` and the memory budget that ``auto`` reads; on CUDA also whether gradients are
# needed, the float32 matmul precision and ``TRITON_MIN_LENGTH``, which it reads there.
# Every check of prepare_call depends on nothing else but k's and v's dtypes and devices,
# and neither does the backend auto picks nor the canonical mask, so a call whose
# signature was seen before and whose k and v have q's dtype and device is valid and goes
# where the first one went. Those two are not in the key (reading them costs as much as a
# third of the rest): the plan's function raises a RuntimeError when they differ from q's,
# and the call then takes the full path, which refuses it with its own message. SDPA
# checks them itself; other plans check them first. A plan is (fast, None or (B,
# batch_shape) when the batch dims must be folded), where fast(q, k, v) maps (B, ...)
# tensors to the output. A backend with ``plain_runner(call)`` gives a function with every
# per-signature decision already made; otherwise fast builds the Call and runs the
# backend.
_PLANS = _kernels.PLANS  # register() empties it

_parse_window = parse_window  # its old home; code that read it here keeps working
_MAX_PLANS = 256  # distinct signatures kept; the cache starts over when full


class _OtherKV(RuntimeError):
    """k or v of another dtype or device than q, in a planned call: take the full path."""


def _remember(key: tuple, be, call: Call, batch_shape: tuple[int, ...]) -> None:
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    flat = None if len(batch_shape) == 1 else (call.batch, batch_shape)
    runner = _plain_runner(be, call)
    dtype, device = call.q.dtype, call.q.device
    if runner is not None and device.type == "cpu" and \
            type(be).plain_runner is TorchSDPABackend.plain_runner:
        fast = runner  # SDPA refuses k or v of another dtype or device than q
    else:
        if runner is None:
            run, m, sc = be.run, call.mask, call.scale

            def runner(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return run(Call(q, k, v, m, sc))[0]  # (B, Hq, Lq, Dv)

        def fast(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if (k.dtype is not dtype or v.dtype is not dtype or k.device != device
                    or v.device != device):
                raise _OtherKV
            return runner(q, k, v)  # (B, Hq, Lq, Dv)
    _PLANS[key] = (fast, flat)


def _plain_runner(be, call: Call):
    """``be.plain_runner(call)`` when it stands for ``be.run``: the class that defines it
    defines ``run`` too and nothing replaced ``run`` on the instance (a subclass that only
    overrides ``run`` must see every call); None otherwise."""
    if "run" in vars(be):
        return None
    cls = type(be)
    owners = [next((c for c in cls.__mro__ if name in vars(c)), None)
              for name in ("plain_runner", "run")]
    if owners[0] is None or owners[0] is not owners[1]:
        return None
    return be.plain_runner(call)


# ---- choosing a backend -------------------------------------------------------------------
def _choose(call: Call, name: str):
    if name != "auto":
        be = _kernels.get(name)
        why = be.unsupported(call)
        if why is not None:
            raise ValueError(
                f"backend {name!r} cannot do this call: it does not support {why}. "
                f"Fix: use backend='auto' or one of {_kernels.names()}"
            )
        return be
    reasons = []
    for candidate, rule in _kernels.auto_order(call):
        be = _kernels.get(candidate)
        why = be.unsupported(call)
        if why is None:
            log.debug("qkv.attention auto chose %r (%s)%s", candidate, rule,
                      "; skipped " + "; ".join(reasons) if reasons else "")
            return be
        reasons.append(f"{candidate}: no {why}")
    raise ValueError("no backend supports this call: " + "; ".join(reasons) +
                     ". Fix: drop the option the backends lack")


def _zero_hidden_keys(call: Call, *, tensor: bool = True) -> Call:
    """Zero keys and values that no query may see, so NaN/inf stored there cannot leak
    (``tensor=False``: only those the causal/window band hides from every query)."""
    m = call.mask
    if not (m.has_band or (tensor and m.has_tensor)):
        return call
    # (B|1, Hkv|1, Lk, 1) or None
    hidden = m.hidden_keys(call.kv_heads, tensor=tensor, device=call.k.device)
    if hidden is None:
        return call
    k = torch.where(hidden, torch.zeros((), dtype=call.k.dtype, device=call.k.device), call.k)
    v = torch.where(hidden, torch.zeros((), dtype=call.v.dtype, device=call.v.device), call.v)
    return Call(call.q, k, v, call.mask, call.scale, call.dropout, call.generator,
                call.return_weights)


# ---- validation ---------------------------------------------------------------------------
def prepare_call(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout=0.0,
                 return_weights=False, generator=None) -> tuple[Call, tuple[int, ...]]:
    """Check every input of :func:`attention` and build the canonical :class:`Call` that a
    backend receives (leading batch dims flattened into one, every mask folded into one
    :class:`~qkv.masks.Mask`); returns ``(call, batch_shape)``. For code that drives the
    kernels of :mod:`qkv.kernels` directly; everything else calls :func:`attention`."""
    if v is None:  # check_qkv takes None for "no values"; attention needs them
        raise TypeError("v must be a torch.Tensor; got NoneType. Fix: pass the values "
                        "(..., Hkv, Lk, Dv)")
    check_qkv(q, k, v)
    batch_shape = tuple(q.shape[:-3])
    hq, lq, d = q.shape[-3:]
    hkv, lk, _ = k.shape[-3:]
    dv = v.shape[-1]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}. Fix: causal=bool(...)")
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be True or False; got {return_weights!r}. "
                        "Fix: return_weights=bool(...)")
    dropout = _real("dropout", dropout, "dropout=0.1 (0 turns it off)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1); got {dropout!r}. "
                         "Fix: dropout=0.1, or 0 to turn it off")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}."
                        " Fix: generator=torch.Generator().manual_seed(0)")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        scale = _real("scale", scale, f"leave scale=None for 1/sqrt(D) = {1 / math.sqrt(d):.4g}")
    left, right = parse_window(window)
    if causal:
        right = 0 if right is None else min(right, 0)
    # A side at least as wide as the sequences bounds nothing: query i's relative key
    # positions j - (i + Lk - Lq) lie in [-(Lk - 1), Lq - 1].
    if left is not None and left >= lk:
        left = None
    if right is not None and right >= lq:
        right = None

    b = math.prod(batch_shape)
    allowed, bias = _canonical_mask(mask, batch_shape, (hq, lq, lk), q.device)
    m = Mask(lq, lk, causal=causal, left=left, right=right, allowed=allowed, bias=bias)
    call = Call(
        q=q.reshape(b, hq, lq, d), k=k.reshape(b, hkv, lk, d), v=v.reshape(b, hkv, lk, dv),
        mask=m, scale=float(scale), dropout=float(dropout), generator=generator,
        return_weights=return_weights,
    )
    return call, batch_shape


def _real(name: str, x, fix: str) -> float:
    """``x`` as a finite float: any real number (Python or NumPy), not bool, NaN or inf."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__} {x!r}. "
                        f"Fix: {fix}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number; got {x!r}. Fix: {fix}")
    return x


def _canonical_mask(mask, batch_shape, hql, device):
    """Return (allowed, bias): 4-D views of the user's mask broadcastable to (B, Hq, Lq, Lk)."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor (bool or float); got {type(mask).__name__}. "
                        "Fix: mask=torch.as_tensor(mask, device=q.device)")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = may attend) or float (added to the scores); got dtype "
            f"{mask.dtype}. Fix: mask.bool() if 1 means 'may attend'"
        )
    if "meta" in (mask.device.type, device.type):
        raise ValueError(f"mask is on {mask.device} and q on {device}; the meta device holds "
                         "no values to mask with. Fix: build the mask and q, k, v on a real "
                         "device")
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
    else:  # the batch size is explicit: -1 is ambiguous when Lq or Lk is 0
        m = m.expand(*batch_shape, *m.shape[nb:]).reshape(
            math.prod(batch_shape), *m.shape[nb:])  # (B, Hq|1, Lq|1, Lk|1)
    if mask.dtype == torch.bool:
        return m, None
    return None, m
