"""qkv.explain returns the five steps of the mechanism, each equal to its formula."""

import math

import numpy as np
import torch

import qkv
from qkv import reference_numpy

from helpers import rand_qkv


def test_steps_follow_the_textbook():
    q, k, v = rand_qkv(2, 4, 2, 5, 7, 6, 3, seed=2)
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    s = qkv.explain(q, k, v, mask=keep, causal=True)
    kk = k.repeat_interleave(2, dim=1)
    scores = q @ kk.transpose(-1, -2)
    assert torch.allclose(s.scores, scores, atol=1e-12)
    assert s.scale == 1 / math.sqrt(6)
    assert torch.allclose(s.scaled, scores / math.sqrt(6), atol=1e-12)
    visible = keep & qkv.causal_mask(5, 7)
    assert torch.equal(torch.isinf(s.masked), ~visible.expand_as(s.masked))
    assert torch.equal(s.masked[..., visible], s.scaled[..., visible])
    out, w = reference_numpy.attention(q.numpy(), k.numpy(), v.numpy(), mask=keep.numpy(),
                                       causal=True)
    assert np.allclose(s.weights.numpy(), w, atol=1e-12)
    assert np.allclose(s.output.numpy(), out, atol=1e-12)
    assert s.output.shape == (2, 4, 5, 3)


def test_steps_keep_the_batch_shape_and_additive_mask():
    q, k, v = rand_qkv(None, 2, 2, 3, 4, 5, batch=(2, 3))
    bias = torch.randn(3, 4, dtype=torch.float64)
    s = qkv.explain(q, k, v, mask=bias)
    assert s.scores.shape == (2, 3, 2, 3, 4)
    assert torch.allclose(s.masked, s.scaled + bias, atol=1e-12)
    assert torch.allclose(s.weights, torch.softmax(s.masked, -1), atol=1e-12)


def test_low_precision_steps_are_float32_and_output_keeps_dtype():
    q, k, v = rand_qkv(1, 1, 1, 3, 4, 8, dtype=torch.bfloat16)
    s = qkv.explain(q, k, v)
    assert s.scores.dtype == torch.float32 and s.weights.dtype == torch.float32
    assert s.output.dtype == torch.bfloat16


def test_steps_repr_and_tables():
    """A short repr, and in a notebook the five steps as tables of the real numbers; big
    calls show the first rows/columns/heads and say so."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, n, 4, generator=g) for n in (20, 15, 15))
    v = v[..., :3]
    s = qkv.explain(q, k, v, causal=True)
    assert repr(s) == ("AttentionSteps(batch (1, 2), 3 heads, Lq=20, Lk=15, Dv=3, "
                       "scale=0.5, float32)")
    page = s._repr_html_()
    for title in ("1. scores", "2. scaled", "3. masked", "4. weights", "5. output"):
        assert page.count(title) == 2  # heads 0 and 1
    assert "batch element (0, 0) shown of (1, 2)" in page
    assert "heads 0..1 shown of 3" in page and "cut at 12 rows x 12 columns" in page
    assert "8 more queries" in page and "3 more</th>" in page
    assert f"{float(s.weights[0, 0, 1, 0, 0]):.3f}" in page
    assert "−∞" in page  # causal: hidden keys of the first queries
    assert "<script" not in page and " id=" not in page
