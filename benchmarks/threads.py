"""How the ``qkv`` commands' CPU thread count affects their wall time, with cores kept busy.

Runs each command as a user would (a fresh ``python -m qkv`` process, imports and model
loading included) with its default thread count and with ``--threads 1`` and
``--threads 2``, while ``--busy`` processes (``yes > /dev/null``, started and stopped by this
script) keep that many cores busy. Settings are taken in turns within each round, rotating
which goes first, and the table shows the median over ``--rounds`` rounds, each setting's
ratio to the best one, and whether the default stays within 1.5x of the best.

``qkv demo`` has no ``--threads`` option (its 3x3 matrices never use a second thread); its
1- and 2-thread rows set ``OMP_NUM_THREADS``, which fixes torch's thread count at start.

Run from the repository root::

    python benchmarks/threads.py --busy 1 --rounds 3 --json threads.json

The ``qkv translate`` rows use ``--run DIR``, or else a checkpoint trained first (with
``--steps`` steps, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SENTENCE = "The animal didn't cross the street because it was too tired"
SETTINGS = ("default", "1", "2")
COMMANDS = ("demo", "explain", "translate", "train")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=1, help="cores to keep busy with `yes`")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="qkv train dates --steps")
    p.add_argument("--commands", default=",".join(COMMANDS),
                   help=f"comma-separated subset of {','.join(COMMANDS)}")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds per command run; a run stopped there shows as 'inf'")
    p.add_argument("--run", type=Path, default=None,
                   help="a run directory for the qkv translate rows (default: train one first)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.commands = [c for c in args.commands.split(",") if c]
    unknown = sorted(set(args.commands) - set(COMMANDS))
    if unknown:
        p.error(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    return args


def argv(command: str, setting: str, work: Path, tag: str) -> tuple[list[str], dict]:
    """The command line and extra environment of one run."""
    env = {}
    threads = [] if setting == "default" else ["--threads", setting]
    if command == "demo":
        cmd = ["demo"]
        if setting != "default":
            threads, env = [], {"OMP_NUM_THREADS": setting}
    elif command == "explain":
        cmd = ["explain", SENTENCE]
    elif command == "translate":
        run = ARGS.run if ARGS.run is not None else work / "run-first"
        cmd = ["translate", str(run), "28 novembre 2026"]
    else:
        cmd = ["train", "dates", "--steps", str(ARGS.steps), "--quiet", "--out",
               str(work / f"run-{tag}")]
    return [sys.executable, "-m", "qkv", *cmd, *threads], env


def timed(cmd: list[str], env: dict) -> float:
    full = {**os.environ, **env}
    if "OMP_NUM_THREADS" not in env:
        full.pop("OMP_NUM_THREADS", None)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, timeout=ARGS.timeout)
    except subprocess.TimeoutExpired:  # stopped at the limit: the time is at least that
        return float("inf")
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return dt


def main() -> None:
    times: dict[str, dict[str, list[float]]] = {c: {s: [] for s in SETTINGS}
                                                for c in ARGS.commands}
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the `yes` processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(ARGS.busy)]
    try:
        with tempfile.TemporaryDirectory(prefix="qkv-threads-") as tmp:
            work = Path(tmp)
            if "translate" in ARGS.commands and ARGS.run is None:  # a checkpoint to use
                timed(argv("train", "1", work, "first")[0], {})
            for r in range(ARGS.rounds):
                for c in ARGS.commands:
                    order = SETTINGS[r % 3:] + SETTINGS[:r % 3]
                    for s in order:
                        cmd, env = argv(c, s, work, f"{r}-{s}")
                        times[c][s].append(timed(cmd, env))
                        print(f"round {r + 1}: {c:9s} threads={s:7s} {times[c][s][-1]:7.2f} s",
                              file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    report(times)


def report(times: dict) -> None:
    rows = []
    print(f"\n{ARGS.busy} core(s) busy, {os.cpu_count()} cores, median of {ARGS.rounds} "
          f"round(s); seconds per run (ratio to the best setting)")
    print(f"{'command':10s}" + "".join(f"{s:>18s}" for s in SETTINGS) + "   default ok")
    for c, per in times.items():
        med = {s: statistics.median(v) for s, v in per.items()}
        best = min(med.values())
        ok = med["default"] <= 1.5 * best
        print(f"{c:10s}" + "".join(f"{med[s]:9.2f} ({med[s] / best:4.2f}x)" for s in SETTINGS)
              + f"   {'yes' if ok else 'NO'}")
        rows.append({"command": c, "median_s": med, "runs_s": per,
                     "default_over_best": med["default"] / best, "within_1_5x": ok})
    if ARGS.json:
        ARGS.json.write_text(json.dumps({"busy": ARGS.busy, "cpus": os.cpu_count(),
                                         "rounds": ARGS.rounds, "steps": ARGS.steps,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    ARGS = parse()
    main()
