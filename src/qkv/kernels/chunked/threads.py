"""Running the blocks of one chunked call on CPU threads.

The blocks of queries are spread over :data:`WORKERS` threads (default
``torch.get_num_threads()``), each running PyTorch operations single-threaded; the caller's
thread setting is restored afterwards. Work is either handed out on demand (a
:class:`Queue`; units that write disjoint rows) or dealt beforehand by cost
(:func:`split`; the backward sums per-share gradients in a fixed order), so results never
depend on thread timing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

__all__ = ["WORKERS", "Queue", "run_shares", "split", "workers"]


#: CPU threads a chunked call is split over (None: ``torch.get_num_threads()``). Each
#: thread runs its share of the blocks with single-threaded PyTorch operations: many small
#: multi-threaded operations would each end in a barrier that stalls whenever another
#: process holds one of the cores. Results do not depend on thread timing.
WORKERS: int | None = None


_worker_state = threading.local()  # .active: this thread is running a share
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def workers(device: torch.device) -> int:
    """Threads a call on ``device`` is split over: 1 off the CPU and inside a worker."""
    if device.type != "cpu" or getattr(_worker_state, "active", False):
        return 1
    return max(1, WORKERS if WORKERS is not None else torch.get_num_threads())


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start afresh."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < size:
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="qkv-chunked")
        return _pool


def run_shares(shares: list[list], work: Callable[[int, list], None]) -> None:
    """Run ``work(i, shares[i])`` for every share: share 0 on this thread, the others on
    pool threads, each with one intra-op thread; returns when all are done."""
    if len(shares) <= 1:
        for i, share in enumerate(shares):
            work(i, share)
        return

    inference = torch.is_inference_mode_enabled()  # grad modes are per thread: carry it

    def run(i: int) -> None:
        torch.set_num_threads(1)
        _worker_state.active = True
        try:
            # inference_mode(False) switches grad mode on, so no_grad goes inside it
            with torch.inference_mode(inference), torch.no_grad():
                work(i, shares[i])
        finally:
            _worker_state.active = False

    saved = torch.get_num_threads()
    pool = _get_pool(len(shares) - 1)
    futures = [pool.submit(run, i) for i in range(1, len(shares))]
    try:
        run(0)
    finally:
        wait(futures)
        torch.set_num_threads(saved)
    for f in futures:
        f.result()  # re-raise a worker's error


class Queue:
    """Units handed to whichever thread asks first (a thread-safe iterator)."""

    def __init__(self, units: list):
        self._it = iter(units)
        self._lock = threading.Lock()

    def __iter__(self) -> Queue:
        return self

    def __next__(self):
        with self._lock:
            return next(self._it)


def split(units: list, costs: list[int], workers: int) -> list[list]:
    """Deal units to at most ``workers`` shares of about equal cost (largest first, each to
    the least loaded share), keeping each share in the original order. Deterministic."""
    workers = max(1, min(workers, len(units)))
    loads = [0] * workers
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: -costs[i]):
        w = loads.index(min(loads))
        owner[i] = w
        loads[w] += costs[i]
    return [[u for u, o in zip(units, owner, strict=True) if o == w] for w in range(workers)]

