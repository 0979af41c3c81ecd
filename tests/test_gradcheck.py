"""torch.autograd.gradcheck in float64 for every backend with a backward, and the module."""

import pytest
import torch

import qkv

from helpers import rand_qkv


@pytest.mark.parametrize("kw", [
    {},
    {"causal": True},
    {"window": (1, 2)},
    {"mask": "bool"},
    {"mask": "additive"},
    {"causal": True, "mask": "bool"},
])
def test_gradcheck(backend, kw):
    q, k, v = rand_qkv(1, 4, 2, 5, 7, 3, 2, seed=11, requires_grad=True)
    kw = dict(kw)
    g = torch.Generator().manual_seed(3)
    if kw.get("mask") == "bool":
        m = torch.rand(1, 4, 5, 7, generator=g) > 0.3
        m[0, 0, 1] = False  # a fully hidden row: zero gradient, not NaN
        kw["mask"] = m
    elif kw.get("mask") == "additive":
        kw["mask"] = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_()
    inputs = (q, k, v) + ((kw["mask"],) if isinstance(kw.get("mask"), torch.Tensor)
                          and kw["mask"].requires_grad else ())

    def fn(q, k, v, *bias):
        args = dict(kw)
        if bias:
            args["mask"] = bias[0]
        return qkv.attention(q, k, v, backend=backend, **args)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_module():
    torch.manual_seed(0)
    m = qkv.MultiHeadAttention(8, 4, num_kv_heads=2, kdim=6, vdim=6).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, ctx):
        return m(x, ctx)

    assert torch.autograd.gradcheck(fn, (x, ctx), eps=1e-6, atol=1e-7)
    self_attn = qkv.MultiHeadAttention(8, 4, num_kv_heads=2).double()
    names = [n for n, _ in self_attn.named_parameters()]
    params = [p for _, p in self_attn.named_parameters()]

    def fp(*ps):  # gradients with respect to every learned projection
        return torch.func.functional_call(self_attn, dict(zip(names, ps, strict=True)),
                                          (x.detach(),), {"causal": True})

    assert torch.autograd.gradcheck(fp, tuple(p.detach().requires_grad_() for p in params),
                                    eps=1e-6, atol=1e-7)
