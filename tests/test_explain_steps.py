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
