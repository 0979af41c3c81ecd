"""Run a function on N local processes joined in a gloo process group (127.0.0.1 only).

Starting a fresh interpreter that imports torch costs 2-4 s per process on the 2-core CI
machine (over 10 s for 4 processes when the machine is busy), so the workers come from a
*fork server*: one clean process that imports torch and qkv once (per test session), from
which each worker is forked in a fraction of a second. Forking the test process itself
would be as fast but is not safe: it runs other threads (the rendezvous store's server,
which the ranks are already talking to while the last ones start; the chunked backend's
pool), and a child forked while one of them holds a lock (malloc's, say) hangs on it. CI
saw exactly that: the third rank of a DDP test never joined. The workers run torch
single-threaded (``torch.set_num_threads(1)``, done first thing below), which is what N
processes on 2 cores want anyway. A test still runs many checks inside one
:func:`run_ranks` call and inspects what each rank returned; ``fn`` and its arguments must
pickle (a module-level function of a test module does).

The parent owns the rendezvous store (a ``TCPStore`` on a port the OS picks, so two runs
never race for a port); the workers join it as clients.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback

import torch
import torch.distributed as dist

#: Imported once by the fork server, so that each worker forked from it starts warm.
_PRELOAD = ["torch", "torch.distributed", "qkv", "qkv.train", "multiproc"]


def _child(fn, rank, world, port, pg_timeout, out, args):
    torch.set_num_threads(1)  # N processes share 2 cores; and required after fork (above)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on loopback
    try:
        store = dist.TCPStore("127.0.0.1", port, world, False,
                              timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args)
        out.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, then exit
        out.put((rank, "error", traceback.format_exc()))
    out.close()
    out.join_thread()  # the report must reach the pipe before the hard exit below
    # Exit without tearing the group down collectively: a test may have left it broken on
    # purpose (a rank that died), and destroy_process_group could then wait for peers.
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0,
              allow_missing: bool = False, start_method: str = "forkserver") -> dict:
    """Run ``fn(rank, world, *args)`` on ``world`` new processes; ``{rank: result}``.

    A rank that raises makes this raise with its traceback. ``allow_missing``: ranks that
    exit without reporting (killed on purpose) are left out instead of raising. ``fn``
    must be importable by name (a module-level function).
    """
    store = dist.TCPStore("127.0.0.1", 0, None, True,
                          timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    out = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world, store.port, pg_timeout, out, args),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world and time.monotonic() < deadline:
            try:
                rank, status, value = out.get(timeout=0.2)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break  # everyone is gone; whoever did not report never will
                continue
            (results if status == "ok" else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()  # only the processes this call started
                p.join()
        del store
    if errors:
        raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in
                                       sorted(errors.items())))
    missing = sorted(set(range(world)) - set(results))
    if missing and not allow_missing:
        raise AssertionError(f"ranks {missing} did not report within {timeout} s "
                             f"(exit codes {[p.exitcode for p in procs]})")
    return results
