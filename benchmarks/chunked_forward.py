"""Chunked forward against PyTorch SDPA, interleaved in one process (ratios, not seconds).

::

    python benchmarks/chunked_forward.py                    # L=4096, H=8, D=64, float32
    python benchmarks/chunked_forward.py --length 2048 --rounds 9
    python benchmarks/chunked_forward.py --other /path/to/src  # also an older qkv, side by side
    python benchmarks/chunked_forward.py --backward         # forward + backward instead
    python benchmarks/chunked_forward.py --threads 1 --cpu-time   # CPU time, not wall clock

Each round runs every implementation once, non-causal and causal, in turns; the table
gives each one's median over the rounds and the ratio to SDPA's median. ``--other`` loads a
second copy of qkv (its ``src`` folder) under another name, to compare two versions of the
chunked backend on the same machine at the same moment. ``--backward`` times forward +
backward (``out.sum().backward()``, gradients of q, k and v) instead of the forward alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from versions import load_qkv  # benchmarks/versions.py: a second qkv, side by side

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--other", type=Path, default=None, help="src folder of another qkv")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the calling thread's CPU time, not the wall clock (--threads 1 "
                        "only): time the thread spent waiting for a core shared with other "
                        "jobs is left out")
    args = p.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        p.error(f"--cpu-time measures one thread; got --threads {args.threads}. "
                "Fix: add --threads 1, or drop --cpu-time")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    impls = {"this": load_qkv(ROOT / "src", "qkv_this")}
    if args.other is not None:
        impls["other"] = load_qkv(args.other, "qkv_other")
    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_(args.backward) for _ in range(3))

    def finish(out):
        if args.backward:
            out.sum().backward()
        return out

    def sdpa(causal):
        return finish(F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def chunked(mod, causal):
        return finish(mod.attention(q, k, v, causal=causal, backend="chunked"))

    fns = {}
    for causal in (False, True):
        tag = " causal" if causal else ""
        fns["sdpa" + tag] = (lambda c=causal: sdpa(c))
        for name, mod in impls.items():
            fns[f"chunked[{name}]{tag}"] = (lambda m=mod, c=causal: chunked(m, c))
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.inference_mode(not args.backward):
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for n, fn in fns.items():
                t0 = clock()
                fn()
                times[n].append(clock() - t0)
    print(f"L={args.length} H={args.heads} D={args.dim} float32, "
          f"{'forward+backward' if args.backward else 'forward'}, threads={args.threads}, "
          f"median of {args.rounds} interleaved rounds"
          f"{' (CPU time of the calling thread)' if args.cpu_time else ''}")
    print(f"{'impl':<26}{'median s':>10}{'vs SDPA':>9}")
    for n, ts in times.items():
        base = statistics.median(times["sdpa causal" if "causal" in n else "sdpa"])
        med = statistics.median(ts)
        print(f"{n:<26}{med:>10.4f}{med / base:>8.2f}x")


if __name__ == "__main__":
    main()
