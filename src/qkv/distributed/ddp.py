"""Data-parallel training of the seq2seq model: DistributedDataParallel over N processes.

:func:`launch` starts N local processes; torchrun starts them itself (:func:`init_from_env`
reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Either way
every process runs :func:`qkv.train.train`, which asks :meth:`DataParallel.current` whether
``torch.distributed`` is initialised with more than one process and, when it is:

* wraps the model in :class:`torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL
  on GPUs, one GPU per process), which averages the gradients over the processes during
  the backward;
* draws the *global* batch of the step, a function of ``(seed, step)`` alone, and feeds
  this rank its contiguous part (:meth:`DataParallel.part`; parts differ by at most one
  example when N does not divide the batch);
* sums the token losses of its part and scales them by ``N / (target tokens of the global
  batch)`` (:meth:`DataParallel.loss_scale`), so that DDP's average over ranks is exactly the
  mean token loss of the global batch: the same gradient as one process on the whole batch,
  up to the order of floating-point additions, for any N;
* sums the step's metrics and the Ctrl-C flag over the ranks (so every rank stops at the
  same step), splits validation across the ranks, and lets rank 0 alone write checkpoints
  and show progress (the others wait at a barrier while it writes).

Resume with a different N works because nothing in a checkpoint depends on N: the model
and optimizer states are the same on every rank, and the data order depends on
``(seed, step)`` only. The checkpoint records the N that wrote it; resuming with another
N prints a note (the command line does), and an N larger than the batch size is refused on
every rank (a rank with no example would have nothing to give DDP's backward). Dropout:
each rank draws its own masks from a generator seeded by ``(seed, first step, rank)``, so
with dropout > 0 a run depends on N (as any data-parallel run does); with dropout 0 it
does not.

Faults: a process that dies makes the launcher stop the others and raise a
ChildProcessError that names it; a rank stuck in a collective makes the others fail after
the process group's timeout (``timeout``, default 10 minutes) instead of hanging forever.
The launched processes die with their launcher (SIGKILL or SIGTERM of the launcher stops
them within a second: Linux's parent-death signal, and a watch on the parent's pid
elsewhere). They run in their own process group, so Ctrl-C reaches the launcher alone. The
launcher records it in memory it shares with them; every process reads it at every step and
the ranks combine it in the all-reduce the step does anyway, so every rank stops at the same
step, as with Ctrl-C in one process. Nothing is sent to the processes, so nothing can be
lost, whether they are starting, in a collective or writing. A second Ctrl-C stops them at
once.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT",
    "DataParallel",
    "backend_for",
    "env_rank",
    "init_from_env",
    "launch",
    "under_torchrun",
]

#: Seconds a collective may wait for the other ranks before failing (process group timeout).
DEFAULT_TIMEOUT = 600.0

# In a process that launch() started: the launcher's record of Ctrl-C (shared memory).
_launcher_stop = None


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher that sets
    ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when there is none)."""
    return int(os.environ.get("RANK", "0"))


class DataParallel:
    """This process's place in a data-parallel run; see the module docstring."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @classmethod
    def current(cls, device: torch.device) -> DataParallel | None:
        """The run this process belongs to, or None when training runs in one process.

        ``device`` is the configured device: a CUDA device becomes ``cuda:LOCAL_RANK``.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ValueError(f"rank {rank} would use cuda:{local} but this machine has "
                                 f"{torch.cuda.device_count()} GPUs; start at most one "
                                 "process per GPU")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        return cls(rank, world, local, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stop_requested(self) -> bool:
        """Whether the launcher that started this process got Ctrl-C (always False under
        torchrun, which passes SIGINT to its processes themselves)."""
        return _launcher_stop is not None and bool(_launcher_stop.value)

    # ---- model and data ---------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` inside DistributedDataParallel (which broadcasts rank 0's parameters)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def part(self, batch: Sequence) -> list:
        """This rank's contiguous part of the global batch (sizes differ by at most 1)."""
        n = len(batch)
        return list(batch[n * self.rank // self.world : n * (self.rank + 1) // self.world])

    def loss_scale(self, target_tokens: int) -> float:
        """Multiply this rank's *summed* token loss by this: DDP's average over the ranks is
        then the mean over the ``target_tokens`` tokens of the global batch."""
        return self.world / max(1, target_tokens)

    # ---- talking to the other ranks ---------------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, one all_reduce)."""
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)  # (n,)
        dist.all_reduce(t)
        return t.tolist()

    def mean_over_ranks(self, fn: Callable[[list], float], examples: Sequence) -> float:
        """``fn`` (a fraction over a list of examples, e.g. exact-match) computed on this
        rank's part of ``examples`` and combined over the ranks, weighted by part sizes."""
        mine = self.part(examples)
        right = round(fn(mine) * len(mine)) if mine else 0
        total_right, total = self.sum(right, len(mine))
        return total_right / total if total else float("nan")

    def barrier(self) -> None:
        dist.barrier()

    def check_start(self, config: dict, start: int, batch_size: int) -> None:
        """Every rank must start the same run at the same step, with a part of the batch."""
        if batch_size < self.world:
            raise ValueError(f"the global batch of {batch_size} examples cannot be split over "
                             f"{self.world} processes (each needs at least one); use at most "
                             f"{batch_size} processes")
        mine = hashlib.sha256(json.dumps([config, start], sort_keys=True,
                                         default=str).encode()).hexdigest()[:12]
        every: list = [None] * self.world
        dist.all_gather_object(every, [mine, start])
        if len({h for h, _ in every}) > 1:
            raise ValueError(f"the processes of this run disagree on its config or start step "
                             f"(start step per rank: {[s for _, s in every]}); they must all "
                             "train (or resume) the same run directory")

    def seed_dropout(self, seed: int, start: int) -> None:
        """Seed torch's generator from ``(seed, start, rank)``: each rank draws its own
        dropout masks, reproducibly."""
        digest = hashlib.sha256(f"qkv-ddp/{seed}/{start}/{self.rank}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---- starting processes ----------------------------------------------------------------------
def init_from_env(device: str | torch.device = "cpu", *,
                  timeout: float = DEFAULT_TIMEOUT) -> None:
    """Join the process group that torchrun's environment describes (``env://``)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"the launcher's environment lacks {name}; start the processes "
                             "with torchrun, or with launch(fn, nproc)")
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(dev), init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def _die_with(parent: int, *, poll: float = 0.5) -> None:
    """End this process (SIGTERM) when process ``parent`` is gone: Linux's parent-death
    signal, and a thread that watches our parent's pid (the portable fallback, and a guard
    against the parent dying before the signal was armed)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died already: we were handed to another
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="qkv-parent-watch", daemon=True).start()


def _leave_terminal_group() -> None:
    """Move this process into its own process group, so that Ctrl-C at the terminal
    reaches the launcher alone, then take SIGINT back (launch() holds it while starting us)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if not hasattr(signal, "pthread_sigmask"):
        return
    handler = signal.getsignal(signal.SIGINT)
    # A Ctrl-C of the whole group that came while we were still in it is pending here; the
    # launcher got it too and records it. Ignoring a signal discards it while pending.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if handler is not signal.SIG_IGN:  # a process started with SIGINT ignored keeps it so
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _worker(fn, rank: int, world: int, port: int, backend: str, timeout: float,
            threads: int | None, out, args, parent: int | None = None, stop=None) -> None:
    """One launched process: join the group, run ``fn(*args)``, report, leave."""
    global _launcher_stop
    _launcher_stop = stop
    if parent is not None:
        _die_with(parent)
        _leave_terminal_group()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # single machine: loopback only
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world, False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(*args)
        out.put((rank, "ok", result if rank == 0 else None))
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()
    except BaseException as e:  # report every failure to the launcher
        # Bad input needs no traceback, nor does Ctrl-C while the process was starting.
        if not isinstance(e, (ValueError, TypeError, KeyboardInterrupt)):
            traceback.print_exc()
        out.put((rank, "error", (type(e).__name__, str(e))))
    out.close()
    out.join_thread()


def launch(fn: Callable, nproc: int, *args, device: str | torch.device = "cpu",
           timeout: float = DEFAULT_TIMEOUT, threads: int | None = None,
           start_method: str = "spawn"):
    """Run ``fn(*args)`` on ``nproc`` local processes joined in one process group; return
    rank 0's result.

    The processes rendezvous on 127.0.0.1 (a port the OS picks) and use gloo, or NCCL with
    one GPU each for a CUDA ``device``. ``fn`` must be importable by name (spawn).
    ``threads``: torch threads per process (default: the cores divided among them).
    When a process fails, the others are stopped and the failure is raised here:
    ValueError/TypeError as themselves (bad input is reported by every rank alike), any
    other error or a process that dies as a ChildProcessError (an OSError, so ``qkv``
    prints it as one line) naming the rank; the failing process prints its traceback.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"the number of processes must be an int >= 1; got {nproc!r}")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc={nproc} on {dev}: this machine has "
                         f"{torch.cuda.device_count()} GPU(s), and each process needs its own")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    store = dist.TCPStore("127.0.0.1", 0, None, True,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    ctx = mp.get_context(start_method)
    out = ctx.Queue()
    # Ctrl-C (or a SIGINT sent to this process alone) is recorded here, in memory the
    # processes share: each reads it at every step and the ranks agree on it (see the
    # module docstring). Nothing is sent to them, so nothing can be lost.
    stop = ctx.Value("b", 0, lock=False)
    procs = [ctx.Process(target=_worker, args=(fn, r, nproc, store.port, backend_for(dev),
                                               timeout, threads, out, args, os.getpid(), stop))
             for r in range(nproc)]

    def interrupt(signum, frame) -> None:
        if stop.value:  # a second Ctrl-C: stop at once (the finally below ends them)
            raise KeyboardInterrupt
        stop.value = 1

    previous = None
    hold = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    try:
        if hold:
            previous = signal.signal(signal.SIGINT, interrupt)
            # SIGINT is held while the processes start: each inherits the held signal and
            # takes it back once it has left the terminal's process group, so a Ctrl-C at
            # that moment cannot hit a process that is still importing; ours waits here.
            if hasattr(signal, "pthread_sigmask"):
                if start_method != "fork":  # starting the resource tracker unblocks SIGINT
                    resource_tracker.ensure_running()
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for p in procs:
                p.start()
        finally:
            if hold and hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return _collect(procs, out, nproc)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # only the processes this call started
            if p.pid is not None:
                p.join()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        del store


def _collect(procs, out, nproc: int, grace: float = 10.0):
    """Wait for every rank's report; on the first failure give the others ``grace``
    seconds to report theirs, then raise the most telling one."""
    reports: dict[int, tuple] = {}
    failed_at = None
    while len(reports) < nproc:
        try:
            rank, status, value = out.get(timeout=0.2)
            reports[rank] = (status, value)
            if status == "error" and failed_at is None:
                failed_at = time.monotonic()
            continue
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in reports]
        if dead and out.empty():
            time.sleep(0.2)  # a report may still be in the pipe
            if out.empty():
                code = procs[dead[0]].exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
                raise ChildProcessError(
                    f"process {dead[0]} of {nproc} died (exit {how}) without reporting an "
                    "error; the other processes were stopped. Out of memory, or killed from "
                    "outside?")
        if failed_at is not None and time.monotonic() - failed_at > grace:
            break
    errors = {r: v for r, (s, v) in reports.items() if s == "error"}
    if any(name == "KeyboardInterrupt" for name, _ in errors.values()):
        raise KeyboardInterrupt  # Ctrl-C while a process was still starting
    if errors:
        # Bad input is found by every rank alike: prefer it over the errors it causes.
        for _, (name, msg) in sorted(errors.items()):
            if name in ("ValueError", "TypeError"):
                raise (ValueError if name == "ValueError" else TypeError)(msg)
        r, (name, msg) = min(errors.items())
        raise ChildProcessError(f"process {r} of {nproc} failed with {name}: {msg} (its "
                                "traceback is above); the other processes were stopped")
    return reports[0][1]
