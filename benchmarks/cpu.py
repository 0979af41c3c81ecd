"""CPU benchmark of the chunked backend against the reference and PyTorch SDPA.

::

    python benchmarks/cpu.py            # the full run (about 15-25 minutes on 2 cores)
    python benchmarks/cpu.py --quick    # a small smoke run (about a minute)

One run, one table (and JSON): float32, B=1, H=8, D=64, L in {1024, 4096, 16384}, causal
and not, forward (``fwd``) and forward + backward (``fwd+bwd``), for ``reference``,
``chunked`` and ``torch`` (``F.scaled_dot_product_attention``, PyTorch's fused CPU
kernel), with the ratio chunked / SDPA per row; then the forward of ``chunked`` at
L=65536, which the reference could not hold.

Measurements, each in a fresh subprocess so that cases do not pollute each other:

* time: one subprocess per length and pass runs the implementations, non-causal and
  causal, in turns (torch, chunked, reference, torch causal, ..., torch, ...) after a
  warm-up of each, and keeps each one's best of ``--reps`` turns (2 turns, no warm-up, at
  L >= 16384). Taking turns within seconds of each other keeps the ratios (chunked/SDPA,
  causal/non-causal) robust when the load of a shared machine changes during the run. The
  reference takes its turns in a subprocess of its own: allocating and freeing its
  gigabytes slows whatever runs next;
* peak memory: one subprocess per case (implementation x row) runs it once and reports the
  growth of its peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its
  resident set just before the run, so the torch runtime and the inputs are left out;
* every subprocess's address space is capped (``--mem-cap-gib``, RLIMIT_AS), so a case that
  does not fit fails at once instead of swapping a machine other people share. The
  reference is not timed where its analytic need (four ``(B, H, L, L)`` float32 steps in
  the forward, about three more in the backward) exceeds the cap; its memory case then
  reports ``OOM`` with that need.

Threads: ``torch.set_num_threads(--threads)`` in every subprocess (default: every core).
The three implementations of one row run one after the other, so they see the same
machine; on a machine shared with other work, compare ratios, not seconds.

Targets (issue 5) are checked at the end: forward <= 1.3x SDPA at L=4096, forward +
backward <= 1.6x; causal <= 0.6x non-causal (chunked, L=4096); chunked's peak memory at
L=16384 forward + backward under 10% of the reference's; L=65536 forward runs; chunked
never slower than the reference at L >= 1024.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("reference", "chunked", "torch")
B, H, D = 1, 8, 64
FLOAT = 4  # bytes of float32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small smoke run: L in {256, 1024}, long forward at L=4096, 1 rep")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--long", type=int, default=65536, help="length of the chunked-only forward")
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (best is kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mem-cap-gib", type=float, default=8.0,
                   help="address-space cap of each case's subprocess")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default: runs/bench/cpu-<time>.json)")
    p.add_argument("--case", nargs=5, metavar=("KIND", "IMPL", "L", "CAUSAL", "PASS"),
                   help=argparse.SUPPRESS)  # internal: measure in this process
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.long, args.reps = [256, 1024], 4096, 1
    return args


# ---- one case, in a subprocess --------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(threads: int):
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    import qkv

    torch.set_num_threads(threads)
    return torch, qkv


def _runner(impl: str, causal: bool, backward: bool):
    """A function running one attention call (and its backward) of ``impl``."""
    import torch
    import torch.nn.functional as F

    import qkv

    def once(q, k, v):
        if impl == "torch":  # what a user would call instead
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = qkv.attention(q, k, v, causal=causal, backend=impl)
        if backward:
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None

    return once


def _inputs(length: int, backward: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, length, D, generator=g).requires_grad_(backward)
            for _ in range(3)]


def memory_case(impl: str, length: int, causal: bool, backward: bool, threads: int) -> dict:
    """Run one case once in this process: its peak memory growth (and its time)."""
    _setup(threads)
    once = _runner(impl, causal, backward)
    once(*_inputs(128, backward))  # load the kernels and the thread pools
    q, k, v = _inputs(length, backward)
    before = _rss_bytes()
    t0 = time.perf_counter()
    once(q, k, v)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"peak_bytes": max(0, peak - before), "once_seconds": seconds}


def time_row(impls: list[str], length: int, backward: bool, reps: int, threads: int) -> dict:
    """Best time of each implementation, non-causal and causal, taking turns:
    ``{"impl/causal": seconds}``."""
    _setup(threads)
    cases = [(impl, causal) for causal in (False, True) for impl in impls]
    runners = {c: _runner(*c, backward) for c in cases}
    q, k, v = _inputs(length, backward)
    for c in cases:
        runners[c](*_inputs(128, backward))
        if length < 16384:
            runners[c](q, k, v)  # warm-up
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(reps if length < 16384 else min(reps, 2)):
        for c in cases:
            t0 = time.perf_counter()
            runners[c](q, k, v)
            best[c] = min(best[c], time.perf_counter() - t0)
    return {f"{impl}/{int(causal)}": t for (impl, causal), t in best.items()}


def reference_needs(length: int, backward: bool) -> int:
    """Bytes the reference needs for the (L x L) steps: 4 float32 tensors of
    (B, H, L, L) in the forward (scores, scaled, masked, weights), about 7 with the
    backward (their gradients), plus the (L, L) bool mask when causal is dense."""
    cells = B * H * length * length
    return cells * FLOAT * (7 if backward else 4)


def _spawn(extra: list[str], args) -> tuple[dict | None, str]:
    """Run this script with ``extra`` arguments in a capped subprocess: (JSON, error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra,
           "--reps", str(args.reps), "--threads", str(args.threads)]
    cap = int(args.mem_cap_gib * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode == 0 and last.startswith("{"):
        return json.loads(last), ""
    if any(s in proc.stderr for s in ("can't allocate memory", "MemoryError",
                                      "out of memory", "std::bad_alloc")):
        return None, "OOM"
    err = proc.stderr.strip().splitlines()
    return None, err[-1] if err else f"exit {proc.returncode}"


def measure_rows(length: int, backward: bool, args) -> list[dict]:
    """Memory of each implementation, causal and not (one subprocess each), then all their
    times (one subprocess, taking turns, so causal and non-causal see the same load)."""
    pss = "fwd+bwd" if backward else "fwd"
    rows = {}
    for causal in (False, True):
        for impl in IMPLS:
            res, err = _spawn(["--case", "memory", impl, str(length), str(int(causal)), pss],
                              args)
            row = {"impl": impl, "L": length, "causal": causal, "pass": pss}
            if impl == "reference":
                row["needs_bytes"] = reference_needs(length, backward)
            row.update(res if res is not None else {"error": err})
            rows[(impl, causal)] = row
    timed = [i for i in ("torch", "chunked", "reference")
             if not any("error" in rows[(i, c)] for c in (False, True))
             and not (i == "reference" and reference_needs(length, backward) >
                      args.mem_cap_gib * 2**30 / 2)]
    # The reference is timed in a process of its own: its gigabytes of (L x L) steps,
    # allocated and freed, would slow the runs that follow it.
    res, err = {}, ""
    for group in ([i for i in timed if i != "reference"], [i for i in timed if i == "reference"]):
        if group:
            part, e = _spawn(["--case", "time", ",".join(group), str(length), "-", pss], args)
            res.update(part or {})
            err = err or e
    for (impl, causal), row in rows.items():
        key = f"{impl}/{int(causal)}"
        if key in res:
            row["seconds"] = res[key]
        elif "error" not in row:
            row["error"] = err or "not timed"
    return [rows[(i, c)] for c in (False, True) for i in IMPLS]


# ---- the table ------------------------------------------------------------------------------
def fmt_mem(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def cell(r: dict) -> tuple[str, str]:
    if "error" in r:
        need = r.get("needs_bytes")
        return r["error"], f"needs {fmt_mem(need)}" if need else "-"
    return f"{r['seconds']:.3f}", fmt_mem(r["peak_bytes"])


def print_table(rows: list[dict], long_row: dict | None) -> None:
    by = {(r["impl"], r["L"], r["causal"], r["pass"]): r for r in rows}
    keys = sorted({(r["L"], r["causal"], r["pass"]) for r in rows},
                  key=lambda x: (x[0], x[2], x[1]))
    head = (f"{'L':>6} {'causal':>6} {'pass':>8} | " +
            " | ".join(f"{n + ' s':>10} {n + ' mem':>15}" for n in IMPLS) +
            " | chunked/SDPA")
    print(head)
    print("-" * len(head))
    for length, causal, pss in keys:
        cells = []
        for impl in IMPLS:
            t, m = cell(by[(impl, length, causal, pss)])
            cells.append(f"{t:>10} {m:>15}")
        c, s = by[("chunked", length, causal, pss)], by[("torch", length, causal, pss)]
        ratio = (f"{c['seconds'] / s['seconds']:.2f}x" if "seconds" in c and "seconds" in s
                 else "-")
        print(f"{length:>6} {causal!s:>6} {pss:>8} | " + " | ".join(cells) + f" | {ratio:>12}")
    if long_row is not None:
        t, m = cell(long_row)
        print(f"\nchunked forward at L={long_row['L']} (non-causal): {t} s, peak memory {m}; "
              f"the reference would need {fmt_mem(reference_needs(long_row['L'], False))}")


def check_targets(rows: list[dict], long_row: dict | None, lengths: list[int]) -> list[dict]:
    by = {(r["impl"], r["L"], r["causal"], r["pass"]): r for r in rows}

    def sec(impl, length, causal, pss):
        return by.get((impl, length, causal, pss), {}).get("seconds")

    out = []

    def add(name, value, limit, ok):
        out.append({"target": name, "value": value, "limit": limit, "ok": ok})

    mid = 4096 if 4096 in lengths else lengths[len(lengths) // 2]
    for pss, limit in (("fwd", 1.3), ("fwd+bwd", 1.6)):
        for causal in (False, True):
            c, s = sec("chunked", mid, causal, pss), sec("torch", mid, causal, pss)
            if c and s:
                add(f"chunked/SDPA {pss} L={mid} causal={causal}", c / s, limit, c / s <= limit)
    for pss in ("fwd", "fwd+bwd"):
        c, n = sec("chunked", mid, True, pss), sec("chunked", mid, False, pss)
        if c and n:
            add(f"chunked causal/non-causal {pss} L={mid}", c / n, 0.6, c / n <= 0.6)
    top = max(lengths)
    cm = by.get(("chunked", top, False, "fwd+bwd"), {}).get("peak_bytes")
    if cm is not None:
        ref = by.get(("reference", top, False, "fwd+bwd"), {})
        rm = ref.get("peak_bytes") or ref.get("needs_bytes")
        add(f"chunked/reference peak memory fwd+bwd L={top}", cm / rm, 0.10, cm / rm < 0.10)
    if long_row is not None:
        add(f"chunked forward runs at L={long_row['L']}", "error" not in long_row, True,
            "error" not in long_row)
    for r in rows:
        if r["impl"] == "chunked" and r["L"] >= 1024 and "seconds" in r:
            ref = sec("reference", r["L"], r["causal"], r["pass"])
            if ref is not None:
                add(f"chunked/reference L={r['L']} causal={r['causal']} {r['pass']}",
                    r["seconds"] / ref, 1.0, r["seconds"] <= ref)
            elif "error" in by.get(("reference", r["L"], r["causal"], r["pass"]), {}):
                add(f"chunked/reference L={r['L']} causal={r['causal']} {r['pass']}",
                    "reference OOM", 1.0, True)
    return out


def machine() -> dict:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"python": platform.python_version(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "loadavg_start": load}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        kind, impl, length, causal, pss = args.case
        length, causal, backward = int(length), causal == "1", pss == "fwd+bwd"
        if kind == "memory":
            res = memory_case(impl, length, causal, backward, args.threads)
        else:
            res = time_row(impl.split(","), length, backward, args.reps, args.threads)
        print(json.dumps(res))
        return 0
    import torch

    info = machine()
    info.update({"torch": torch.__version__, "threads": args.threads, "B": B, "H": H, "D": D,
                 "dtype": "float32", "reps": args.reps, "mem_cap_gib": args.mem_cap_gib})
    print(f"qkv CPU benchmark: B={B} H={H} D={D} float32, threads={args.threads}, "
          f"torch {torch.__version__}, load average at start {' '.join(info['loadavg_start'])}")
    rows = []
    for length in args.lengths:
        for backward in (False, True):
            for r in measure_rows(length, backward, args):
                rows.append(r)
                print(f"  {r['impl']:9s} L={length:<6} causal={r['causal']!s:5} "
                      f"{r['pass']:8s} {cell(r)[0]:>8} s  {cell(r)[1]}", flush=True)
    res, err = _spawn(["--case", "memory", "chunked", str(args.long), "0", "fwd"], args)
    long_row = {"impl": "chunked", "L": args.long, "causal": False, "pass": "fwd"}
    long_row.update({**res, "seconds": res["once_seconds"]} if res else {"error": err})
    print(f"  chunked   L={args.long:<6} causal=False fwd      {cell(long_row)[0]:>8} s  "
          f"{cell(long_row)[1]}", flush=True)
    print()
    print_table(rows, long_row)
    targets = check_targets(rows, long_row, args.lengths)
    print("\ntargets (issue 5):")
    for t in targets:
        v = t["value"]
        shown = f"{v:.3g}" if isinstance(v, float) else str(v)
        print(f"  {'ok  ' if t['ok'] else 'MISS'} {t['target']}: {shown} (limit {t['limit']})")
    with open("/proc/loadavg") as f:
        info["loadavg_end"] = f.read().split()[:3]
    print(f"load average at end {' '.join(info['loadavg_end'])} "
          "(other work on the machine slows every implementation; compare ratios)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.json or ROOT / "runs" / "bench" / f"cpu-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "rows": rows, "long": long_row,
                                "targets": targets}, indent=1))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
