"""qkv's Triton kernel on a GPU: correctness first, then TFLOP/s against PyTorch's kernels.

One command, sized for a 5-minute call on an H100 (compilation and autotuning included)::

    python benchmarks/gpu.py              # checks, then the timing grid; JSON to $OUT if set
    python benchmarks/gpu.py --dry-run    # prints the plan; runs anywhere, no GPU needed

1. Correctness: a few odd shapes (GQA, Lq != Lk, causal, window, key padding, head dim 96,
   fp16, return_weights) through ``qkv.attention(..., backend="triton")``, compared with
   the float32 math path (the reference backend) by the derived rule of DESIGN.md: error at
   most 2x (outputs, weights) / 3x (gradients) that of the plain low-precision computation,
   + 1e-5 (for weights: the exact weights rounded to the input dtype).
2. Timing, bf16, FlashAttention's grid: 16k tokens in total (B = 16384 / L), H * D = 2048,
   D in {64, 128}, L in {1k, 4k, 16k}, causal and not; forward and backward of qkv's kernel
   and of SDPA's flash, cuDNN and efficient backends, then FlexAttention while the time
   budget lasts. Medians of CUDA-event timings. FLOPs: forward 4 * B * H * L * L * D (halved
   when causal), backward 2.5x forward.

Prints one table and writes JSON (``$OUT/gpu_bench.json`` when ``$OUT`` is set, else
``--json``). The baseline measured for this project (``shared/baselines/``) is printed
next to this run's numbers, for reference only: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's qkv, even when another is installed
sys.path.insert(0, str(ROOT / "tests"))  # helpers.lowp_baseline: the rule's baseline

BASELINE_NAME = "h100-sdpa-2026-11-28.json"
SDPA_IMPLS = ("flash", "cudnn", "efficient")


# ---- the plan -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU)")
    p.add_argument("--tokens", type=int, default=16384, help="B * L of every timed case")
    p.add_argument("--hidden", type=int, default=2048, help="H * D of every timed case")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims D")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 1024],
                   help="sequence lengths L, timed in this order (targets first)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds for the whole run; optional work is skipped past it")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--no-compile-table", action="store_true",
                   help="skip the compile table (registers, spills, shared memory per kernel)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness phase")
    p.add_argument("--smoke", action="store_true",
                   help="check this script on CPU: tiny float16 shapes through the Triton "
                        "interpreter (run with TRITON_INTERPRET=1); says nothing about speed")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default: $OUT/gpu_bench.json, if $OUT set)")
    p.add_argument("--baseline", type=Path, default=None,
                   help=f"baseline JSON (default: shared/baselines/{BASELINE_NAME})")
    args = p.parse_args(argv)
    if args.smoke:  # tiny grid; the interpreter cannot compute in bfloat16
        args.tokens, args.hidden, args.dims, args.lengths = 128, 64, [16, 32], [64, 128]
        args.reps, args.warmup, args.no_flex = 1, 0, True
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = "float16" if args.smoke else "bfloat16"
    for name in ("tokens", "hidden", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    for d in args.dims:
        if args.hidden % d:
            p.error(f"--hidden {args.hidden} is not a multiple of head dim {d}")
    for n in args.lengths:
        if args.tokens % n:
            p.error(f"--tokens {args.tokens} is not a multiple of length {n}")
    return args


#: One config for every kernel, for the correctness cases whose kernel variants the timing
#: grid does not use (window, padding, D=96, fp16): tuning them would only cost compile time.
FIXED = (64, 64, 4, 2)

#: Correctness cases: (name, dtype, B, Hq, Hkv, Lq, Lk, D, Dv, options, checks gradients).
#: The others are autotuned like the timed calls and share their compiled kernels.
CHECKS = [
    ("gqa-causal", "bfloat16", 2, 8, 2, 997, 1531, 64, 64, {"causal": True}, True),
    ("mha-full", "bfloat16", 2, 8, 8, 1024, 1024, 128, 128, {}, True),
    ("window-padding-d96", "bfloat16", 2, 4, 1, 777, 777, 96, 96,
     {"window": (128, 0), "lengths": [777, 300], "config": FIXED}, True),
    ("fp16-lq>lk", "float16", 1, 4, 4, 600, 300, 64, 64, {"causal": True, "config": FIXED},
     True),
    ("mqa-deterministic", "bfloat16", 1, 8, 1, 1000, 1000, 128, 128,
     {"causal": True, "deterministic": True}, True),
    ("d256-causal", "bfloat16", 1, 4, 2, 513, 700, 256, 256, {"causal": True}, True),
    ("weights", "bfloat16", 1, 4, 2, 513, 777, 128, 128,
     {"causal": True, "return_weights": True}, False),
]


#: The same kinds of case, small enough for the interpreter (``--smoke``).
SMOKE_CHECKS = [
    ("gqa-causal", "float16", 1, 4, 2, 37, 53, 16, 16, {"causal": True}, True),
    ("window-padding-d40", "float16", 2, 2, 1, 29, 29, 40, 40,
     {"window": (8, 0), "lengths": [29, 11], "config": FIXED}, True),
    ("weights", "float16", 1, 2, 2, 21, 33, 32, 32, {"causal": True, "return_weights": True},
     False),
]


def timing_cases(args) -> list[dict]:
    """FlashAttention's grid: B * L = tokens, H * D = hidden."""
    cases = []
    for n in args.lengths:
        for d in args.dims:
            for causal in (False, True):
                cases.append(dict(B=args.tokens // n, H=args.hidden // d, N=n, D=d,
                                  causal=causal))
    return cases


def flops(case: dict, direction: str) -> float:
    f = 4.0 * case["B"] * case["H"] * case["N"] * case["N"] * case["D"]
    if case["causal"]:
        f /= 2
    return f * (2.5 if direction == "bwd" else 1.0)


def find_baseline(path: Path | None) -> Path | None:
    candidates = [path] if path else [ROOT / "shared" / "baselines" / BASELINE_NAME,
                                      ROOT.parent / "shared" / "baselines" / BASELINE_NAME]
    return next((c for c in candidates if c is not None and c.is_file()), None)


def print_plan(args) -> None:
    print("correctness (vs the float32 math path, derived rule):")
    for name, dt, b, hq, hkv, lq, lk, d, dv, opts, grads in checks_for(args):
        print(f"  {name:20s} {dt:9s} B={b} Hq={hq} Hkv={hkv} Lq={lq} Lk={lk} D={d} Dv={dv} "
              f"{opts} {'fwd+bwd' if grads else 'fwd'}")
    impls = ["qkv", *SDPA_IMPLS] + ([] if args.no_flex else ["flex"])
    print(f"timing ({args.dtype} on {args.device}, {args.reps} reps, median; "
          f"impls: {', '.join(impls)}):")
    for c in timing_cases(args):
        print(f"  L={c['N']:6d} D={c['D']:4d} B={c['B']:3d} H={c['H']:3d} "
              f"causal={c['causal']!s:5s} fwd {flops(c, 'fwd') / 1e12:7.2f} TFLOP")
    base = find_baseline(args.baseline)
    print(f"baseline: {base if base else 'not found'}; budget {args.budget:.0f} s")
    if not args.no_compile_table:
        print("compile table (gpu_compile.py): " + (
            "sm_90, D=128 bf16 causal, first candidates (--smoke)" if args.smoke else
            f"this card's sm, D {args.dims}, {args.dtype}, full and causal, every candidate"))


def checks_for(args):
    return SMOKE_CHECKS if args.smoke else CHECKS


# ---- measuring --------------------------------------------------------------------------------
def median_ms(fn, reps: int, warmup: int, device: str = "cuda") -> float:
    import torch

    for _ in range(warmup):
        fn()
    if device != "cuda":  # --smoke: wall clock, for the script's sake only
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def make_impls(args):
    """name -> f(q, k, v, causal) for every implementation this torch offers."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import qkv

    impls = {"qkv": lambda q, k, v, causal: qkv.attention(q, k, v, causal=causal,
                                                          backend="triton")}
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}
    for name in SDPA_IMPLS:
        if kinds[name] is None:
            continue

        def sdpa(q, k, v, causal, _kind=kinds[name]):
            with sdpa_kernel(_kind):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        impls[name] = sdpa
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            return impls
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def flex(q, k, v, causal):
            bm = None
            if causal:
                n = q.shape[-2]
                if n not in masks:
                    masks[n] = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n,
                                                 device=q.device)
                bm = masks[n]
            return compiled(q, k, v, block_mask=bm)

        impls["flex"] = flex
    return impls


def time_impl(fn, case, args) -> dict:
    import torch

    g = torch.Generator(device=args.device).manual_seed(0)
    shape = (case["B"], case["H"], case["N"], case["D"])
    q, k, v = (torch.randn(shape, device=args.device, generator=g).to(getattr(torch, args.dtype))
               .requires_grad_() for _ in range(3))
    causal = case["causal"]
    with torch.no_grad():
        fwd = median_ms(lambda: fn(q, k, v, causal), args.reps, args.warmup, args.device)
    out = fn(q, k, v, causal)
    dout = torch.randn_like(out)
    bwd = median_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                    args.reps, args.warmup, args.device)
    return dict(fwd_ms=round(fwd, 4), bwd_ms=round(bwd, 4),
                fwd_tflops=round(flops(case, "fwd") / fwd / 1e9, 3),
                bwd_tflops=round(flops(case, "bwd") / bwd / 1e9, 3))


def div(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# ---- correctness ----------------------------------------------------------------------------
def run_checks(args) -> list[dict]:
    import torch

    import qkv
    from qkv.kernels.triton import autotune

    from helpers import lowp_baseline, max_err

    dev = args.device
    rows = []
    for name, dt, b, hq, hkv, lq, lk, d, dv, opts, grads in checks_for(args):
        t0 = time.perf_counter()
        dtype = getattr(torch, dt)
        g = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(b, hq, lq, d, device=dev, generator=g).to(dtype)
        k = torch.randn(b, hkv, lk, d, device=dev, generator=g).to(dtype)
        v = torch.randn(b, hkv, lk, dv, device=dev, generator=g).to(dtype)
        kw = {key: val for key, val in opts.items()
              if key not in ("lengths", "return_weights", "config", "deterministic")}
        if "lengths" in opts:
            kw["mask"] = qkv.padding_mask(torch.tensor(opts["lengths"], device=dev), lk)
        weights = opts.get("return_weights", False)
        row = dict(name=name, dtype=dt, B=b, Hq=hq, Hkv=hkv, Lq=lq, Lk=lk, D=d, Dv=dv,
                   options={key: str(val) for key, val in opts.items()})
        @contextlib.contextmanager
        def fixed(opts=opts):  # a fresh context each time: the backward tunes too
            forced = (autotune.override(autotune.Config(*opts["config"])) if "config" in opts
                      else contextlib.nullcontext())
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(opts.get("deterministic", False))
            try:
                with forced:
                    yield
            finally:
                torch.use_deterministic_algorithms(before)

        try:
            for t in (q, k, v):
                t.requires_grad_(grads)
            q32, k32, v32 = (t.detach().float().requires_grad_(grads) for t in (q, k, v))
            with fixed():
                got = qkv.attention(q, k, v, backend="triton", return_weights=weights, **kw)
            ref = qkv.attention(q32, k32, v32, backend="reference", return_weights=weights,
                                **kw)  # the float32 math path
            if weights:
                (got, got_w), (ref, ref_w) = got, ref
            base = lowp_baseline(q, k, v, **kw)
            ratios = {"out": ratio(max_err(got, ref), max_err(base, ref), 2.0)}
            if weights:
                ratios["weights"] = ratio(max_err(got_w, ref_w),
                                          max_err(ref_w.to(dtype), ref_w), 2.0)
            if grads:
                dout = torch.randn(got.shape, device=dev, generator=g).to(dtype)
                with fixed():
                    gg = torch.autograd.grad(got, (q, k, v), dout)
                rg = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
                bg = torch.autograd.grad(base, (q, k, v), dout)
                for n_, a, r, bb in zip("qkv", gg, rg, bg, strict=True):
                    ratios[f"d{n_}"] = ratio(max_err(a, r), max_err(bb, r), 3.0)
            row["ratios"] = ratios
            row["ok"] = all(r["ok"] for r in ratios.values())
        except Exception as exc:  # report and go on: the timing still says something
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        detail = row.get("error") or " ".join(
            f"{key} {r['err']:.2e}<={r['limit']:.2e}" for key, r in row["ratios"].items())
        print(f"  {'PASS' if row['ok'] else 'FAIL'} {name:20s} {detail} ({row['seconds']} s)",
              flush=True)
    return rows


def ratio(err: float, base: float, factor: float) -> dict:
    limit = factor * base + 1e-5
    return dict(err=err, base=base, limit=limit, ok=bool(math.isfinite(err) and err <= limit))


# ---- the run ----------------------------------------------------------------------------------
def print_table(rows: list[dict], baseline: dict) -> None:
    """One line per case: TFLOP/s of each impl (forward / backward) and qkv's ratios."""
    impls = [i for i in ("qkv", *SDPA_IMPLS, "flex") if any(r["impl"] == i for r in rows)]
    head = f"{'L':>6} {'D':>4} {'B':>3} {'H':>3} {'causal':>6} " + " ".join(
        f"{i + ' f/b':>15}" for i in impls) + f" {'qkv/flash f/b':>15} {'qkv/best f/b':>14}"
    print("\nTFLOP/s (forward / backward), this run:")
    print(head)
    for case in unique_cases(rows):
        got = {r["impl"]: r for r in rows if same_case(r, case) and "fwd_tflops" in r}
        cells = [f"{got[i]['fwd_tflops']:7.1f}/{got[i]['bwd_tflops']:<7.1f}" if i in got
                 else f"{'-':>15}" for i in impls]
        line = (f"{case['N']:6d} {case['D']:4d} {case['B']:3d} {case['H']:3d} "
                f"{case['causal']!s:>6} " + " ".join(cells))
        mine = got.get("qkv")
        others = [r for i, r in got.items() if i != "qkv"]
        if mine and "flash" in got:
            line += (f" {div(mine['fwd_tflops'], got['flash']['fwd_tflops']):7.2f}/"
                     f"{div(mine['bwd_tflops'], got['flash']['bwd_tflops']):<7.2f}")
        else:
            line += f" {'-':>15}"
        if mine and others:
            bf = max(r["fwd_tflops"] for r in others)
            bb = max(r["bwd_tflops"] for r in others)
            line += f" {div(mine['fwd_tflops'], bf):6.2f}/{div(mine['bwd_tflops'], bb):<6.2f}"
        print(line)
    if any(same_case(r, c) for r in baseline.get("rows", []) for c in unique_cases(rows)):
        print(f"\nbaseline ({baseline.get('device')}, torch {baseline.get('torch')}), "
              "TFLOP/s forward / backward, for reference:")
        for case in unique_cases(rows):
            ref = {r["impl"]: r for r in baseline["rows"] if same_case(r, case)}
            if ref:
                print(f"  L={case['N']:6d} D={case['D']:4d} causal={case['causal']!s:5s} " +
                      "  ".join(f"{i} {r['fwd_tflops']:.0f}/{r['bwd_tflops']:.0f}"
                                for i, r in sorted(ref.items())))


def unique_cases(rows):
    seen = []
    for r in rows:
        c = {k: r[k] for k in ("B", "H", "N", "D", "causal")}
        if c not in seen:
            seen.append(c)
    return seen


def same_case(r: dict, c: dict) -> bool:
    return all(r.get(k) == c[k] for k in ("B", "H", "N", "D", "causal"))


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets at L >= 4k: forward >= 1.2x and backward >= 1.0x SDPA flash."""
    lines = []
    for case in unique_cases(rows):
        if case["N"] < 4096:
            continue
        got = {r["impl"]: r for r in rows if same_case(r, case) and "fwd_tflops" in r}
        if "qkv" not in got or "flash" not in got:
            continue
        f = div(got["qkv"]["fwd_tflops"], got["flash"]["fwd_tflops"])
        b = div(got["qkv"]["bwd_tflops"], got["flash"]["bwd_tflops"])
        lines.append(f"L={case['N']} D={case['D']} causal={case['causal']}: forward "
                     f"{f:.2f}x flash ({'met' if f >= 1.2 else 'MISSED'} >= 1.2), backward "
                     f"{b:.2f}x ({'met' if b >= 1.0 else 'MISSED'} >= 1.0)")
    return lines


def compile_table(args, capability, deadline: float) -> list[dict]:
    """gpu_compile.py's table for this card (registers, spills, shared memory, MMA kind of
    every kernel and candidate the timed calls can use), compiled without launching, in a
    child process (no CUDA context, no interpreter); with --smoke, its --quick plan."""
    import subprocess
    import tempfile

    if args.smoke:
        plan = ["--quick", "--jobs", "1"]
    else:
        arch = str(10 * capability[0] + capability[1])
        if deadline - time.perf_counter() < 60:
            print(f"\ncompile table: skipped for time (python benchmarks/gpu_compile.py "
                  f"--arch {arch} prints it)")
            return []
        plan = ["--arch", arch, "--dims", *map(str, args.dims), "--dtypes", args.dtype,
                "--bands", "full", "causal", "--jobs", str(min(os.cpu_count() or 1, 8))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compile.json"
        print(f"\ncompile table (gpu_compile.py {' '.join(plan)}):", flush=True)
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_compile.py")),
                               *plan, "--json", str(out)], env=env, capture_output=True,
                              text=True)
        print(proc.stdout, end="", flush=True)
        if not out.is_file():
            print(f"compile table failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            return []
        return json.loads(out.read_text())["rows"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print_plan(args)
        import qkv

        print(f"qkv backends here: {qkv.backends()} (nothing is run in a dry run)")
        return 0
    import torch

    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu.py: error: --smoke runs the kernels in Triton's interpreter; start it as "
              "TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device; use --dry-run to see the plan, or --smoke",
              file=sys.stderr)
        return 2
    import triton

    from qkv.kernels.triton import autotune

    t0 = time.perf_counter()
    deadline = t0 + args.budget
    out_path = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json"
                             if os.environ.get("OUT") else None)
    base_path = find_baseline(args.baseline)
    baseline = json.loads(base_path.read_text()) if base_path else {}
    gpu = args.device == "cuda"
    report = dict(device=torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)",
                  capability=torch.cuda.get_device_capability() if gpu else None,
                  torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                  flops_convention="forward 4*B*H*N*N*D (halved when causal); backward 2.5x "
                  "forward; medians of CUDA-event timings", args=vars(args) | {
                      "json": str(args.json), "baseline": str(base_path),
                      "dims": list(args.dims), "lengths": list(args.lengths)},
                  checks=[], rows=[], skipped=[])

    def save():
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["autotune"] = {" ".join(map(str, key)): vars(cfg)
                              for key, cfg in autotune._best.items()}
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1, default=str))

    print(f"{report['device']} (sm {report['capability']}), torch {report['torch']}, "
          f"triton {report['triton']}", flush=True)
    print_plan(args)
    if not args.skip_check:
        print("\ncorrectness:", flush=True)
        report["checks"] = run_checks(args)
        save()

    impls = make_impls(args)
    cases = timing_cases(args)
    print(f"\ntiming ({time.perf_counter() - t0:.0f} s so far):", flush=True)
    order = [(c, i) for c in cases for i in impls if i != "flex"]
    order += [(c, "flex") for c in cases if "flex" in impls]  # last: it compiles per shape
    for case, name in order:
        left = deadline - time.perf_counter()
        if left < (75 if name == "flex" else 30):  # flex compiles; a new qkv shape tunes
            report["skipped"].append({**case, "impl": name, "why": "time budget"})
            continue
        try:
            row = {**case, "impl": name, **time_impl(impls[name], case, args)}
            print(f"  L={case['N']:6d} D={case['D']:4d} causal={case['causal']!s:5s} "
                  f"{name:9s} fwd {row['fwd_tflops']:7.1f}  bwd {row['bwd_tflops']:7.1f} "
                  f"TFLOP/s  ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as exc:  # one impl failing (e.g. no kernel for it) is a data point
            row = {**case, "impl": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  L={case['N']:6d} D={case['D']:4d} {name}: {row['error']}", flush=True)
        report["rows"].append(row)
        if gpu:
            torch.cuda.empty_cache()
        save()

    print_table(report["rows"], baseline)
    if not args.no_compile_table:
        report["compile"] = compile_table(args, report.get("capability"), deadline)
        save()
    report["targets"] = targets(report["rows"])
    print("\ntargets (L >= 4k, vs SDPA flash in this run):")
    for line in report["targets"] or ["  none measured"]:
        print("  " + line)
    if report["skipped"]:
        print(f"\nskipped for time: {len(report['skipped'])} measurements "
              f"({', '.join(sorted({s['impl'] for s in report['skipped']}))})")
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    print(f"\ncorrectness: {'FAILED ' + ', '.join(failed) if failed else 'all passed'}; "
          f"{time.perf_counter() - t0:.0f} s in all" + (f"; JSON: {out_path}" if out_path else ""))
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
