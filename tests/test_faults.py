"""Fault tests: what training, its checkpoints and the launcher do when things go wrong.

SIGKILL in the middle of writing a checkpoint, a loss that turns NaN, damaged checkpoint
files, a second writer on one run directory, and the launcher of ``qkv train --nproc 2``
killed or interrupted. Tiny models and few steps keep them fast.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv.train as qtrain
from qkv import checkpoint as ckpt
from qkv.checkpoint import RunLock
from qkv.cli import main
from qkv.decode import load_run
from qkv.models.seq2seq import TransformerConfig
from qkv.train import TrainConfig, read_run, train

from helpers import one_thread

REPO = Path(__file__).resolve().parents[1]
TINY = {"d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 32,
        "dropout": 0.0}
TINY_FLAGS = ["--d-model", "16", "--heads", "2", "--encoder-layers", "1", "--decoder-layers",
              "1", "--ff-dim", "32", "--batch-size", "8", "--eval-size", "10",
              "--eval-every", "1000", "--warmup", "2", "--quiet", "--threads", "1"]


def config(**kw) -> TrainConfig:
    base = {"task": "reverse", "task_options": {"min_len": 2, "max_len": 5}, "steps": 10,
            "batch_size": 8, "lr": 3e-3, "warmup": 2, "eval_every": 1000, "eval_size": 10,
            "checkpoint_every": 5, "model": TransformerConfig(vocab_size=None, **TINY)}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run10(tmp_path_factory) -> Path:
    """A finished run of 10 steps (checkpoints at 5 and 10)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    with one_thread():
        train(config(), out, progress=False)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ---- checkpoints are checked when read -------------------------------------------------------
def test_every_damage_of_a_checkpoint_is_listed_at_once(run10, tmp_path):
    run = _copy(run10, tmp_path)
    step = run / "step-0000010"
    weights = load_file(str(step / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(step / "model.safetensors"))
    state = json.loads((step / "state.json").read_text())
    state["step"] = 7  # the pointer says 10
    del state["rng"]
    state["optimizer"] = {"scalars": {}}  # no param_groups
    state["tokenizer"] = {"type": "char"}  # no characters
    (step / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError) as e:
        read_run(run)
    msg = str(e.value)
    assert "5 problems" in msg, msg
    for part in ("state.json says step 7 but checkpoint.json says 10",
                 "rng in state.json must be a JSON object (got missing)",
                 "lacks its 'param_groups'", f"model.safetensors holds NaN or infinite values "
                 f"in 1 tensor ({name})", "tokenizer in state.json is not usable"):
        assert part in msg, msg


def test_resume_refuses_a_nan_checkpoint_in_one_line(run10, tmp_path, capsys):
    """Before: --resume trained on with NaN loss, exited 0 and wrote NaN checkpoints."""
    run = _copy(run10, tmp_path)
    weights = load_file(str(run / "step-0000010" / "model.safetensors"))
    for k in list(weights)[:2]:
        weights[k] = torch.full_like(weights[k], float("inf"))
    save_file(weights, str(run / "step-0000010" / "model.safetensors"))
    code, _, err = _cli(capsys, "train", "reverse", "--out", run, "--resume", "--steps", 12)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qkv: error: checkpoint"), err
    assert "NaN or infinite values in 2 tensors" in err
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 10
    assert not (run / "step-0000012").exists()


@pytest.mark.parametrize("part", ["config", "rng", "optimizer", "tokenizer"])
def test_a_missing_part_of_the_state_is_a_valueerror(run10, tmp_path, part):
    """Before: KeyError/RuntimeError tracebacks."""
    run = _copy(run10, tmp_path)
    path = run / "step-0000010" / "state.json"
    state = json.loads(path.read_text())
    state[part] = [1, 2] if part == "rng" else None
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"{part} in state.json must be a JSON object"):
        load_run(run)


def test_a_rng_state_of_the_wrong_form_is_named(run10, tmp_path):
    run = _copy(run10, tmp_path)
    path = run / "step-0000010" / "state.json"
    state = json.loads(path.read_text())
    state["rng"]["torch"] = "bm90IGEgc3RhdGU="  # base64, but of 11 bytes
    state["rng"]["numpy"] = ["MT19937", [1, 2, 3], 0, 0, 0.0]
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError) as e:
        read_run(run)
    assert "rng 'torch' holds 11 bytes" in str(e.value)
    assert "rng 'numpy' must be NumPy's get_state()" in str(e.value)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Before: training went on with NaN loss and wrote NaN checkpoints."""
    real = qtrain.lr_at
    # From step 7 on the weights become NaN; the loss of step 8 is NaN.
    monkeypatch.setattr(qtrain, "lr_at", lambda cfg, s: float("nan") if s >= 6 else real(cfg, s))
    out = tmp_path / "run"
    with one_thread(), pytest.raises(ValueError) as e:
        train(config(steps=20), out, progress=False)
    msg = str(e.value)
    assert "the training loss became nan at step 8" in msg, msg
    assert "its last checkpoint (step 5) is kept" in msg
    ck = read_run(out)  # loadable, every tensor finite
    assert ck.step == 5
    assert not (out / ckpt.LOCK).exists(), "the lock is released when the run stops"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000005"]


def test_a_nan_checkpoint_is_never_written(run10, tmp_path):
    run = _copy(run10, tmp_path)
    weights = load_file(str(run / "step-0000010" / "model.safetensors"))
    k = sorted(weights)[-1]
    weights[k] = weights[k].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match=f"not writing checkpoint step 11 .*NaN.* {k}"):
        ckpt.write_checkpoint(run, 11, weights, {}, {"config": {}})
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 10
    assert not (run / "step-0000011").exists()


def _write_then_die(run: str, target: str) -> None:
    """In a child process: write checkpoint 11 of ``run`` and SIGKILL itself just before
    ``target`` is renamed into place (the moment a crash does the most harm)."""
    real = os.replace

    def dying(src, dst, *a, **kw):
        if Path(dst).name == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **kw)

    ck = read_run(Path(run))
    os.replace = dying
    ckpt.write_checkpoint(Path(run), 11, ck.model, ck.optimizer,
                          {k: v for k, v in ck.state.items() if k not in ("format", "step")})
    os._exit(3)  # not killed: the test fails


def _killed_while_writing(run: Path, target: str) -> None:
    """Run :func:`_write_then_die` in a process started by the fork server (never a fork
    of pytest, whose other threads may hold a lock at the fork that the child would then
    wait on forever) and check that it was killed."""
    p = mp.get_context("forkserver").Process(target=_write_then_die, args=(str(run), target))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("the writing child hung")
    assert p.exitcode == -signal.SIGKILL, p.exitcode


@pytest.mark.parametrize("target", ["model.safetensors", "state.json", "checkpoint.json"])
def test_sigkill_mid_checkpoint_keeps_the_previous_one_loadable(run10, tmp_path, target):
    run = _copy(run10, tmp_path)
    _killed_while_writing(run, target)
    assert list(run.rglob(".*.tmp")), "the child died mid-write"
    loaded = load_run(run)
    assert loaded.step == 10
    a = load_file(str(run10 / "step-0000010" / "model.safetensors"))
    assert all(torch.equal(a[k], v) for k, v in loaded.model.state_dict().items())
    # The next writer clears the debris and moves on.
    ck = read_run(run)
    ckpt.write_checkpoint(run, 11, ck.model, ck.optimizer,
                          {k: v for k, v in ck.state.items() if k not in ("format", "step")})
    assert read_run(run).step == 11
    assert not list(run.rglob(".*.tmp"))


# ---- one writer per run directory ----------------------------------------------------------
def test_a_second_writer_is_refused_and_named(tmp_path):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(ValueError, match=rf"in use: process {os.getpid()} on .*kill "
                                             rf"{os.getpid()}.*delete .*lock\.json"):
            RunLock(out).acquire()
        with pytest.raises(ValueError, match="in use"):
            train(config(), out, progress=False)
    assert not (out / ckpt.LOCK).exists()


def test_a_stale_lock_is_cleared(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid runs nothing now
    zombie = subprocess.Popen(["true"])  # exited, not reaped: a zombie
    time.sleep(0.3)
    try:
        for pid in (gone.pid, zombie.pid):
            (out / ckpt.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                     "since": "earlier"}))
            with RunLock(out):
                assert json.loads((out / ckpt.LOCK).read_text())["pid"] == os.getpid()
    finally:
        zombie.wait()
    # A lock of another host cannot be judged from here: refused, with the way out.
    (out / ckpt.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(ValueError, match="process 1 on elsewhere"):
        RunLock(out).acquire()


# ---- the launcher of qkv train --nproc 2 ---------------------------------------------------
def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QKV_NO_PROGRESS": "1",
           "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "qkv", "train", "reverse", "--out", str(out), *TINY_FLAGS,
            *extra]
    # As from a terminal: SIGINT at its default. A shell starts background jobs (and a CI
    # runner may start its steps) with SIGINT ignored, and a process that starts that way
    # rightly keeps ignoring it.
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(proc: subprocess.Popen, workers: list[int], timeout: float) -> str:
    """The launcher's output once it exits; its processes are killed afterwards whatever
    the outcome, so that a failing test leaves none behind."""
    try:
        text, _ = proc.communicate(timeout=timeout)
    finally:
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)
    return text


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _wait_for_training(proc: subprocess.Popen, out: Path, timeout: float = 240) -> list[int]:
    """The launched processes, once the run has written a checkpoint."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (out / "checkpoint.json").exists():
            return _children(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint existed: {proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_their_launcher(tmp_path, sig):
    """Before: the workers trained on (step 2240 -> 2500 in 15 s) after the launcher died."""
    out = tmp_path / "run"
    proc = _launch(out, "--nproc", "2", "--steps", "100000", "--checkpoint-every", "5")
    workers = _wait_for_training(proc, out)
    assert len(workers) >= 2, workers
    proc.send_signal(sig)
    proc.wait(timeout=30)
    end = time.monotonic() + 10
    while any(_running(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.1)
    alive = [w for w in workers if _running(w)]
    for w in alive:  # do not leave them behind, whatever the outcome
        os.kill(w, signal.SIGKILL)
    assert not alive, f"processes {alive} outlived their launcher"
    with RunLock(out):  # the dead launcher's lock is stale: a new writer may start
        pass
    load_run(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigint_to_the_launcher_alone_stops_the_run_like_ctrl_c(tmp_path):
    """Before: SIGINT to the launcher alone was ignored and the run went on; later, now and
    then, the processes lost it (handled during the step's all-reduce, then overwritten)."""
    out = tmp_path / "run"
    proc = _launch(out, "--nproc", "2", "--steps", "100000", "--checkpoint-every", "5")
    workers = _wait_for_training(proc, out)
    proc.send_signal(signal.SIGINT)
    text = _finish(proc, workers, 120)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "interrupted at step" in text, text
    step = load_run(out).step
    assert f"interrupted at step {step}:" in text
    assert not (out / ckpt.LOCK).exists()
    assert not any(_running(w) for w in workers)


def test_ctrl_c_while_qkv_starts_is_one_line_and_exit_130(tmp_path):
    """Before: a KeyboardInterrupt traceback from the imports; later, now and then, exit
    -2 after the one line, or a NumPy traceback (a Ctrl-C swallowed inside torch's import)."""
    proc = _launch(tmp_path / "run", "--steps", "5")
    time.sleep(1.0)  # importing torch, building the task: before training starts
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert "Traceback" not in text, text
    if proc.returncode == 130 and "interrupted at step" not in text:
        assert text == "qkv: interrupted\n", text
    else:  # a very fast machine reached the training loop: Ctrl-C saved a checkpoint
        assert proc.returncode in (0, 130), text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_at_the_terminal_while_the_processes_start(tmp_path):
    """Ctrl-C reaches the launcher's whole process group (as from a terminal) while its
    processes are still importing: none of them may die of it; the launcher records it and
    the run stops after its first step. Before: a KeyboardInterrupt traceback (from the
    launcher while it started them, or from a process still importing)."""
    out = tmp_path / "run"
    proc = _launch(out, "--nproc", "2", "--steps", "100000", "--checkpoint-every", "5")
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        starting = [p for p in _children(proc.pid) if b"spawn_main" in _cmdline(p)]
        if len(starting) == 2:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        text, _ = proc.communicate(timeout=120)
    finally:
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "died" not in text, text
    step = load_run(out).step
    assert f"interrupted at step {step}:" in text and step < 5, text
    assert not (out / ckpt.LOCK).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_sigint_to_the_launcher_stops_at_once(tmp_path):
    """The second Ctrl-C does not wait for the processes to agree: they are stopped, the
    lock is released, exit 130 without a traceback, the last checkpoint stays loadable."""
    out = tmp_path / "run"
    proc = _launch(out, "--nproc", "2", "--steps", "100000", "--checkpoint-every", "5")
    workers = _wait_for_training(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals sent at once would arrive as one
    proc.send_signal(signal.SIGINT)
    text = _finish(proc, workers, 60)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "interrupted" in text, text
    assert not (out / ckpt.LOCK).exists()
    end = time.monotonic() + 10
    while any(_running(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(_running(w) for w in workers)
    load_run(out)


def test_ctrl_c_inside_code_run_from_a_string_still_exits_130(tmp_path):
    """CPython marks a KeyboardInterrupt raised in exec'd code (dataclasses, namedtuple do
    that while modules import) as unhandled even once caught; under ``python -m`` the
    process then ended by SIGINT after the one line. Before: exit -2."""
    (tmp_path / "ctrl_c_probe.py").write_text(
        "import qkv.cli as cli\n"
        "def register():\n"
        "    exec('raise KeyboardInterrupt')  # as Ctrl-C inside a dataclass's __init__\n"
        "cli._register = register\n"
        "cli.main(['train', 'reverse'])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("QKV_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "ctrl_c_probe"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "qkv: interrupted\n", "")


def test_ctrl_c_is_held_until_the_body_ends_then_raised():
    from qkv.cli.interrupt import sigint_held

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = False
        with pytest.raises(KeyboardInterrupt), sigint_held():
            signal.raise_signal(signal.SIGINT)  # handled here, but not raised here
            done = True
        assert done
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored SIGINT stays ignored
        with sigint_held():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
