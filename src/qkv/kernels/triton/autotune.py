"""Block sizes for the Triton kernels: a few candidates per kernel, timed once per shape class.

Each kernel has a short list of :class:`Config` candidates that depends on the padded head
dim (bigger heads need smaller tiles to fit shared memory). The first call of a *shape class*
(kernel, device, dtype, head dims, band flags, length buckets) times every candidate with
CUDA events and keeps the fastest for the rest of the process; candidates that do not compile
on the device (too much shared memory) are skipped. The lists are short on purpose, so that
tuning and compilation fit in a few minutes of a benchmark run.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) nothing is timed: one
small fixed config is used, or the one set with :func:`override` (the tests use it to make
tiles that do not divide the lengths).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import offline

log = logging.getLogger("qkv")

__all__ = ["Config", "arch_of", "candidates", "choose", "override"]


@dataclass(frozen=True)
class Config:
    """One launch configuration: the tile sizes and Triton's warps and pipeline stages.

    ``block_m`` tiles the queries, ``block_n`` the keys, in every kernel. ``split_d`` (dK/dV
    kernel only) shares each key block among that many programs, each with a slice of the
    head dim's accumulators.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    split_d: int = 1


#: Candidates that spill registers on sm_90 but ran faster than the spill-free ones on a
#: GPU: (kernel, block_m, block_n, num_warps, num_stages). ``benchmarks/gpu_compile.py``
#: reports their spills without failing.
SPILLS_MEASURED_FASTER = {("dkdv", 32, 128, 8, 2)}

#: The only config used by the interpreter unless :func:`override` says otherwise.
INTERPRETER_CONFIG = Config(32, 32, 1, 1)

_forced: Config | None = None
_best: dict[tuple, Config] = {}


@contextlib.contextmanager
def override(config: Config) -> Iterator[None]:
    """Use ``config`` for every launch inside the block (no tuning)."""
    global _forced
    before, _forced = _forced, config
    try:
        yield
    finally:
        _forced = before


def arch_of(device: torch.device) -> int | None:
    """The compute capability the kernels are built for (90 for sm_90): the target of
    :func:`offline.compiling` while it is on, else the CUDA device's; None = interpreter."""
    recorder = offline.active()
    if recorder is not None:
        return recorder.arch
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def candidates(kernel: str, block_d: int, arch: int | None) -> list[Config]:
    """The configs worth trying for ``kernel`` ("fwd", "dkdv", "dq", "weights") at padded
    head dim ``block_d`` on compute capability ``arch`` (90 = sm_90; None = the
    interpreter): Hopper-shaped first, then smaller tiles. One to three per kernel, so that
    the first calls of a shape compile only a few. The first candidate of every list
    compiles for sm_90 without register spills and within shared memory, with Triton 3.6
    and 3.9 (``benchmarks/gpu_compile.py`` checks); so do the others, except where one
    that spills was measured faster on a GPU (named below)."""
    if _forced is not None:
        return [_forced]
    if arch is None:
        return [INTERPRETER_CONFIG]
    hopper = arch >= 90
    # The lists below compile without spills on sm_90 with Triton 3.6 and 3.9 (bf16, causal
    # and window bands), but for the one dK/dV tile a GPU run showed faster; other tiles
    # that spilled on sm_90 in either version are left out there.
    if kernel == "fwd":  # queries resident (block_m), keys streamed (block_n)
        if block_d <= 64:
            if hopper:  # 128x64 at 4 warps spills 4 B with Triton 3.6
                return [Config(128, 128, 8, 3), Config(64, 64, 4, 3)]
            return [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3)]
        if block_d <= 128:  # 128x128 spills (sm_90: 4-144 B; sm_80: 784 B)
            return [Config(128, 64, 8, 3), Config(64, 64, 4, 3)]
        if hopper:  # D=256: 128x64 spills 36-68 B, 64x64 at 4 warps 100 B
            return [Config(64, 64, 8, 2)]
        return [Config(64, 64, 8, 2), Config(64, 32, 4, 2)]
    if kernel == "dkdv":  # keys resident (block_n), queries streamed (block_m)
        # The float32 dK + dV accumulators take 2 * block_n * D * 4 bytes of registers: at
        # 8 warps, 128 keys x D=128 is 128 registers a thread, and a short query block
        # (16-32) keeps the S, P, dP tiles beside them small. D=256 splits the columns
        # over 4 programs (split_d) rather than spill. 4 warps spill with Triton 3.6.
        if block_d <= 64:
            return [Config(32, 128, 8, 2), Config(16, 128, 8, 3)]
        if block_d <= 128:  # 3 stages spill 8 B at D=96 (fp16, window, Triton 3.6)
            # 32x128 spills 72-108 B on sm_90 yet ran faster on an H200 (bf16, D=128,
            # L=4096: 274 TFLOP/s against 205 for 16x128): the tuner times both.
            return ([Config(16, 128, 8, 2), Config(32, 128, 8, 2)] if hopper
                    else [Config(16, 128, 8, 2), Config(16, 128, 8, 3)])
        if hopper:
            return [Config(16, 128, 8, 2, split_d=4)]
        return [Config(16, 64, 4, 2, split_d=4)]  # 188 KB of shared memory at 128 keys
    if kernel == "dq":  # deterministic backward only; queries resident, keys streamed
        if block_d <= 64:
            return [Config(128, 64, 8, 2), Config(128, 32, 4, 3)]
        if block_d <= 128:  # 128x32/4 spills on sm_90, 128x64/8 2 KB on sm_80
            return ([Config(128, 64, 8, 2), Config(64, 32, 4, 3)] if hopper
                    else [Config(64, 32, 4, 3)])
        return [Config(64, 32, 8, 2), Config(64, 16, 4, 2)]
    if kernel == "weights":  # memory-bound: one sane tile
        return [Config(64, 64, 4, 2) if block_d <= 128 else Config(32, 64, 4, 2)]
    raise ValueError(f"unknown kernel {kernel!r}; expected 'fwd', 'dkdv', 'dq' or 'weights'")


def bucket(n: int) -> int:
    """Lengths that tune alike share a bucket: the next power of two, capped at 2**16."""
    return 1 << min(max(n - 1, 0).bit_length(), 16)


def choose(key: tuple, configs: list[Config], run: Callable[[Config], None]) -> Config:
    """The fastest of ``configs`` for shape class ``key``; ``run(config)`` launches once.

    A single candidate is returned without launching. Otherwise each candidate is launched
    once (which compiles it), then timed over a few launches with CUDA events; the winner is
    remembered under ``key``. The caller launches the winner itself afterwards.
    """
    if len(configs) == 1:
        return configs[0]
    recorder = offline.active()
    if recorder is not None:  # compiling for a target: every candidate, no timing
        for cfg in configs[:1] if recorder.first_only else configs:
            run(cfg)
        return configs[0]
    if key in _best:
        return _best[key]
    timings = []
    for cfg in configs:
        try:
            run(cfg)  # compile + warm up
        except Exception as exc:  # e.g. OutOfResources: this tile does not fit the device
            log.debug("qkv triton: config %s skipped for %s: %s", cfg, key, exc)
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 5
        start.record()
        for _ in range(reps):
            run(cfg)
        stop.record()
        stop.synchronize()
        timings.append((start.elapsed_time(stop) / reps, cfg))
    if not timings:
        raise RuntimeError(f"no Triton config compiled for {key}; tried {configs}")
    best = min(timings, key=lambda t: t[0])[1]
    log.debug("qkv triton: %s -> %s (%s)", key, best,
              ", ".join(f"{c.block_m}x{c.block_n}/w{c.num_warps}/s{c.num_stages}: {ms:.3f} ms"
                        for ms, c in timings))
    _best[key] = best
    return best
