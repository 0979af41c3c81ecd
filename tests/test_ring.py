"""Ring attention over torch.distributed (gloo, CPU, spawned processes).

Each spawned run checks many cases at once (starting a process that imports torch costs
seconds): every rank builds the same full q, k, v from a seed, computes the single-process
answer itself, runs ring attention on its shard and reports its errors; the tests below
read those reports.

Tolerances follow DESIGN.md's rule: the ring's max error against the float64 answer
(``qkv.attention`` with the reference backend on float64 inputs) may be at most 2x (output)
or 5x (gradients) the error of the plain reference backend run in the same dtype, + 1e-5.
Float64 cases use the same factors with atol 1e-12: their rounding errors are ~1e-15 at
these sizes, so anything above that is a logic error, not rounding.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import qkv
from multiproc import run_ranks
from qkv.distributed import (
    gather_sequence,
    record_ring_stats,
    ring_attention,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)

from helpers import rand_qkv

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


def _case(layout, causal, *, n, b=2, hq=6, hkv=2, d=11, dv=7, blocks=(None, None),
          dtype="f32", scale=None, seed=0):
    name = (f"{layout}-{'causal' if causal else 'full'}-n{n}-h{hq}/{hkv}-{dtype}"
            f"{'-blocks' if blocks[0] else ''}{'-scale' if scale else ''}")
    return {"name": name, "layout": layout, "causal": causal, "n": n, "b": b, "hq": hq,
            "hkv": hkv, "d": d, "dv": dv, "blocks": blocks, "dtype": dtype, "scale": scale,
            "seed": seed}


def _cases(world):
    """Contiguous/zigzag x causal/not, odd shard lengths (odd zigzag chunks), GQA, MQA,
    D != Dv, block sizes that do not divide the shard, float64, bfloat16."""
    out = []
    for layout in ("contiguous", "zigzag"):
        n = 13 if layout == "contiguous" else 14  # zigzag: two chunks of 7
        for causal in (False, True):
            out.append(_case(layout, causal, n=n, seed=len(out)))
            out.append(_case(layout, causal, n=n + 8, hq=3, hkv=1, b=1, blocks=(4, 5),
                             seed=len(out)))
    out.append(_case("zigzag", True, n=10, hq=4, hkv=4, d=8, dv=8, dtype="f64", seed=20))
    out.append(_case("contiguous", True, n=9, hq=4, hkv=2, d=16, dv=16, dtype="bf16",
                     scale=0.3, seed=21))
    return out


def _answer(q, k, v, g, *, causal, scale):
    """(out, dq, dk, dv) of the reference backend on full tensors, loss = sum(out * g)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = qkv.attention(q, k, v, causal=causal, scale=scale, backend="reference")
    (out.double() * g).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


def _run_case(rank, world, c, *, group=None, group_rank=None, group_size=None):
    """This rank's errors for one case: {quantity: (ring error, baseline error)}."""
    r = rank if group_rank is None else group_rank
    n_ranks = world if group_size is None else group_size
    L = c["n"] * n_ranks
    dtype = DTYPES[c["dtype"]]
    q64, k64, v64 = rand_qkv(c["b"], c["hq"], c["hkv"], L, L, c["d"], c["dv"], seed=c["seed"])
    gen = torch.Generator().manual_seed(c["seed"] + 1000)
    # The upstream gradient, exact in float32 so every dtype's run starts from the same one.
    g = torch.randn(c["b"], c["hq"], L, c["dv"], generator=gen).double()
    want = _answer(q64, k64, v64, g, causal=c["causal"], scale=c["scale"])
    base = _answer(q64.to(dtype), k64.to(dtype), v64.to(dtype), g,
                   causal=c["causal"], scale=c["scale"])

    def shard(t):
        return shard_sequence(t, r, n_ranks, layout=c["layout"])

    qs, ks, vs = (shard(t.to(dtype)).detach().clone().requires_grad_() for t in (q64, k64, v64))
    out = ring_attention(qs, ks, vs, group=group, causal=c["causal"], layout=c["layout"],
                         scale=c["scale"], block_q=c["blocks"][0], block_k=c["blocks"][1])
    (out.double() * shard(g)).sum().backward()
    got = (out, qs.grad, ks.grad, vs.grad)
    names = ("out", "dq", "dk", "dv")
    return {nm: (_err(gt, shard(w)), _err(shard(bs), shard(w)))
            for nm, gt, w, bs in zip(names, got, want, base, strict=True)}


# ---- the spawned runs ------------------------------------------------------------------------
def _ring_worker(rank, world, cases):
    torch.manual_seed(rank)
    report = {"cases": {c["name"]: _run_case(rank, world, c) for c in cases}}

    # The same call on every rank with the size-1 ring of its own: plain attention.
    singles = [dist.new_group([i]) for i in range(world)]
    report["single"] = _run_case(rank, world, cases[0], group=singles[rank], group_rank=0,
                                 group_size=1)
    if world == 4:  # two rings of two over global ranks {0, 2} and {1, 3}
        pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        report["subgroup"] = _run_case(rank, world, cases[-3], group=pairs[rank % 2],
                                       group_rank=rank // 2, group_size=2)

    # Instrumentation: one forward + backward = 2N ring steps, bytes sent, times > 0.
    q, k, v = rand_qkv(1, 2, 1, 8, 8, 4, dtype=torch.float32, seed=rank, requires_grad=True)
    with record_ring_stats() as st:
        ring_attention(q, k, v, causal=True).sum().backward()
    report["stats"] = (st.steps, st.bytes_sent, st.compute_s, st.wait_s)

    # gather_sequence reassembles the full sequence from zigzag shards.
    full = torch.arange(2 * 4 * world, dtype=torch.float32).reshape(1, 1, -1, 1)
    mine = shard_sequence(full, rank, world, layout="zigzag")
    report["gather"] = torch.equal(gather_sequence(mine, layout="zigzag"), full)

    # Shards of unequal length, and options that differ between ranks: every rank raises
    # the same ValueError instead of exchanging mismatched buffers.
    n = 6 + (rank == world - 1)
    q, k, v = rand_qkv(1, 2, 2, n, n, 4, dtype=torch.float32, seed=0)
    report["unequal"] = _error_of(lambda: ring_attention(q, k, v))
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32, seed=0)
    report["disagree"] = _error_of(lambda: ring_attention(q, k, v, causal=rank == 0))
    dist.barrier()
    return report


def _error_of(fn):
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ring_run(request):
    world = request.param
    cases = _cases(world)
    reports = run_ranks(_ring_worker, world, cases, timeout=150)  # from the fork server
    return world, cases, reports


def _check(errs, dtype):
    atol = 1e-12 if dtype == "f64" else 1e-5
    for name, (got, base) in errs.items():
        factor = 2.0 if name == "out" else 5.0
        assert got <= factor * base + atol, (
            f"{name}: ring error {got:.3e} > {factor} x reference error {base:.3e} + {atol:g}")


def test_ring_equals_single_process_attention(ring_run):
    world, cases, reports = ring_run
    for c in cases:
        for rank in range(world):
            errs = reports[rank]["cases"][c["name"]]
            try:
                _check(errs, c["dtype"])
            except AssertionError as e:
                raise AssertionError(f"{world} ranks, case {c['name']}, rank {rank}: {e}") \
                    from None


def test_ring_cases_cover_the_issue(ring_run):
    # The spec's list: both layouts, causal and not, odd lengths per shard (or per zigzag
    # chunk), GQA; each case runs forward and backward on every rank.
    _, cases, _ = ring_run
    combos = {(c["layout"], c["causal"]) for c in cases}
    assert combos == {(lay, cau) for lay in ("contiguous", "zigzag") for cau in (False, True)}
    assert any(c["layout"] == "contiguous" and c["n"] % 2 for c in cases)
    assert any(c["layout"] == "zigzag" and (c["n"] // 2) % 2 for c in cases)
    assert any(c["hq"] != c["hkv"] for c in cases)


def test_ring_of_one_and_subgroups(ring_run):
    world, cases, reports = ring_run
    for rank in range(world):
        _check(reports[rank]["single"], cases[0]["dtype"])
        if world == 4:
            _check(reports[rank]["subgroup"], cases[-3]["dtype"])


def test_ring_stats_and_gather(ring_run):
    world, _, reports = ring_run
    for rank in range(world):
        steps, sent, compute_s, wait_s = reports[rank]["stats"]
        assert steps == 2 * world  # N forward steps, N backward steps
        # forward: N-1 k/v shards; backward: N-1 shards + N gradient accumulators; each is
        # k and v of 8 positions x 4 dims in float32
        assert sent == ((world - 1) * 2 + world) * (2 * 8 * 4) * 4
        assert compute_s > 0 and wait_s >= 0
        assert reports[rank]["gather"]


def test_unequal_shards_raise_on_every_rank(ring_run):
    world, _, reports = ring_run
    lengths = [6] * (world - 1) + [7]
    for rank in range(world):
        msg = reports[rank]["unequal"]
        assert msg is not None and msg.startswith("ValueError")
        assert "equal length" in msg and str(lengths) in msg
        msg = reports[rank]["disagree"]
        assert msg is not None and msg.startswith("ValueError") and "causal" in msg


# ---- faults: a rank that dies, a rank that stops taking part -----------------------------------
def _die_worker(rank, world, ready_dir):
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32, seed=rank)
    ring_attention(q, k, v, causal=True)  # the ring works ...
    dist.barrier()
    if rank == 1:
        os._exit(1)  # ... then rank 1 dies without a word
    time.sleep(0.5)
    t0 = time.monotonic()
    msg = _error_of(lambda: ring_attention(q, k, v, causal=True))  # fails in the shape check
    p2p = _error_of(lambda: ring_attention(q, k, v, causal=True, check=False))  # in the ring
    return msg, p2p, time.monotonic() - t0


def _stuck_worker(rank, world, done_file):
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32, seed=rank)
    if rank == 1:  # alive but never calls ring_attention; leaves once rank 0 is done
        deadline = time.monotonic() + 30
        while not os.path.exists(done_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    t0 = time.monotonic()
    msg = _error_of(lambda: ring_attention(q, k, v, timeout=1.5, check=False))
    elapsed = time.monotonic() - t0
    open(done_file, "w").close()
    return msg, elapsed


def test_dead_rank_makes_the_others_fail_clearly(tmp_path):
    pg_timeout = 20.0
    reports = run_ranks(_die_worker, 3, str(tmp_path), timeout=90, pg_timeout=pg_timeout,
                        allow_missing=True)
    assert sorted(reports) == [0, 2]
    for rank in (0, 2):
        msg, p2p, elapsed = reports[rank]
        for m, where in ((msg, "comparing the ranks' shapes"),
                         (p2p, "passing key/value shards (forward step 0)")):
            assert m is not None and m.startswith("RuntimeError"), m
            assert f"ring attention failed on rank {rank} of 3 while {where}" in m
            assert "has died" in m
        assert elapsed < pg_timeout, f"rank {rank} took {elapsed:.1f} s"


def test_stuck_rank_times_out_clearly(tmp_path):
    reports = run_ranks(_stuck_worker, 2, str(tmp_path / "done"), timeout=60)
    msg, elapsed = reports[0]
    assert msg is not None and msg.startswith("RuntimeError"), msg
    assert "timeout=1.5 s" in msg and "forward step 0" in msg
    assert 1.0 < elapsed < 10.0


# ---- in-process: sharding helpers and input checks -----------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_unshard_roundtrip(layout, world):
    L = 2 * world * 5
    x = torch.randn(2, 3, L, 4)
    shards = [shard_sequence(x, r, world, layout=layout) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    pos = torch.arange(L, dtype=x.dtype).reshape(1, 1, L, 1)
    for r in range(world):
        p = shard_positions(L, r, world, layout=layout)
        assert torch.equal(shard_sequence(pos, r, world, layout=layout).flatten().long(), p)
        assert torch.all(p[1:] > p[:-1])  # increasing: the local causal mask is the diagonal
    if layout == "zigzag" and world > 1:  # chunks r and 2N-1-r: equal causal work per rank
        work = [int(shard_positions(L, r, world, layout=layout).sum()) for r in range(world)]
        assert len(set(work)) == 1


def test_shard_errors():
    x = torch.randn(1, 1, 10, 2)
    with pytest.raises(ValueError, match="multiple of 3"):
        shard_sequence(x, 0, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_sequence(torch.randn(1, 1, 6, 2), 0, 2, layout="zigzag")
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(x, 0, 2, layout="striped")
    with pytest.raises(ValueError, match="rank"):
        shard_positions(10, 2, 2)
    with pytest.raises(ValueError, match="equal lengths"):
        unshard_sequence([x, x[:, :, :4]])


def test_ring_input_errors():
    q, k, v = rand_qkv(1, 4, 2, 6, 6, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, k, v, layout="striped")
    with pytest.raises(ValueError, match="even shard length"):
        ring_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], layout="zigzag")
    with pytest.raises(ValueError, match="same positions"):
        ring_attention(q[:, :, :4], k, v)
    with pytest.raises(ValueError, match="multiple of the key heads"):
        ring_attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        ring_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="4 dims"):
        ring_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="timeout"):
        ring_attention(q, k, v, timeout=0)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ring_attention(q, k, v)
