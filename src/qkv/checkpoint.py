"""Checkpoints of a training run: written atomically, read back exactly.

Layout of a run directory::

    RUN/checkpoint.json                  {"step": 500, "dir": "step-0000500"}: the latest
    RUN/step-0000500/model.safetensors   model parameters
    RUN/step-0000500/optimizer.safetensors   optimizer tensors (AdamW moments and steps)
    RUN/step-0000500/state.json          config, step, optimizer hyper-parameters, RNG
                                         states, data position, tokenizer, history

Every file is written to a temporary file in the same directory, flushed, fsynced and
renamed over its final name with ``os.replace`` (atomic on POSIX), then the directory is
fsynced so the rename itself is durable. ``checkpoint.json`` is written last, so it only
ever names a step directory whose three files are complete: a crash at any moment leaves
the previous checkpoint intact and loadable. The two newest step directories are kept.
Nothing is pickled: tensors go to safetensors, everything else to JSON.

Reading checks every part before anything is used (:func:`read_checkpoint`): the pointer
and the state agree on the step, every tensor is finite, the optimizer and RNG parts have
their form; one ValueError lists every problem. A writer holds ``RUN/lock.json`` (its pid,
host and start time, :class:`RunLock`) so that a second writer is refused; a lock whose
process is gone is stale and cleared.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["POINTER", "Checkpoint", "RunLock", "atomic_write", "check_run_dir",
           "find_checkpoint", "has_checkpoint", "load_weights", "optimizer_from_parts",
           "optimizer_to_parts", "read_checkpoint", "rng_state", "set_rng_state",
           "write_checkpoint"]

POINTER = "checkpoint.json"
FORMAT = "qkv.seq2seq-run/1"
KEEP = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; checkpoints are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class Checkpoint:
    """One checkpoint read back: tensors by name and the JSON state."""

    path: Path
    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    state: dict


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / POINTER).is_file()


def write_checkpoint(run: Path, step: int, model: dict[str, Tensor],
                     optimizer: dict[str, Tensor], state: dict) -> Path:
    """Write one checkpoint into ``run`` and make it the latest; returns its directory."""
    from safetensors.torch import save

    run = Path(run)
    bad = sorted(k for k, t in model.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"not writing checkpoint step {step} to {run}: the model holds NaN "
                         f"or infinite values in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}; the last checkpoint is kept")
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    step_dir = run / name
    step_dir.mkdir(exist_ok=True)
    for stray in [*step_dir.glob(".*.tmp"), *run.glob(f".{POINTER}.*.tmp")]:
        stray.unlink(missing_ok=True)  # left by a run killed while writing
    meta = {"format": FORMAT, "step": str(step)}
    atomic_write(step_dir / "model.safetensors", save(_contiguous(model), metadata=meta))
    atomic_write(step_dir / "optimizer.safetensors", save(_contiguous(optimizer), metadata=meta))
    atomic_write(step_dir / "state.json", _json_bytes({"format": FORMAT, "step": step, **state}))
    _fsync_dir(run)
    previous = _pointer(run)
    atomic_write(run / POINTER, _json_bytes({"format": FORMAT, "step": step, "dir": name}))
    keep = {name, previous.get("dir") if previous else None}
    for old in run.glob("step-*"):
        if old.is_dir() and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return step_dir


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _pointer(run: Path) -> dict | None:
    try:
        d = json.loads((run / POINTER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def find_checkpoint(run: Path) -> Path:
    """The directory of the latest checkpoint of ``run``; ValueError when there is none."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"run directory {str(run)!r} does not exist; train a run with "
                         f"out={str(run)!r} first")
    if not (run / POINTER).is_file():
        raise ValueError(f"{str(run)!r} has no checkpoint (no {POINTER}); train a run with "
                         f"out={str(run)!r} first")
    d = _pointer(run)
    if d is None or d.get("format") != FORMAT or not isinstance(d.get("dir"), str) \
            or "/" in d["dir"] or not isinstance(d.get("step"), int):
        raise ValueError(f"{run / POINTER} is not a qkv checkpoint pointer (expected format "
                         f"{FORMAT!r} with 'step' and 'dir')")
    path = run / d["dir"]
    if not path.is_dir():
        raise ValueError(f"{run / POINTER} names {d['dir']!r}, which does not exist")
    return path


def read_checkpoint(run: Path, *, check: Callable[[dict], list[str]] | None = None
                    ) -> Checkpoint:
    """Read the latest checkpoint of ``run``; ValueError naming what is missing or wrong.

    Every part is checked before it is returned, and one ValueError lists every problem:
    the step of ``state.json`` against the pointer's, NaN or infinite tensors, the form of
    the optimizer and RNG parts. ``check(state)`` adds the problems of the parts only its
    caller can judge (the training config, the tokenizer).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = find_checkpoint(run)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        model = load_file(str(path / "model.safetensors"))
        optimizer = load_file(str(path / "optimizer.safetensors"))
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint {path} is incomplete: {Path(e.filename).name} is "
                         "missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, RecursionError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: {e}") from None
    except OSError as e:
        raise ValueError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path / 'state.json'} is not a qkv training state (expected format "
                         f"{FORMAT!r})")
    problems = state_problems(state, _pointer(Path(run)) or {}, model, optimizer)
    if check is not None and not any(p.startswith(("config", "tokenizer")) for p in problems):
        problems += check(state)
    if problems:
        n = len(problems)
        raise ValueError(f"checkpoint {path} is damaged: {n} problem{'s' * (n > 1)}: "
                         + "; ".join(f"({i + 1}) {p}" for i, p in enumerate(problems))
                         + "; resume from an earlier copy of the run, or start a new one")
    return Checkpoint(path=path, step=state["step"], model=model, optimizer=optimizer,
                      state=state)


def state_problems(state: dict, pointer: dict, model: dict[str, Tensor],
                   optimizer: dict[str, Tensor]) -> list[str]:
    """Every reason the parts of one checkpoint cannot be trained on (empty when sound)."""
    out = []
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        out.append(f"state.json has no integer 'step' >= 0 (got {step!r})")
    elif pointer.get("step") is not None and pointer.get("step") != step:
        out.append(f"state.json says step {step} but {POINTER} says {pointer.get('step')}")
    for name in ("config", "tokenizer", "optimizer", "rng"):
        if not isinstance(state.get(name), dict):
            got = "missing" if name not in state else type(state[name]).__name__
            out.append(f"{name} in state.json must be a JSON object (got {got})")
    opt = state.get("optimizer")
    if isinstance(opt, dict):
        groups = opt.get("param_groups")
        if not isinstance(groups, list) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            out.append("optimizer in state.json lacks its 'param_groups' (a list of objects "
                       "with 'params')")
        if not isinstance(opt.get("scalars", {}), dict):
            out.append("optimizer 'scalars' in state.json must be a JSON object")
    odd = [k for k in optimizer if len(k.split(".", 2)) != 3 or k.split(".")[0] != "state"
           or not k.split(".")[1].isdigit()]
    if odd:
        out.append(f"optimizer.safetensors has tensors not named state.N.NAME: {odd[:3]}")
    rng = state.get("rng")
    if isinstance(rng, dict):
        out += _rng_problems(rng)
    for where, tensors in (("model.safetensors", model), ("optimizer.safetensors", optimizer)):
        bad = [k for k, t in tensors.items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            out.append(f"{where} holds NaN or infinite values in {len(bad)} tensor"
                       f"{'s' * (len(bad) > 1)} ({', '.join(sorted(bad)[:3])}"
                       f"{', ...' if len(bad) > 3 else ''})")
    history = state.get("history", [])
    if not isinstance(history, list):
        out.append(f"history in state.json must be a list (got {type(history).__name__})")
    return out


def _rng_problems(rng: dict) -> list[str]:
    out = []
    try:
        n = len(base64.b64decode(rng["torch"], validate=True))
        if n != torch.get_rng_state().numel():
            out.append(f"rng 'torch' holds {n} bytes; torch's generator state has "
                       f"{torch.get_rng_state().numel()}")
    except (KeyError, TypeError, ValueError):
        out.append("rng 'torch' must be the base64 text of torch's generator state")
    py = rng.get("python")
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)):
        out.append("rng 'python' must be Python's random.getstate() as a list")
    n = rng.get("numpy")
    if not (isinstance(n, list) and len(n) == 5 and isinstance(n[1], list)
            and len(n[1]) == 624):
        out.append("rng 'numpy' must be NumPy's get_state() as a list of 5 parts")
    return out


# ---- who writes a run ----------------------------------------------------------------------
LOCK = "lock.json"


def check_run_dir(run: Path, name: str = "out") -> None:
    """ValueError unless ``run`` is a directory or can become one (a file, or a path below
    a file, cannot)."""
    run = Path(run)
    for p in (run, *run.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "a file" if p.is_file() else "not a directory"
                raise ValueError(f"{name}={str(run)!r} must be a run directory, but {str(p)!r} "
                                 f"is {what}; choose another {name}= directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{name}={str(run)!r} is not writable ({str(p)!r}: permission "
                                 f"denied); choose another {name}= directory")
            return


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else fields[19]  # zombies count as gone


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        return now is not None and (started is None or now == started)
    return True


class RunLock:
    """``RUN/lock.json`` while a process writes a run: a second writer is refused.

    The file names its owner (pid, host, start time). It is created atomically (written
    aside, then hard-linked into place, which fails when the file exists), removed when the
    owner is done, and found stale (then replaced) when its process no longer runs on this
    host, as after a SIGKILL.
    """

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self.path = self.run / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        check_run_dir(self.run)
        self.run.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        fd, tmp = tempfile.mkstemp(prefix=".lock.", suffix=".tmp", dir=self.run)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_json_bytes(me))
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    owner = self._owner()
                    if owner is not None and not self._stale(owner):
                        raise ValueError(
                            f"{self.run} is in use: process {owner.get('pid')} on "
                            f"{owner.get('host')} has been writing it since "
                            f"{owner.get('since')}; wait for it to finish or stop it (kill "
                            f"{owner.get('pid')}). If no such process runs, delete "
                            f"{self.path}") from None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale or unreadable: its writer is gone
            raise ValueError(f"cannot take the lock {self.path}: another process keeps "
                             "replacing it; stop the other writers of this run")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _owner(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}  # gone meanwhile: not stale, not held; the next link decides
        except (OSError, ValueError):
            return None  # unreadable: written by no RunLock (links are whole)
        return d if isinstance(d, dict) else None

    @staticmethod
    def _stale(owner: dict) -> bool:
        if not owner:
            return True
        pid = owner.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            return True
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell from here
        return not _alive(pid, owner.get("started"))

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def optimizer_to_parts(sd: dict) -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"state.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_parts(tensors: dict[str, Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_to_parts`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(device: torch.device) -> dict:
    """The states of every random generator training uses, as JSON."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    out = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if device.type == "cuda":
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii")
                       for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    def as_tensor(b64: str) -> Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(as_tensor(state["torch"]))
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(s) for s in state["cuda"]])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_weights(model: torch.nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """Load a checkpoint's ``weights`` into ``model``; ValueError naming the missing,
    unexpected and misshapen tensors when they do not fit (``path`` names the checkpoint)."""
    want = model.state_dict()
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    bad = [f"{k}: checkpoint {tuple(weights[k].shape)}, config {tuple(want[k].shape)}"
           for k in sorted(set(want) & set(weights)) if weights[k].shape != want[k].shape]
    if missing or extra or bad:
        parts = ([f"missing {missing[:3]}"] if missing else []) + \
            ([f"unexpected {extra[:3]}"] if extra else []) + bad[:3]
        raise ValueError(f"checkpoint {path} is incompatible with its config: "
                         + "; ".join(parts))
    model.load_state_dict(weights)
