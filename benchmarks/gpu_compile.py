"""Compile qkv's Triton kernels for GPUs that are not here: registers, spills, shared memory.

Every kernel x autotune candidate x head dim x dtype x band, for sm_80 and sm_90 (and
sm_100 where the installed Triton can target it), through qkv's own launch code (the
arguments a real call passes, so the real specialisation), without a GPU: Triton compiles
for any target on a CPU and its bundled ``ptxas`` reports registers and spills::

    python benchmarks/gpu_compile.py            # the full grid (tens of minutes on 2 cores)
    python benchmarks/gpu_compile.py --quick    # one config per kernel, D=128 bf16 causal, sm_90
    python benchmarks/gpu_compile.py --arch 90 --dims 128 256 --jobs 2

Prints one table (registers, spill bytes stored/loaded, shared memory, MMA instructions:
wgmma (sm_90), mma.sync (sm_80), TMA copies, tcgen05 (sm_100); warps, stages) and writes
JSON (``--json``, or ``$OUT/gpu_compile.json`` when ``$OUT`` is set). Exits 1 when a
candidate the autotuner may pick fails to compile, spills on sm_90 (unless it is in
``autotune.SPILLS_MEASURED_FASTER``: measured faster on a GPU all the same) or needs more
shared memory than the target has.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's qkv, even when another is installed

#: The bands a real call can make: (left, right) as qkv.attention canonicalises them.
BANDS = {"full": (None, None), "causal": (None, 0), "window": (256, 0)}
#: Shape of the compiled call: only what changes specialisation matters (strides, flags).
B, HQ, HKV, L = 2, 8, 2, 4096


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=None,
                   help="compute capabilities (default: 80 90, and 100 when supported)")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 96],
                   help="head dims (96 stands for any non-power of two)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--bands", nargs="+", default=list(BANDS), choices=list(BANDS))
    p.add_argument("--quick", action="store_true",
                   help="D=128, bfloat16, causal, the first candidate of each kernel, for "
                        "sm_90 (or --arch)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compile processes in parallel")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default: $OUT/gpu_compile.json if $OUT set)")
    args = p.parse_args(argv)
    if args.quick:
        args.arch = args.arch or [90]
        args.dims, args.dtypes, args.bands = [128], ["bfloat16"], ["causal"]
    if args.arch is None:
        args.arch = [80, 90] + ([100] if supports(100) else [])
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1; got {args.jobs}")
    return args


def supports(arch: int) -> bool:
    """Whether the installed Triton (and its ptxas) can compile a kernel for ``arch``."""
    import triton
    import triton.language as tl

    from qkv.kernels.triton import offline

    @triton.jit
    def _probe(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))

    import torch

    with offline.compiling(arch) as records:
        offline.active().compile(_probe, (1,), (torch.empty(16, device="meta"),),
                                 {"BLOCK": 16})
    return all(r.error is None for r in records.values())


def compile_group(arch: int, d: int, dtype: str, band: str, first_only: bool) -> list[dict]:
    """Compile every kernel one call of this kind launches (forward, backward, weights) for
    ``arch``, each autotune candidate included; one dict per compiled kernel."""
    import torch

    warnings.filterwarnings("ignore", message=".*FP_FUSION")  # Triton 3.9's notice
    from qkv.kernels.triton import offline
    from qkv.kernels.triton.bwd import backward
    from qkv.kernels.triton.fwd import forward
    from qkv.kernels.triton.weights import attention_weights

    dt = getattr(torch, dtype)
    meta = dict(device="meta", dtype=dt)
    q = torch.empty(B, HQ, L, d, **meta)  # (B, Hq, L, D)
    k = torch.empty(B, HKV, L, d, **meta)  # (B, Hkv, L, D)
    v = torch.empty(B, HKV, L, d, **meta)  # (B, Hkv, L, D)
    left, right = BANDS[band]
    scale = d ** -0.5
    t0 = time.perf_counter()
    with offline.compiling(arch, first_only=first_only) as records:
        out, lse = forward(q, k, v, None, scale, left, right)
        for deterministic in (False, True):  # dQ by atomics, or its own kernel
            backward(torch.empty_like(out), q, k, v, out, lse, None, scale, left, right,
                     deterministic=deterministic)
        attention_weights(q, k, lse, None, scale, left, right)
    rows = []
    for rec in records.values():
        row = rec.as_dict()
        row.update(D=d, dtype=dtype, band=band, block_m=rec.constexprs.get("BLOCK_M"),
                   block_n=rec.constexprs.get("BLOCK_N"))
        if rec.constexprs.get("FUSE_DQ") is False:
            row["kernel"] += "/det"  # the deterministic backward's dK/dV (no dQ atomics)
        if rec.constexprs.get("SPLIT_D", 1) > 1:
            row["kernel"] += f"/d{rec.constexprs['SPLIT_D']}"  # head dim split over programs
        row["constexprs"] = {k: str(v) for k, v in rec.constexprs.items()}
        rows.append(row)
    for row in rows:
        row["group_seconds"] = round(time.perf_counter() - t0, 1)
    return rows


def verdict(row: dict) -> str:
    """'ok', or why this compiled candidate fails the check (the autotuner may pick it)."""
    from qkv.kernels.triton.offline import shared_memory_limit

    if row["error"]:
        return "ERROR"
    if row["shared"] > shared_memory_limit(row["arch"]):
        return "SMEM"
    if row["arch"] == 90 and (row["spill_stores"] or row["spill_loads"]):
        from qkv.kernels.triton.autotune import SPILLS_MEASURED_FASTER

        tile = (row["kernel"].split("/")[0].strip("_").removesuffix("_kernel"),
                row["block_m"], row["block_n"], row["num_warps"], row["num_stages"])
        # a candidate measured faster on a GPU than the spill-free ones: reported only
        return "spill*" if tile in SPILLS_MEASURED_FASTER else "SPILL"
    if row["spill_stores"] or row["spill_loads"]:
        return "spill"  # reported, not failed: only sm_90 must be spill-free
    return "ok"


def print_table(rows: list[dict]) -> None:
    head = (f"{'kernel':18s} {'sm':>3} {'D':>4} {'dtype':8s} {'band':6s} {'tile':>8} "
            f"{'w':>2} {'s':>2} {'regs':>4} {'spill st/ld':>11} {'smem KB':>7} "
            f"{'wgmma':>5} {'mma':>4} {'tma':>3} {'tc05':>4}  verdict")
    print(head)
    for r in rows:
        tile = "x".join(str(r[k]) for k in ("block_m", "block_n") if r[k]) or "-"
        print(f"{r['kernel']:18s} {r['arch']:3d} {r['D']:4d} {r['dtype'][:8]:8s} {r['band']:6s} "
              f"{tile:>8} {r['num_warps']:2d} {r['num_stages']:2d} {r['registers']:4d} "
              f"{r['spill_stores']:5d}/{r['spill_loads']:<5d} {r['shared'] / 1024:7.1f} "
              f"{r['wgmma']:5d} {r['mma_sync']:4d} {r['tma']:3d} {r.get('tcgen05', 0):4d}  "
              f"{r['verdict']}"
              + (f" {r['error']}" if r["error"] else ""))


def run(args) -> list[dict]:
    groups = [(a, d, dt, band, args.quick) for a in args.arch for d in args.dims
              for dt in args.dtypes for band in args.bands]
    rows: list[dict] = []
    if args.jobs == 1 or len(groups) == 1:
        for g in groups:
            rows += compile_group(*g)
            print(f"  compiled sm_{g[0]} D={g[1]} {g[2]} {g[3]}", file=sys.stderr, flush=True)
    else:
        # spawn, not fork: the parent may have initialised CUDA (benchmarks/gpu.py)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            results = pool.map(compile_group, *zip(*groups, strict=True))
            for g, got in zip(groups, results, strict=True):
                rows += got
                print(f"  compiled sm_{g[0]} D={g[1]} {g[2]} {g[3]}", file=sys.stderr,
                      flush=True)
    # delta does not depend on the band: keep one row per distinct compile
    seen, unique = set(), []
    for r in rows:
        key = (r["kernel"], r["arch"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True),
               r["num_warps"], r["num_stages"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    for r in unique:
        r["verdict"] = verdict(r)
    return unique


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    t0 = time.perf_counter()
    print(f"triton {triton.__version__}; targets sm_{', sm_'.join(map(str, args.arch))}; "
          f"D {args.dims}; {args.dtypes}; bands {args.bands}", flush=True)
    rows = run(args)
    print_table(rows)
    bad = [r for r in rows if r["verdict"] in ("ERROR", "SMEM", "SPILL")]
    spills80 = sum(r["verdict"] in ("spill", "spill*") for r in rows)
    seconds = time.perf_counter() - t0
    print(f"\n{len(rows)} compiles in {seconds:.0f} s: {len(bad)} failing the check "
          f"(error, over shared memory, or spills on sm_90); {spills80} spill elsewhere or "
          "were measured faster on a GPU despite spilling (spill*)")
    out = args.json or (Path(os.environ["OUT"]) / "gpu_compile.json"
                        if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(triton=triton.__version__, args={
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            seconds=round(seconds, 1), rows=rows), indent=1))
        print(f"JSON: {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
