"""Data-parallel training (DistributedDataParallel over gloo, CPU, processes forked from a
fork server: never from this test process, whose other threads could hold a lock at the
fork that the child then waits on forever).

The central claim: N processes that split a global batch compute the same training run as
one process on the whole batch, and a checkpoint resumes on any number of processes.

Tolerance. These runs use float64 (``torch.set_default_dtype``) so that the only difference
between them is the order of floating-point additions (DDP sums per-rank gradients; one
process sums over the whole batch at once; batch padding differs per part). That changes a
gradient by ~1e-16 relative. AdamW divides the first moment by ``sqrt(v) + eps`` with
``eps = 1e-9``, which can magnify an absolute gradient difference ``d`` into a parameter
difference of at most ``lr * d / eps`` per step: with ``|g| <= 1`` (clipping),
``d <= 1e-14`` (1e-16 times the ~100 terms of these sums, with margin), ``lr = 3e-3`` and 4
steps that is ``1.2e-7``, the bound used below. In float32 the same bound would be ~1e3: a
gradient element of ~1e-8 whose sign flips with the summation order moves Adam's update by
``2 lr``, which is why float32 parameters of two such runs cannot be compared tightly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qkv.train as qtrain
from multiproc import run_ranks
from qkv import checkpoint as ckpt
from qkv.cli import main
from qkv.cli.launch import resume_note
from qkv.distributed import ddp
from qkv.models.seq2seq import TransformerConfig
from qkv.train import TrainConfig, train

TINY = TransformerConfig(vocab_size=None, d_model=32, num_heads=2, encoder_layers=1,
                         decoder_layers=1, ff_dim=64, dropout=0.0)
# An odd global batch: 2 processes get 3 + 4 examples, 3 processes 2 + 2 + 3.
CFG = {"task": "reverse", "task_options": {"min_len": 3, "max_len": 7}, "steps": 4,
       "batch_size": 7, "lr": 3e-3, "warmup": 1, "eval_every": 4, "eval_size": 6,
       "checkpoint_every": 2, "model": TINY}
TOL = 4 * CFG["lr"] * 1e-14 / 1e-9  # the bound derived in the module docstring


@contextmanager
def float64_one_thread():
    dtype, n = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(n)


def _train_rank(rank, world, cfg, run_dir, resume, bad_dir=None):
    """One rank: train or resume, counting the checkpoints this rank writes."""
    torch.set_default_dtype(torch.float64)
    writes = []
    real_write = qtrain.write_checkpoint

    def counting(*args, **kw):
        writes.append(args[1])  # the step
        return real_write(*args, **kw)

    qtrain.write_checkpoint = counting
    refused = None
    if bad_dir is not None:  # a run whose batch cannot be split over this many processes
        try:
            train(None, Path(bad_dir), resume=True, progress=False)
        except ValueError as e:
            refused = str(e)
    result = train(None if resume else TrainConfig(**cfg), Path(run_dir), resume=resume,
                   progress=False)
    return {"writes": writes, "step": result.step, "history": result.history,
            "refused": refused}


def _params(run_dir) -> dict:
    """The parameters of a run's latest checkpoint."""
    return load_file(ckpt.find_checkpoint(Path(run_dir)) / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _point_at(run_dir: Path, step: int) -> None:
    """Make the run's latest checkpoint the one of ``step`` (a run stopped there)."""
    pointer = run_dir / ckpt.POINTER
    data = json.loads(pointer.read_text())
    data.update(step=step, dir=f"step-{step:07d}")
    pointer.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; 2 processes; the 2-process run resumed from step 2 on 3 processes and
    on 1 process; a batch-of-2 run that 3 processes must refuse to resume."""
    tmp = tmp_path_factory.mktemp("ddp")
    with float64_one_thread():
        one = train(TrainConfig(**CFG), tmp / "one", progress=False)
        bad = {**CFG, "batch_size": 2, "steps": 1, "checkpoint_every": 1, "eval_every": 1}
        train(TrainConfig(**bad), tmp / "bad", progress=False)
    two = run_ranks(_train_rank, 2, CFG, str(tmp / "two"), False, timeout=120)
    for name in ("three", "back_to_one"):
        shutil.copytree(tmp / "two", tmp / name)
        _point_at(tmp / name, 2)
    three = run_ranks(_train_rank, 3, CFG, str(tmp / "three"), True, str(tmp / "bad"),
                      timeout=120)
    with float64_one_thread():
        back = train(None, tmp / "back_to_one", resume=True, progress=False)
    return {"tmp": tmp, "one": one, "two": two, "three": three, "back": back}


def test_two_processes_equal_one_process(runs):
    one, two = _params(runs["tmp"] / "one"), _params(runs["tmp"] / "two")
    assert _max_diff(one, two) <= TOL
    assert runs["two"][0]["step"] == runs["two"][1]["step"] == CFG["steps"]
    # the logged loss is the global batch's mean token loss, as in one process
    for a, b in zip(runs["one"].history, runs["two"][0]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12, abs=1e-12)
        assert a["acc"] == b["acc"]
    assert runs["one"].history[-1]["valid_exact"] == runs["two"][0]["history"][-1]["valid_exact"]


def test_a_test_that_can_fail_would_see_a_different_batch(runs):
    # The bound is tight enough to see a real difference: one step more changes the
    # parameters by far more than TOL.
    ck = runs["tmp"] / "one"
    at2 = load_file(ck / "step-0000002" / "model.safetensors")
    assert _max_diff(at2, _params(ck)) > 1e3 * TOL


def test_only_rank_zero_writes_checkpoints(runs):
    assert runs["two"][0]["writes"] == [2, 4]
    assert runs["two"][1]["writes"] == []
    assert runs["three"][0]["writes"] == [4]
    assert runs["three"][1]["writes"] == runs["three"][2]["writes"] == []
    state = json.loads((runs["tmp"] / "two" / "step-0000004" / "state.json").read_text())
    assert state["data"]["world_size"] == 2
    state = json.loads((runs["tmp"] / "three" / "step-0000004" / "state.json").read_text())
    assert state["data"]["world_size"] == 3


def test_resume_on_another_number_of_processes(runs):
    one = _params(runs["tmp"] / "one")
    assert _max_diff(one, _params(runs["tmp"] / "three")) <= TOL  # 2 -> 3 processes
    assert _max_diff(one, _params(runs["tmp"] / "back_to_one")) <= TOL  # 2 -> 1 process
    assert runs["back"].step == CFG["steps"]


def test_too_many_processes_for_the_batch_are_refused_on_every_rank(runs):
    for rank in range(3):
        msg = runs["three"][rank]["refused"]
        assert msg is not None and "cannot be split over 3 processes" in msg


def _ctrl_c_rank(rank, world, run_dir):
    """Rank 1 alone gets Ctrl-C during step 3; both ranks must stop after that step."""
    import signal

    real_lr_at = qtrain.lr_at

    def lr_at(cfg, step):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(cfg, step)

    qtrain.lr_at = lr_at
    result = train(TrainConfig(**{**CFG, "steps": 50, "checkpoint_every": 50}),
                   Path(run_dir), progress=False)
    return result.step, result.interrupted


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    reports = run_ranks(_ctrl_c_rank, 2, str(tmp_path / "c"), timeout=60)
    assert reports == {0: (3, True), 1: (3, True)}
    assert json.loads((tmp_path / "c" / ckpt.POINTER).read_text())["step"] == 3


def _ctrl_c_during_the_agreement_rank(rank, world, run_dir):
    """Every rank gets Ctrl-C inside step 3's all-reduce, after it has read its own flag."""
    import signal

    real_sum = ddp.DataParallel.sum
    calls = []

    def late_sum(self, *values):
        total = real_sum(self, *values)
        calls.append(values)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # its handler runs before this returns
        return total

    ddp.DataParallel.sum = late_sum
    result = train(TrainConfig(**{**CFG, "steps": 50, "checkpoint_every": 50}),
                   Path(run_dir), progress=False)
    return result.step, result.interrupted


def test_ctrl_c_during_the_ranks_agreement_is_not_lost(tmp_path):
    """Before: the sum of step 3 (no rank asked) overwrote the flag the handler had just
    set, on every rank, and the run trained on to step 50."""
    reports = run_ranks(_ctrl_c_during_the_agreement_rank, 2, str(tmp_path / "c"), timeout=60)
    assert reports == {0: (4, True), 1: (4, True)}
    assert json.loads((tmp_path / "c" / ckpt.POINTER).read_text())["step"] == 4


def test_resume_note():
    state = {"data": {"world_size": 2}, "config": {"batch_size": 64, "dropout": 0.1}}
    note = resume_note(state, 4)
    assert "2 process(es)" in note and "on 4" in note and "64 examples" in note
    assert "dropout" in note
    assert resume_note(state, 2) is None
    assert resume_note({"data": {}, "config": {}}, 1) is None  # a single-process run
    # the config form of today: the model's fields in "model"
    state = {"data": {"world_size": 2}, "config": {"batch_size": 64, "model": {"dropout": 0.1}}}
    assert "dropout" in resume_note(state, 4)
    state["config"]["model"]["dropout"] = 0.0
    assert "dropout" not in resume_note(state, 4)


def test_batch_parts_cover_the_batch():
    batch = list(range(10))
    for world in (1, 2, 3, 4, 10):
        parts = [ddp.DataParallel(r, world, r, torch.device("cpu")).part(batch)
                 for r in range(world)]
        assert [x for p in parts for x in p] == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---- the command line: qkv train --nproc N, and under torchrun ---------------------------------
TRAIN = ["--steps", "2", "--batch-size", "6", "--d-model", "32", "--heads", "2",
         "--encoder-layers", "1", "--decoder-layers", "1", "--ff-dim", "64",
         "--eval-every", "2", "--eval-size", "6", "--checkpoint-every", "1", "--quiet"]


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_cli_nproc_then_resume_on_one(tmp_path, capsys):
    run = tmp_path / "rev"
    code, _, err = _cli(capsys, "train", "reverse", "--out", run, "--nproc", "2", *TRAIN)
    assert code == 0, err
    err = " ".join(err.split())  # the console wraps lines at 80 columns; paths vary in length
    assert "on 2 processes" in err and "done: step 2" in err
    state = json.loads((run / "step-0000002" / "state.json").read_text())
    assert state["data"]["world_size"] == 2
    # resuming on one process is announced, and a finished run stays finished
    code, _, err = _cli(capsys, "train", "reverse", "--out", run, "--resume", "--quiet")
    assert code == 0, err
    assert "checkpointed by 2 process(es) and resumes on 1" in " ".join(err.split())


def test_cli_bad_nproc(tmp_path, capsys):
    code, _, err = _cli(capsys, "train", "reverse", "--out", tmp_path / "r", "--nproc", "0",
                        *TRAIN)
    assert code == 2 and "--nproc must be >= 1" in err
    code, _, err = _cli(capsys, "train", "reverse", "--out", tmp_path / "r", "--nproc", "7",
                        *TRAIN)
    assert code == 2 and "cannot be split over 7 processes" in err


def _torchrun_rank(rank, world, port, run_dir, out):
    """What torchrun would start: the environment, then the qkv command line."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "GLOO_SOCKET_IFNAME": "lo"})
    torch.set_num_threads(1)
    try:
        main(["train", "reverse", "--out", run_dir, *TRAIN])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except BaseException as e:
        code = repr(e)
    out.put((rank, code))
    out.close()
    out.join_thread()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_environment(tmp_path):
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_torchrun_rank, args=(r, 2, port, str(tmp_path / "tr"), out))
             for r in range(2)]
    for p in procs:
        p.start()
    codes = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert codes == {0: 0, 1: 0}
    state = json.loads((tmp_path / "tr" / "step-0000002" / "state.json").read_text())
    assert state["data"]["world_size"] == 2


# ---- the launcher: failures are reported, not hung on --------------------------------------------
def _dies(rank):
    if rank == 1:
        os._exit(3)
    torch.distributed.barrier()  # rank 0 waits here for a peer that is gone


def _bad_input(rank):
    raise ValueError(f"bad option seen by rank {rank}")


def test_launcher_reports_a_dead_process_and_stops_the_others():
    t0 = time.monotonic()
    with pytest.raises(ChildProcessError, match=r"process 1 of 2 died \(exit code 3\)"):
        ddp.launch(_rank_call, 2, _dies, start_method="spawn", timeout=60)
    assert time.monotonic() - t0 < 30


def test_launcher_raises_bad_input_as_valueerror():
    with pytest.raises(ValueError, match="bad option seen by rank"):
        ddp.launch(_rank_call, 2, _bad_input, start_method="spawn", timeout=60)


def _rank_call(fn):
    return fn(torch.distributed.get_rank())
