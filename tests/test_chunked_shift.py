"""Fixed shifts in the chunked forward: the online softmax without a running max.

Softmax does not depend on the shift subtracted before ``exp``. On CPU the forward bounds
every query's scores by Cauchy-Schwarz (``|scale| |q_i| max_j |k_j|``) and then either
exponentiates them unshifted (every bound <= UNSHIFTED), or takes each row's bound as its
shift once the running max shows the bound within SPAN of the row's largest score, or
keeps the running max. Each way is forced here by the data and held to the float64
oracle (float64) or the low-precision rule (float32), output and gradients; so are the
guards: NaN/inf inputs, values large enough that unshifted sums would overflow, bounds
far above the scores, additive masks; and so are the real queries, keys and values of
every layer of all-MiniLM-L6-v2.
"""

import math

import pytest
import torch

import qkv
from qkv.kernels.chunked import block_sizes, chunked_forward
from qkv.kernels.chunked.blocks import SPAN, UNSHIFTED, Blocks
from qkv.masks import Mask

from helpers import (
    assert_grads_lowp_rule,
    assert_lowp_rule,
    lowp_baseline,
    max_err,
    oracle,
    rand_qkv,
)

EPS64 = torch.finfo(torch.float64).eps


class _Seen(list):
    """The ways taken, in call order; ``units``: the way of each unit by its first query."""

    def __init__(self):
        super().__init__()
        self.units: dict[int, str] = {}


@pytest.fixture
def modes(monkeypatch):
    """Record how each forward call shifts: 'unshifted', and per unit 'bound' or
    'running' (the running max kept after the first tiles)."""
    seen = _Seen()
    prepare, fixed = Blocks.prepare_fixed_shifts, Blocks.fixed_shift

    def spy_prepare(self):
        prepare(self)
        if self.unshifted:
            seen.append("unshifted")

    def spy_fixed(self, grp, q0, q1, row_max):
        out = fixed(self, grp, q0, q1, row_max)
        seen.append("running" if out is None else "bound")
        seen.units[q0] = seen[-1]
        return out

    monkeypatch.setattr(Blocks, "prepare_fixed_shifts", spy_prepare)
    monkeypatch.setattr(Blocks, "fixed_shift", spy_fixed)
    return seen


def shaped(kind: str, dtype, seed: int, lq=150, lk=170, d=16, hq=2, hkv=2):
    """q, k, v whose scores take one way: 'small' (unshifted), 'large' (bound), 'orthogonal'
    (norms of 40, scores near 0: bounds far above the scores)."""
    q, k, v = rand_qkv(1, hq, hkv, lq, lk, d, dtype=dtype, seed=seed)
    if kind == "large":  # both near one direction: scores of 40-70, bounds just above
        u = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        u = 14 * u / u.norm()
        q, k = q + u, k + u
    elif kind == "orthogonal":  # q lives in the first half of the dims, k in the second
        q = q.clone()
        k = k.clone()
        q[..., d // 2:] *= 1e-3
        k[..., : d // 2] *= 1e-3
        q, k = q * 15, k * 15
    return q, k, v


def tol64(q, k, v) -> float:
    """Rounding bound of a float64 output: the oracle's (d + Lk + 8) eps |v|, plus the
    rounding of shifted scores, at most 4 bound_max eps relative per weight."""
    d = q.shape[-1]
    bound = float(q.norm(dim=-1).max() * k.norm(dim=-1).max()) / math.sqrt(d)
    return (d + k.shape[-2] + 8 + 4 * bound) * EPS64 * max(1.0, float(v.abs().max()))


CASES = [("small", "unshifted"), ("large", "bound"), ("orthogonal", "running")]


@pytest.mark.parametrize("kind,mode", CASES)
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (40, 9)}],
                         ids=["full", "causal", "window"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_each_way_meets_the_float64_oracle(modes, kind, mode, kw, heads):
    """float64, blocks (64, 48): the way the data asks for is the one taken, and the
    output is within the rounding bound of the oracle."""
    q, k, v = shaped(kind, torch.float64, seed=len(kw) + heads[0], hq=heads[0], hkv=heads[1])
    want, _ = oracle(q, k, v, **kw)
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", **kw)
    assert mode in modes, modes
    if mode == "unshifted":
        assert "running" not in modes and "bound" not in modes
    else:
        assert "unshifted" not in modes
    assert max_err(out, want) <= tol64(q, k, v), (kind, kw)


@pytest.mark.parametrize("kind,mode", CASES)
@pytest.mark.parametrize("kw", [{}, {"causal": True}], ids=["full", "causal"])
def test_each_way_in_float32_meets_the_low_precision_rule(modes, kind, mode, kw):
    """float32, output and gradients: within the low-precision rule (2x / 3x the error of
    a float32 baseline, + 1e-5) against float64, on every way."""
    q, k, v = shaped(kind, torch.float32, seed=7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", **kw)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert mode in modes, modes
    want, _ = oracle(q, k, v, **kw)
    assert_lowp_rule(out, want, lowp_baseline(q, k, v, **kw))
    assert_grads_lowp_rule(grads, q, k, v, dout, **kw)


def test_stats_are_the_shift_and_give_the_exact_weights():
    """stats=True returns (shift, 1/sum): 0 for unshifted calls, and in every way
    exp(score - shift) / sum equals the oracle's weights, with lse their log-sum-exp."""
    for kind in ("small", "large", "orthogonal"):
        q, k, v = shaped(kind, torch.float64, seed=3)
        mask = Mask(q.shape[2], k.shape[2])
        _, (shift, inv) = chunked_forward(q, k, v, mask, 0.25, stats=True, block_q=64,
                                          block_k=48)
        _, lse = chunked_forward(q, k, v, mask, 0.25, block_q=64, block_k=48)
        if kind == "small":
            assert not shift.any()
        scores = (q @ k.mT) * 0.25  # (1, 2, Lq, Lk)
        w = torch.exp(scores - shift[..., None]) * inv[..., None]
        want = torch.softmax(scores, dim=-1)
        assert max_err(w, want) <= 1e-12, kind
        assert max_err(lse, torch.logsumexp(scores, dim=-1)) <= 1e-12 * (1 + float(
            scores.abs().max())), kind


def test_values_that_would_overflow_unshifted_sums_take_the_bound(modes):
    """Scores near UNSHIFTED and values of 1e27: exp(score) * value summed over the keys
    would pass float32's range, so the call takes the bounds as shifts and stays finite
    and within the rule."""
    torch.manual_seed(0)
    d, lk = 16, 300
    k = torch.randn(1, 1, 1, d).expand(1, 1, lk, d) + 0.01 * torch.randn(1, 1, lk, d)
    q = k[:, :, :100].clone()
    scale = 0.9 * UNSHIFTED / float(k.norm(dim=-1).max() ** 2)  # scores just below 27
    v = torch.randn(1, 1, lk, 8) * 1e27
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", scale=scale)
    assert "unshifted" not in modes and "bound" in modes, modes
    assert torch.isfinite(out).all()
    want, _ = oracle(q, k, v, scale=scale)
    assert_lowp_rule(out / 1e27, want / 1e27, lowp_baseline(q, k, v, scale=scale) / 1e27)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_or_inf_anywhere_keeps_the_running_max(modes, where):
    """A NaN (or inf) in q, k or v makes some bound non-finite: no fixed shift, and the
    NaN reaches exactly what the oracle says: a key's only the rows that see it (causal),
    a value's every row (non-causal: the oracle multiplies hidden values by 0)."""
    q, k, v = rand_qkv(1, 2, 2, 130, 130, 8, dtype=torch.float32, seed=1)
    t = {"q": q, "k": k, "v": v}[where].clone()
    t[..., 70, 0] = float("nan")
    t[..., 71, 1] = float("inf")
    q, k, v = (t if name == where else x for name, x in zip("qkv", (q, k, v), strict=True))
    causal = where != "v"
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", causal=causal)
    assert modes and set(modes) == {"running"}, modes
    want, _ = oracle(q, k, v, causal=causal)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    ok = torch.isfinite(want)
    assert ok.any() and max_err(out[ok], want[ok]) <= 1e-5


def test_an_additive_mask_keeps_the_running_max(modes):
    """A bias can lift a score past its Cauchy-Schwarz bound: calls with one never take
    a fixed shift, and still meet the oracle."""
    q, k, v = rand_qkv(1, 2, 2, 100, 120, 8, seed=2)
    bias = torch.randn(1, 1, 100, 120, dtype=torch.float64) * 50
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked", mask=bias)
    assert modes and set(modes) == {"running"}, modes
    want, _ = oracle(q, k, v, mask=bias)
    assert max_err(out, want) <= 1e-11


def test_a_unit_with_one_loose_row_keeps_the_running_max_for_that_unit(modes):
    """Bounds are checked per unit: one query of norm 1000 orthogonal to every key (scores
    0, bound about 4000) sends its own unit of queries to the running max; the other
    units take the bound."""
    q, k, v = shaped("large", torch.float64, seed=4, lq=192, hq=1, hkv=1)
    q, k = q.clone(), k.clone()
    k[..., 0] = 0.0
    q[..., 10, :] = 0.0
    q[..., 10, 0] = 1000.0
    want, _ = oracle(q, k, v)
    with block_sizes(64, 48):
        out = qkv.attention(q, k, v, backend="chunked")
    assert modes.units == {0: "running", 64: "bound", 128: "bound"}, modes.units
    assert max_err(out, want) <= tol64(q, k, v)


def test_constants_leave_room():
    """Unshifted weights lie within exp(+-UNSHIFTED) and shifted ones reach exp(-SPAN) at
    the largest: both far inside float32's normal range (exp(-87)), so weights that
    underflow are below exp(-47) of the largest."""
    assert UNSHIFTED <= 40 and SPAN <= 40


def test_real_queries_and_keys_of_every_minilm_layer(monkeypatch, modes):
    """The q, k and v that all-MiniLM-L6-v2 computes for an English text, in every layer,
    tiled to 768 tokens (so that blocks take fixed shifts): full and causal attention
    meet the low-precision rule, and both fixed ways occur (its first layer's scores are
    large enough to take the bound, the others' are exponentiated unshifted)."""
    import qkv.layers

    model = qkv.load_pretrained()
    calls = []
    real = qkv.layers.attention

    def record(q, k, v, *a, **kw):
        calls.append((q[:, :4].clone(), k[:, :4].clone(), v[:, :4].clone()))  # 4 heads
        return real(q, k, v, *a, **kw)

    with monkeypatch.context() as mp, torch.no_grad():
        mp.setattr(qkv.layers, "attention", record)
        model.encode("The animal didn't cross the street because it was too tired, and "
                     "the river was wide. " * 8)
    assert len(calls) == 6
    modes.clear()
    for q, k, v in calls:
        reps = -(-768 // q.shape[2])
        q, k, v = (t.repeat(1, 1, reps, 1)[:, :, :768] for t in (q, k, v))
        for causal in (False, True):
            out = qkv.attention(q, k, v, causal=causal, backend="chunked")
            want, _ = oracle(q, k, v, causal=causal)
            assert_lowp_rule(out, want, lowp_baseline(q, k, v, causal=causal))
    assert "unshifted" in modes and "bound" in modes, modes
