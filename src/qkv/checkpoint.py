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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["POINTER", "Checkpoint", "atomic_write", "find_checkpoint", "has_checkpoint",
           "load_weights", "optimizer_from_parts", "optimizer_to_parts", "read_checkpoint",
           "rng_state", "set_rng_state", "write_checkpoint"]

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
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    step_dir = run / name
    step_dir.mkdir(exist_ok=True)
    for stray in step_dir.glob(".*.tmp"):  # left by a run killed while writing
        stray.unlink()
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


def read_checkpoint(run: Path) -> Checkpoint:
    """Read the latest checkpoint of ``run``; ValueError naming what is missing or wrong."""
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
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path / 'state.json'} is not a qkv training state (expected format "
                         f"{FORMAT!r})")
    step = state.get("step")
    if not isinstance(step, int):
        raise ValueError(f"{path / 'state.json'} has no integer 'step'")
    return Checkpoint(path=path, step=step, model=model, optimizer=optimizer, state=state)


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
    import base64
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
    import base64
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
