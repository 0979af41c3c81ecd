"""Benchmark of ``qkv train dates``: how fast a CPU learns dates, and what the KV cache buys.

Prints (and writes as JSON with ``--json``):

1. wall time until greedy exact-match on the ``dates`` validation set (seen locales,
   dates never trained on) first reaches ``--target`` (default 0.99), validating every
   ``--eval-every`` steps; the time includes those validation passes;
2. final exact-match on ``--final-size`` seen-locale validation examples and on the
   held-out locales (formats and regional variants never trained on), with a breakdown
   per held-out locale and format;
3. greedy decoding of 64-token outputs with the KV cache vs recomputing the whole prefix at
   every step, for batches of 1 and 64 sources, best of ``--repeats`` runs each.

Run from the repository root::

    python benchmarks/train.py --threads 2 --out runs/dates --json dates.json

``--decode-only RUN`` skips training and measures decoding on an existing run. Timings on
a shared machine are noisy: the load average before and after is printed with them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qkv.decode import load_run
from qkv.models.seq2seq import TransformerConfig
from qkv.tasks import get_task
from qkv.train import TrainConfig, evaluate, train

# The configuration tuned for a 2-core CPU (see the README section "Training a Transformer").
TUNED = {"steps": 3000, "batch_size": 64, "lr": 2e-3, "warmup": 100, "d_model": 64,
         "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ff_dim": 256,
         "dropout": 0.0, "eval_every": 250, "eval_size": 1000, "checkpoint_every": 250}
MODEL = ("d_model", "num_heads", "encoder_layers", "decoder_layers", "ff_dim", "dropout")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in TUNED.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--final-size", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: temporary)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--decode-only", type=Path, default=None, metavar="RUN")
    return p.parse_args()


def train_dates(args) -> dict:
    model = TransformerConfig(vocab_size=None, **{k: getattr(args, k) for k in MODEL})
    cfg = TrainConfig(task="dates", seed=args.seed, model=model,
                      **{k: getattr(args, k) for k in TUNED if k not in MODEL})
    out = args.out or Path(tempfile.mkdtemp(prefix="qkv-dates-")) / "run"
    print(f"training dates in {out}: {cfg.to_dict()}", flush=True)
    result = train(cfg, out, progress=False, log=lambda s: print(s, flush=True))
    curve = [(h["step"], h["seconds"], h["valid_exact"]) for h in result.history
             if "valid_exact" in h]
    reached = next(((s, t) for s, t, e in curve if e >= args.target), None)
    return {"run": str(out), "config": cfg.to_dict(), "train_seconds": result.seconds,
            "curve": [{"step": s, "seconds": t, "valid_exact": e} for s, t, e in curve],
            "target": args.target,
            "steps_to_target": None if reached is None else reached[0],
            "seconds_to_target": None if reached is None else reached[1]}


def accuracy(run, args) -> dict:
    task = get_task("dates", **run.config.task_options)
    max_len = task.max_target_len + 1
    seen = evaluate(run.model, run.tokenizer, task.validation(args.final_size), max_len=max_len)
    held = evaluate(run.model, run.tokenizer, task.validation(args.final_size, split="heldout"),
                    max_len=max_len)
    rng = np.random.default_rng(0)
    dates = [int(o) for o in rng.choice(task.valid_ordinals, size=200, replace=False)]
    per = {}
    for r in task.heldout_renderers:
        ex = [(r.render(dt.date.fromordinal(o)), dt.date.fromordinal(o).isoformat())
              for o in dates]
        ex = [e for e in ex if e[0] not in task.ambiguous]
        per[f"{r.name} {r.fmt}"] = evaluate(run.model, run.tokenizer, ex, max_len=max_len)
    return {"seen_exact": seen, "heldout_exact": held, "heldout_per_format": per,
            "final_size": args.final_size}


def decode_speed(run, args) -> list[dict]:
    task = get_task("dates", **run.config.task_options)
    sources = [s for s, _ in task.validation(64)]
    model = run.model.eval()
    rows = []
    for batch in (1, 64):
        src = run.tokenizer.batch(sources[:batch])  # (B, Ls)
        times = {}
        for use_cache in (True, False):
            model.greedy(src, max_len=8, stop_at_eos=False, use_cache=use_cache)  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = model.greedy(src, max_len=64, stop_at_eos=False, use_cache=use_cache)
                best = min(best, time.perf_counter() - t)
            assert out.shape == (batch, 64)
            times[use_cache] = best
        same = torch.equal(model.greedy(src, max_len=64, stop_at_eos=False),
                           model.greedy(src, max_len=64, stop_at_eos=False, use_cache=False))
        rows.append({"batch": batch, "tokens": 64, "cache_s": times[True],
                     "no_cache_s": times[False], "speedup": times[False] / times[True],
                     "cache_tokens_per_s": batch * 64 / times[True],
                     "no_cache_tokens_per_s": batch * 64 / times[False],
                     "same_tokens": same})
    return rows


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "load_before": os.getloadavg()}}
    if args.decode_only is None:
        report["training"] = train_dates(args)
        run_dir = Path(report["training"]["run"])
    else:
        run_dir = args.decode_only
    run = load_run(run_dir)
    report["step"] = run.step
    report["accuracy"] = accuracy(run, args)
    report["decoding"] = decode_speed(run, args)
    report["machine"]["load_after"] = os.getloadavg()
    show(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def show(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    m = report["machine"]
    con.print(f"[bold]qkv train dates[/bold]: {m['cpus']} CPUs, {m['torch_threads']} torch "
              f"threads, torch {m['torch']}; load average before "
              f"{m['load_before'][0]:.1f}, after {m['load_after'][0]:.1f}")
    if "training" in report:
        tr = report["training"]
        t = Table(title="validation exact-match (seen locales, unseen dates) during training")
        for c in ("step", "seconds", "exact-match"):
            t.add_column(c, justify="right")
        for p in tr["curve"]:
            t.add_row(str(p["step"]), f"{p['seconds']:.0f}", f"{p['valid_exact']:.4f}")
        con.print(t)
        if tr["seconds_to_target"] is None:
            con.print(f"target {tr['target']:.0%} NOT reached in {tr['config']['steps']} steps "
                      f"({tr['train_seconds']:.0f} s)")
        else:
            con.print(f"time to {tr['target']:.0%} exact-match: [bold]"
                      f"{tr['seconds_to_target']:.0f} s[/bold] ({tr['steps_to_target']} steps; "
                      f"whole run {tr['train_seconds']:.0f} s)")
    a = report["accuracy"]
    con.print(f"final (step {report['step']}, {a['final_size']} examples each): seen locales "
              f"[bold]{a['seen_exact']:.4f}[/bold], held-out locales "
              f"[bold]{a['heldout_exact']:.4f}[/bold]")
    t = Table(title="held-out locales: exact-match per format (200 validation dates)")
    t.add_column("locale format")
    t.add_column("exact", justify="right")
    for k, v in a["heldout_per_format"].items():
        t.add_row(k, f"{v:.3f}")
    con.print(t)
    t = Table(title="greedy decoding of 64-token outputs: KV cache vs full recomputation")
    for c in ("batch", "cache (s)", "no cache (s)", "speed-up", "cache tok/s", "same tokens"):
        t.add_column(c, justify="right")
    for r in report["decoding"]:
        t.add_row(str(r["batch"]), f"{r['cache_s']:.3f}", f"{r['no_cache_s']:.3f}",
                  f"{r['speedup']:.1f}x", f"{r['cache_tokens_per_s']:,.0f}",
                  str(r["same_tokens"]))
    con.print(t)


if __name__ == "__main__":
    main()
