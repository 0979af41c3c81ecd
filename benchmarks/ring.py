"""Ring attention on N local CPU processes (gloo) against one process: time, memory, traffic.

::

    python benchmarks/ring.py                   # B=2 H=8 D=64, L=4096, causal; N = 1, 2, 4
    python benchmarks/ring.py --quick           # a small size, for a smoke test (~20 s)
    python benchmarks/ring.py --length 16384 --procs 1 2 --layouts zigzag

For every N the sequence of L positions is cut into N shards (``--layouts``: zigzag and
contiguous); each rank runs ``qkv.distributed.ring_attention`` forward and backward on its
shard. N = 1 is plain ``qkv.attention(..., backend="chunked")`` on the whole sequence in one
process without torch.distributed, what a user would run instead, and the same with
``backend="reference"`` (the textbook O(L^2) computation) when it fits in half the memory
available. Reported per run:

* forward / backward seconds (the slowest rank; medians over ``--reps``);
* per rank: compute seconds (local blocks and merges) and wait seconds (blocked on a
  transfer that the computation did not hide), the comm share ``wait / (compute + wait)``,
  and the compute imbalance ``max / min`` over ranks (causal contiguous shards are
  unbalanced, zigzag ones are not);
* megabytes sent per rank, and the peak memory per rank: the growth of the process's peak
  resident set (``VmHWM``, reset before the measurement where the kernel allows it) over
  its resident set just before the run, so the torch runtime itself is left out; and the
  ratio to N = 1 (the target is ~1/N).

Threads: the machine's cores are split between the ranks (``max(1, cores // N)`` each), so
every N uses the same cores; with N > cores processes share cores and the times include
that contention. Prints one table and writes JSON (``--json``, default
``$OUT/ring_bench.json`` when ``$OUT`` is set).

Memory, honestly. At the default size the reference backend keeps its (L x L) steps for
every head, several GiB: about what one process may take of a 24 GiB machine that five
people share, which is the size this benchmark calls "one process can barely hold". The
chunked backend needs O(L) memory (tens of MiB here) and ring attention divides that by
N. On CPU the O(L^2) compute binds long before the chunked backend's O(L) memory does: one
process could hold a sequence 100x longer in 24 GiB, but one step would take hours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import queue
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's qkv, even when another is installed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096, help="global sequence length L")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA)")
    p.add_argument("--dim", type=int, default=64, help="head dim D (= Dv)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="values of N")
    p.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"],
                   choices=["zigzag", "contiguous"])
    p.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the one-process run of the reference backend")
    p.add_argument("--reps", type=int, default=1, help="timed repetitions (median)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="cores shared by the ranks of one run")
    p.add_argument("--quick", action="store_true", help="L=1024, B=1, H=8: a smoke test")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default: $OUT/ring_bench.json, if $OUT set)")
    args = p.parse_args(argv)
    if args.quick:
        args.length, args.batch, args.heads = 1024, 1, 8
    args.kv_heads = args.kv_heads or args.heads
    for n in args.procs:
        parts = n * 2
        if args.length % parts:
            p.error(f"--length {args.length} must be a multiple of 2N = {parts} for N = {n}")
    return args


# ---- one rank -------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where it is not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure(args, rank: int, world: int, layout: str) -> dict:
    """Forward + backward on this rank's shard; times, ring stats and memory."""
    import torch
    import torch.distributed as dist

    import qkv
    from qkv.distributed import record_ring_stats, ring_attention

    causal = not args.no_causal
    n = args.length // world
    g = torch.Generator().manual_seed(1234 + rank)
    shape_q = (args.batch, args.heads, n, args.dim)
    shape_kv = (args.batch, args.kv_heads, n, args.dim)
    # A small untimed call: opens the P2P connections and pays one-time costs (the first
    # backward with an explicit gradient imports sympy, ~2 s) outside the measurement.
    tiny = [torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3)]
    out = (ring_attention(*tiny, causal=causal, layout=layout) if world > 1
           else qkv.attention(*tiny, causal=causal, backend=layout))
    out.backward(torch.ones_like(out))
    if world > 1:
        dist.barrier()
    fwd, bwd, stats = [], [], []
    for _ in range(args.reps):
        q = torch.randn(shape_q, generator=g, requires_grad=True)
        k = torch.randn(shape_kv, generator=g, requires_grad=True)
        v = torch.randn(shape_kv, generator=g, requires_grad=True)
        dout = torch.randn(shape_q, generator=g)
        if world > 1:
            dist.barrier()
        rss0 = _rss_bytes()
        exact_peak = _reset_peak()
        with record_ring_stats() as st:
            t0 = time.perf_counter()
            if world > 1:
                out = ring_attention(q, k, v, causal=causal, layout=layout)
            else:
                out = qkv.attention(q, k, v, causal=causal, backend=layout)
            t1 = time.perf_counter()
            out.backward(dout)
            t2 = time.perf_counter()
        peak = _peak_bytes() - rss0
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        stats.append({"compute_s": st.compute_s if world > 1 else t2 - t0,
                      "wait_s": st.wait_s, "sent_mb": st.bytes_sent / 2**20,
                      "peak_mb": max(0, peak) / 2**20, "exact_peak": exact_peak})
        del q, k, v, dout, out
    med = stats[len(stats) // 2]
    # q, out, dout, dq and k, v, dk, dv of the shard, float32: the floor of any method
    q_n, kv_n = args.batch * args.heads * n * args.dim, args.batch * args.kv_heads * n * args.dim
    shard_mb = 4 * (4 * q_n + 4 * kv_n) / 2**20
    return {"rank": rank, "forward_s": statistics.median(fwd),
            "backward_s": statistics.median(bwd), "shard_tensors_mb": shard_mb, **med}


def _child(args, rank, world, layout, port, threads, out):
    import torch

    torch.set_num_threads(threads)
    try:
        if world > 1:
            import torch.distributed as dist

            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            store = dist.TCPStore("127.0.0.1", port, world, False,
                                  timeout=datetime.timedelta(seconds=120))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=600))
        out.put(("ok", _measure(args, rank, world, layout)))
    except BaseException as e:  # report and exit
        out.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
    out.close()
    out.join_thread()
    os._exit(0)


def run(args, world: int, layout: str) -> list[dict]:
    """Start ``world`` fresh processes (spawn: nothing inherited, so memory is the run's)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    threads = max(1, args.cores // world)
    procs = [ctx.Process(target=_child, args=(args, r, world, layout, store.port, threads, out))
             for r in range(world)]
    for p in procs:
        p.start()
    rows, errors = [], []
    while len(rows) + len(errors) < world:
        try:
            status, value = out.get(timeout=1.0)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and out.empty():
                errors.append("a rank exited without reporting (out of memory?)")
                break
            continue
        (rows if status == "ok" else errors).append(value)
    for p in procs:
        p.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return sorted(rows, key=lambda r: r["rank"])


def _reference_bytes(args) -> int:
    """What the reference backend's forward + backward keep alive, roughly: its four
    (B, H, L, L) float32 steps of the forward, and as many again in the backward."""
    return 8 * args.batch * args.heads * args.length**2 * 4


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- report ---------------------------------------------------------------------------------
def summarise(world: int, layout: str, rows: list[dict], base_peak: float | None,
              threads: int) -> dict:
    compute = [r["compute_s"] for r in rows]
    wait = [r["wait_s"] for r in rows]
    peak = max(r["peak_mb"] for r in rows)
    return {
        "N": world, "layout": layout if world > 1 else f"one process ({layout})",
        "threads_per_rank": threads,
        "forward_s": max(r["forward_s"] for r in rows),
        "backward_s": max(r["backward_s"] for r in rows),
        "compute_s_min": min(compute), "compute_s_max": max(compute),
        "wait_s_max": max(wait),
        "comm_share_max": max(w / (c + w) if c + w > 0 else 0.0
                              for c, w in zip(compute, wait, strict=True)),
        "imbalance": max(compute) / min(compute) if min(compute) > 0 else float("nan"),
        "sent_mb_per_rank": max(r["sent_mb"] for r in rows),
        "peak_mb_per_rank": peak,
        "peak_vs_one_process": None if not base_peak else peak / base_peak,
        "shard_tensors_mb": rows[0]["shard_tensors_mb"],
        "exact_peak": all(r["exact_peak"] for r in rows),
        "ranks": rows,
    }


def print_table(results: list[dict]) -> None:
    head = (f"{'N':>2} {'layout':24} {'thr':>3} {'fwd s':>7} {'bwd s':>7} {'compute s':>13} "
            f"{'wait s':>7} {'comm':>5} {'imbal':>5} {'sent MB':>8} {'peak MB':>8} "
            f"{'vs N=1':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        ratio = "" if r["peak_vs_one_process"] is None else f"{r['peak_vs_one_process']:.2f}"
        print(f"{r['N']:>2} {r['layout']:24} {r['threads_per_rank']:>3} {r['forward_s']:7.2f} "
              f"{r['backward_s']:7.2f} {r['compute_s_min']:6.2f}-{r['compute_s_max']:<6.2f} "
              f"{r['wait_s_max']:7.2f} {r['comm_share_max']:5.0%} {r['imbalance']:5.2f} "
              f"{r['sent_mb_per_rank']:8.1f} {r['peak_mb_per_rank']:8.0f} {ratio:>6}")


def main(argv=None) -> None:
    args = parse_args(argv)
    causal = not args.no_causal
    print(f"ring attention, {'causal' if causal else 'full'}: L={args.length} B={args.batch} "
          f"H={args.heads} Hkv={args.kv_heads} D={args.dim} float32, {args.cores} cores, "
          f"N={args.procs}, reps={args.reps}")
    results, base_peak = [], None
    singles = ["chunked"]
    if not args.no_reference:
        need = _reference_bytes(args)
        if need < _available_bytes() / 2:
            singles.append("reference")
        else:
            print(f"  skipping the reference backend: it would need ~{need / 2**30:.1f} GiB, "
                  f"over half of the {_available_bytes() / 2**30:.1f} GiB available")
    for world in args.procs:
        for layout in (args.layouts if world > 1 else singles):
            t0 = time.perf_counter()
            rows = run(args, world, layout)
            s = summarise(world, layout, rows, base_peak, max(1, args.cores // world))
            if world == 1 and layout == "chunked":
                base_peak = s["peak_mb_per_rank"]
            s["wall_s"] = time.perf_counter() - t0
            results.append(s)
            print(f"  N={world} {layout}: done in {s['wall_s']:.0f} s", flush=True)
    print()
    print_table(results)
    if not all(r["exact_peak"] for r in results):
        print("note: the kernel did not let the peak-RSS counter be reset; peaks are the "
              "process's lifetime peak minus its RSS before the run")
    path = args.json or (Path(os.environ["OUT"]) / "ring_bench.json"
                         if os.environ.get("OUT") else None)
    if path is not None:
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()}, "results": results}
        path.write_text(json.dumps(payload, indent=1))
        print(f"JSON: {path}")


if __name__ == "__main__":
    main()
