"""How ``qkv train`` runs: in this process, on ``--nproc N`` launched processes, or as one
rank of torchrun; it checks the process count against the batch and tells the user when a
run resumes on another number of processes.

The data-parallel machinery itself (:class:`~qkv.distributed.ddp.DataParallel`,
:func:`~qkv.distributed.ddp.launch`, :func:`~qkv.distributed.ddp.init_from_env`) lives in
:mod:`qkv.distributed.ddp`; the training loop in :mod:`qkv.train`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import RunLock
from ..distributed.ddp import env_rank, init_from_env, launch, under_torchrun
from ..memory import check_fits
from ..tasks import get_task
from ..train import TrainConfig, read_run, resolve_device, train

__all__ = ["resume_note", "run_training"]


def resume_note(state: dict, world: int) -> str | None:
    """A line for the user when a run is resumed with another number of processes."""
    before = int(state.get("data", {}).get("world_size", 1))
    if before == world:
        return None
    cfg = state.get("config", {})
    model = cfg.get("model", cfg)  # the model's fields sat in the config itself before
    dropout = "; its dropout masks change with it" if model.get("dropout", 0) > 0 else ""
    return (f"note: this run was checkpointed by {before} process(es) and resumes on {world}; "
            f"the global batch ({cfg.get('batch_size')} examples per step) and the data order "
            f"are unchanged, so training continues the same optimisation (up to "
            f"floating-point summation order){dropout}")


def _announcer(console, announce: str | None):
    """A callable printing ``announce`` on one line (never wrapped: it holds a path)."""
    return (lambda: console.print(announce, soft_wrap=True)) if announce else None


def _train_process(cfg, run_dir: str, resume: bool, quiet: bool, announce: str | None = None,
                   lock: bool = True):
    """What each launched process runs: :func:`qkv.train.train`, progress on rank 0."""
    from rich.console import Console

    main = dist.get_rank() == 0
    console = Console(stderr=True)
    start = _announcer(console, announce) if main else None
    return train(cfg, Path(run_dir), resume=resume, progress=main and not quiet,
                 console=console, log=console.print if (quiet and main) else None,
                 on_start=start, lock=lock)


def run_training(cfg, run_dir: Path, *, resume: bool, quiet: bool, nproc: int | None,
                 threads: int | None, console, announce: str | None = None):
    """Train in this process, on ``nproc`` launched processes, or as one rank of torchrun.

    ``announce`` is printed (rich markup) once every check has passed, before training
    starts. Returns the :class:`~qkv.train.TrainResult` on the process that reports (this
    one, the launcher, or torchrun's rank 0) and None on torchrun's other ranks.
    """
    state = read_run(run_dir).state if resume else None
    run_cfg = cfg if cfg is not None else TrainConfig.from_dict(state["config"])
    device = run_cfg.device
    if under_torchrun():
        if nproc is not None:
            raise ValueError(f"--nproc {nproc} was given but torchrun already started "
                             f"{os.environ['WORLD_SIZE']} processes; drop --nproc")
        world = int(os.environ["WORLD_SIZE"])
    else:
        world = 1 if nproc is None else nproc
        if isinstance(world, bool) or world < 1:
            raise ValueError(f"--nproc must be >= 1; got {nproc}")
    if run_cfg.batch_size < world:  # before starting anything (every rank would refuse)
        raise ValueError(f"the global batch of {run_cfg.batch_size} examples cannot be split "
                         f"over {world} processes (each needs at least one); use at most "
                         f"{run_cfg.batch_size} processes or a larger --batch-size")
    main = env_rank() == 0
    if resume and main:
        note = resume_note(state, world)
        if note:
            console.print(note)
    if under_torchrun():
        init_from_env("cuda" if device in ("cuda", "auto") and torch.cuda.is_available()
                      else device)
        try:
            result = _train_process(cfg, str(run_dir), resume, quiet, announce)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return result if main else None
    if world == 1:
        return train(cfg, run_dir, resume=resume, progress=not quiet, console=console,
                     log=console.print if quiet else None,
                     on_start=_announcer(console, announce))
    dev = resolve_device(device)
    task = get_task(run_cfg.task, **run_cfg.task_options)
    check_fits(run_cfg, task.tokenizer().vocab_size, 2 * task.max_target_len + 2, device=dev,
               world=world)
    # The launcher holds the run's lock for its processes: when it is killed, they die
    # with it and the lock is stale.
    with RunLock(run_dir):
        if announce:
            console.print(announce, soft_wrap=True)
        return launch(_train_process, world, cfg, str(run_dir), resume, quiet, None, False,
                      device=dev.type, threads=threads)
