"""qkv.attention against the float64 NumPy oracle, for every CPU backend."""

import pytest
import torch

import qkv

from helpers import CPU_BACKENDS, oracle, rand_qkv

# float64 in, float64 compute: the only error is summation order.
TOL = 1e-10

#: Backends documented not to return weights (PyTorch's SDPA computes none).
NO_WEIGHTS = {"torch"}


def check(q, k, v, backend, **kw):
    out = qkv.attention(q, k, v, backend=backend, **kw)
    want, _ = oracle(q, k, v, **kw)
    assert out.shape == want.shape
    assert out.dtype == q.dtype
    assert torch.allclose(out, want, atol=TOL, rtol=0), float((out - want).abs().max())
    return out


@pytest.mark.parametrize("lq,lk", [(97, 203), (203, 97), (1, 203), (97, 1), (13, 13)])
@pytest.mark.parametrize("heads", [(6, 3), (3, 3), (6, 1)])
def test_odd_sizes_against_oracle(backend, lq, lk, heads):
    q, k, v = rand_qkv(2, heads[0], heads[1], lq, lk, 59, 31, seed=lq * lk)
    check(q, k, v, backend)
    check(q, k, v, backend, causal=True)


@pytest.mark.parametrize("batch", [(), (1,), (2, 3)])
def test_leading_batch_dims(backend, batch):
    q, k, v = rand_qkv(None, 4, 2, 7, 11, 5, 3, batch=batch, seed=1)
    out = check(q, k, v, backend, window=(2, 1))
    assert out.shape == (*batch, 4, 7, 3)


@pytest.mark.parametrize("lq,lk", [(0, 5), (5, 0), (0, 0)])
def test_zero_lengths(backend, lq, lk):
    q, k, v = rand_qkv(2, 3, 3, lq, lk, 8, 4, requires_grad=True)
    out = qkv.attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, lq, 4)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # still part of the graph, gradients are zero
    for t in (q, k, v):
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))


def test_explicit_scale(backend):
    q, k, v = rand_qkv(1, 2, 2, 9, 10, 8)
    check(q, k, v, backend, scale=0.37)
    check(q, k, v, backend, scale=0.0)  # uniform weights over the visible keys


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backends_agree_in_float32(name):
    q, k, v = rand_qkv(2, 4, 2, 33, 45, 16, dtype=torch.float32, seed=3)
    m = torch.rand(2, 1, 33, 45, generator=torch.Generator().manual_seed(4)) > 0.2
    want, _ = oracle(q, k, v, mask=m, window=(7, None))
    out = qkv.attention(q, k, v, mask=m, window=(7, None), backend=name)
    assert out.dtype == torch.float32
    # float32 rounding of a softmax-weighted mean of O(1) values: a few ulps per term.
    assert torch.allclose(out.double(), want, atol=2e-6, rtol=0)


def test_return_weights_match_oracle(backend):
    q, k, v = rand_qkv(2, 4, 2, 17, 23, 8, 5)
    m = torch.rand(17, 23, generator=torch.Generator().manual_seed(0)) > 0.4
    if backend in NO_WEIGHTS:  # it must refuse, naming the option, never return wrong weights
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot.*return_weights"):
            qkv.attention(q, k, v, mask=m, causal=True, return_weights=True, backend=backend)
        return
    out, w = qkv.attention(q, k, v, mask=m, causal=True, return_weights=True,
                           backend=backend)
    want_out, want_w = oracle(q, k, v, mask=m, causal=True)
    assert w.shape == (2, 4, 17, 23)
    assert torch.allclose(w, want_w, atol=TOL, rtol=0)
    assert torch.allclose(out, want_out, atol=TOL, rtol=0)


def test_auto_logs_its_choice(caplog):
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 8)
    with caplog.at_level("DEBUG", logger="qkv"):
        qkv.attention(q, k, v)
        qkv.attention(q, k, v, return_weights=True)
    msgs = [r.getMessage() for r in caplog.records if "auto chose" in r.getMessage()]
    assert len(msgs) == 2
    assert "torch" not in msgs[1].split("auto chose")[1].split("(")[0]  # SDPA has no weights


def test_backends_lists_names():
    names = qkv.backends()
    assert "reference" in names and "torch" in names
    assert all(isinstance(n, str) for n in names)


def test_non_contiguous_inputs_and_output_grads(backend):
    """flash-attention #355: a non-contiguous upstream gradient must give the same grads."""
    base = torch.randn(2, 9, 4, 3, 8, dtype=torch.float64, generator=torch.Generator()
                       .manual_seed(0))
    q, k, v = (base[:, :, :, i].transpose(1, 2).requires_grad_() for i in range(3))  # strided
    assert not q.is_contiguous()
    dout = torch.randn(2, 9, 4, 8, dtype=torch.float64).transpose(1, 2)  # (B, H, L, D) strided
    out = qkv.attention(q, k, v, causal=True, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(qkv.attention(qc, kc, vc, causal=True, backend="reference"),
                               (qc, kc, vc), dout.contiguous())
    for g, w in zip(grads, want, strict=True):
        assert torch.allclose(g, w, atol=TOL, rtol=0)
