"""Bad input gives a ValueError/TypeError that says what was expected and what arrived."""

import pytest
import torch

import qkv
from qkv.distributed import ring_attention
from qkv.kernels.chunked import chunked_forward
from qkv.masks import Mask

from helpers import rand_qkv


def qkv_(hq=4, hkv=2, lq=3, lk=5, d=8, dv=6):
    return rand_qkv(2, hq, hkv, lq, lk, d, dv, dtype=torch.float32)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: (q[0, 0], k, v), ValueError, r"at least 3 dims.*got shape \(3, 8\)"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "must be a torch.Tensor"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating-point"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q, k[..., :7], v), ValueError, "head dim 7 but q has 8"),
    (lambda q, k, v: (q, k, v[..., :4, :]), ValueError, "each key needs exactly one value"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "k has 2 heads but q has 3"),
    (lambda q, k, v: (q, k[None], v[None]), ValueError, "same number of dims"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "leading"),
])
def test_shape_dtype_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        qkv.attention(*make(*qkv_()))


@pytest.mark.parametrize("kw,exc,match", [
    ({"mask": torch.ones(3, 5, dtype=torch.int64)}, TypeError, "bool.*float"),
    ({"mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError,
     r"does not broadcast.*\(2, 4, 3, 5\)"),
    ({"mask": [[True]]}, TypeError, "torch.Tensor"),
    ({"window": -1}, ValueError, "window left must be >= 0"),
    ({"window": (1, -2)}, ValueError, "window right must be >= 0"),
    ({"window": (1, 2, 3)}, TypeError, "pair"),
    ({"window": 1.5}, TypeError, "pair"),
    ({"dropout": 1.0}, ValueError, r"\[0, 1\)"),
    ({"dropout": -0.1}, ValueError, r"\[0, 1\)"),
    ({"scale": float("nan")}, ValueError, "finite"),
    ({"causal": 1}, TypeError, "True or False"),
    ({"backend": "cuda-magic"}, ValueError, "unknown backend 'cuda-magic'"),
    ({"backend": "torch", "return_weights": True}, ValueError,
     "backend 'torch' cannot.*return_weights"),
    ({"generator": 3}, TypeError, "torch.Generator"),
])
def test_option_errors(kw, exc, match):
    q, k, v = qkv_()
    with pytest.raises(exc, match=match):
        qkv.attention(q, k, v, **kw)


def test_torch_backend_refuses_generator():
    q, k, v = qkv_()
    with pytest.raises(ValueError, match="generator"):
        qkv.attention(q, k, v, dropout=0.1, generator=torch.Generator(), backend="torch")


def test_explain_takes_only_what_it_uses():
    # explain always computes the steps with the reference: no backend= or return_weights=
    for kw in ({"backend": "torch"}, {"return_weights": True}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            qkv.explain(*qkv_(), **kw)


def test_errors_suggest_a_fix():
    q, k, v = qkv_()
    with pytest.raises(TypeError) as e:
        qkv.attention(q, k.double(), v)
    assert "Fix" in str(e.value)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "k has 2 heads but q has 3"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q, k[..., :7], v), ValueError, "head dim 7 but q has 8"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "each key needs exactly one value"),
])
def test_every_entry_point_refuses_alike(make, exc, match):
    """attention, ring_attention and the chunked building blocks share one validator, so
    the same bad q/k/v gets the same message from each."""
    q, k, v = make(*rand_qkv(2, 4, 2, 5, 5, 8, 6, dtype=torch.float32))
    calls = [lambda: qkv.attention(q, k, v), lambda: ring_attention(q, k, v),
             lambda: chunked_forward(q, k, v, Mask(5, 5), 1.0)]
    messages = []
    for call in calls:
        with pytest.raises(exc, match=match) as e:
            call()
        messages.append(str(e.value))
    assert len(set(messages)) == 1, messages
