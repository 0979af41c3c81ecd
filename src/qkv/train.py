"""Train a :class:`~qkv.models.seq2seq.Transformer` on a :mod:`qkv.tasks` task.

:func:`train` runs AdamW with a linear warm-up and a cosine decay, shows a rich progress bar
(step, loss, token accuracy, tokens/s, ETA), measures exact-match on the validation split
every ``eval_every`` steps with greedy decoding, and writes checkpoints
(:mod:`qkv.checkpoint`) every ``checkpoint_every`` steps, at the end, and on Ctrl-C.

Reproducibility: the batch of step ``s`` is drawn from ``(seed, s)`` alone
(:meth:`qkv.tasks.Task.batch`), and the checkpoint stores the states of the torch, Python
and NumPy generators (dropout draws from torch's). A run resumed from its checkpoint
therefore computes exactly what the uninterrupted run computes, step for step, on the same
device and thread count.

Loading a finished run and decoding with it is :mod:`qkv.decode`; the command line's
process launching (``qkv train`` on several processes) is :mod:`qkv.cli.launch`.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (
    Checkpoint,
    RunLock,
    check_run_dir,
    has_checkpoint,
    load_weights,
    optimizer_from_parts,
    optimizer_to_parts,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from .distributed.ddp import DataParallel
from .memory import check_fits
from .models.seq2seq import Transformer, TransformerConfig
from .progress import TrainingBar
from .tasks import BOS, EOS, PAD, CharTokenizer, Task, get_task, load_tokenizer

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "lr_at",
    "read_run",
    "resolve_device",
    "target_tokens",
    "train",
]

# The model fields a TrainConfig held itself before it held a TransformerConfig; a
# checkpoint written then stores them flat in its config (TrainConfig.from_dict reads both).
_FLAT_MODEL_FIELDS = ("d_model", "num_heads", "encoder_layers", "decoder_layers", "ff_dim",
                      "dropout", "positions")


def _default_model() -> TransformerConfig:
    """TransformerConfig's shape without dropout (training's default, and ``qkv train``'s);
    the vocabulary size comes from the task."""
    return TransformerConfig(vocab_size=None, dropout=0.0)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    ``model``: the Transformer's shape, a :class:`~qkv.models.seq2seq.TransformerConfig`
    whose ``vocab_size`` is left None (the task's tokenizer sets it); the default is
    TransformerConfig's shape (d_model 64, 4 heads, 2 + 2 layers, ff_dim 256, sinusoidal
    positions) with dropout 0. Optimisation: AdamW with peak ``lr``, linear warm-up over
    ``warmup`` steps, cosine decay to ``lr * min_lr_ratio`` at ``steps``, gradient norm
    clipped to ``clip``.
    """

    task: str
    task_options: dict = field(default_factory=dict)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    clip: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "cpu"
    model: TransformerConfig = field(default_factory=_default_model)
    eval_every: int = 250
    eval_size: int = 1000
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        ints = {"steps": 1, "batch_size": 1, "warmup": 0, "eval_every": 1, "eval_size": 1,
                "checkpoint_every": 1, "seed": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        if self.seed >= 2**63:  # torch's generators take 64-bit seeds
            raise ValueError(f"seed must be below 2**63; got {self.seed}")
        for name in ("lr", "weight_decay", "clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                math.isfinite(v) and v >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        for name in ("min_lr_ratio", "label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1]; got {v!r}")
        if not isinstance(self.model, TransformerConfig):
            raise TypeError(f"model must be a TransformerConfig; got "
                            f"{type(self.model).__name__}")
        ids = (self.model.pad_id, self.model.bos_id, self.model.eos_id)
        if ids != (PAD, BOS, EOS):
            raise ValueError(f"model pad/bos/eos ids must be the tasks' ids {(PAD, BOS, EOS)}; "
                             f"got {ids}; leave them at their defaults")

    def model_config(self, vocab_size: int) -> TransformerConfig:
        """:attr:`model` with the vocabulary size of the task's tokenizer."""
        if self.model.vocab_size not in (None, vocab_size):
            raise ValueError(f"model vocab_size is {self.model.vocab_size} but the task's "
                             f"vocabulary has {vocab_size} tokens; leave vocab_size=None")
        return replace(self.model, vocab_size=vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)  # the model as a nested dict

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Read :meth:`to_dict`'s form, or the flat form of older checkpoints (the model's
        fields beside the others, missing fields at their defaults of that time)."""
        known = {f.name for f in fields(cls)}
        if isinstance(d, dict) and "model" not in d:
            known |= set(_FLAT_MODEL_FIELDS)  # the flat form
        if not isinstance(d, dict) or not set(d) <= known or "task" not in d:
            extra = sorted(set(d) - known) if isinstance(d, dict) else d
            raise ValueError(f"not a training config of this qkv version (unknown keys {extra})")
        flat = {k: d[k] for k in _FLAT_MODEL_FIELDS if k in d}
        if "model" in d:
            model = TransformerConfig.from_dict(d["model"])
        else:
            model = replace(_default_model(), **flat)
        return cls(**{k: v for k, v in d.items() if k not in flat and k != "model"},
                   model=model)

    def differences(self, other: TrainConfig) -> list[tuple[str, object, object]]:
        """``(name, mine, other's)`` for every field that differs; a model field is named
        ``model.name``."""
        mine, theirs = _flat(self), _flat(other)
        return [(k, v, theirs[k]) for k, v in mine.items() if theirs[k] != v]


def _flat(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    model = d.pop("model")
    return {**d, **{f"model.{k}": v for k, v in model.items()}}


@dataclass
class TrainResult:
    """What :func:`train` did: the last step done, whether Ctrl-C stopped it, metrics."""

    run: Path
    step: int
    interrupted: bool
    valid_exact: float | None
    history: list[dict]
    seconds: float


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): warm-up, then cosine decay."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use "
                         "device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda or auto")
    return dev


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def target_tokens(tokenizer, batch: Sequence) -> int:
    """Target tokens (characters + EOS) of a batch of (source, target) examples: the
    denominator of the mean token loss."""
    return sum(len(tokenizer.encode(t)) + 1 for _, t in batch)


def build_model(cfg: TrainConfig, tok: CharTokenizer, device: torch.device) -> Transformer:
    """The (untrained) model of a run: ``cfg.model`` sized to ``tok``'s vocabulary."""
    return Transformer(cfg.model_config(tok.vocab_size)).to(device)


def _tensors(tok: CharTokenizer, batch, device) -> tuple[torch.Tensor, ...]:
    src = tok.batch([s for s, _ in batch]).to(device)  # (B, Ls)
    tgt_in = tok.batch([t for _, t in batch], bos=True).to(device)  # (B, Lt)
    tgt_out = tok.batch([t for _, t in batch], eos=True).to(device)  # (B, Lt)
    return src, tgt_in, tgt_out


@torch.no_grad()
def evaluate(model: Transformer, tok: CharTokenizer, examples, *, max_len: int,
             batch_size: int = 500, beam: int = 1) -> float:
    """Exact-match of greedy (or beam) decoding on ``examples`` [(source, target)]."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        src = tok.batch([s for s, _ in chunk]).to(device)  # (B, Ls)
        if beam == 1:
            out = model.greedy(src, max_len=max_len)  # (B, T)
        else:
            out = model.beam_search(src, beam=beam, max_len=max_len)[0]  # (B, T)
        right += sum(tok.decode(row.tolist()) == t for row, (_, t) in zip(out, chunk,
                                                                             strict=True))
    model.train(was_training)
    return right / len(examples)


class _Interrupt:
    """Turns the first Ctrl-C (SIGINT) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _state_problems(state: dict) -> list[str]:
    """The problems of a checkpoint's training config and tokenizer."""
    out = []
    try:
        TrainConfig.from_dict(state["config"])
    except (ValueError, TypeError) as e:
        out.append(f"config in state.json is not usable ({e})")
    try:
        load_tokenizer(state["tokenizer"])
    except (ValueError, TypeError) as e:
        out.append(f"tokenizer in state.json is not usable ({e})")
    return out


def read_run(run: Path | str) -> Checkpoint:
    """The latest checkpoint of a run directory, every part checked (config and tokenizer
    included); ValueError listing every problem."""
    return read_checkpoint(Path(run), check=_state_problems)


def train(cfg: TrainConfig | None, out: Path | str, *, resume: bool = False,
          progress: bool = True, console=None, log=None,
          on_start: Callable[[], None] | None = None, lock: bool = True) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in directory ``out``.

    A fresh run refuses a directory that already holds a checkpoint; a resumed run takes
    its config from the checkpoint (``cfg`` may be None, otherwise it must equal the saved
    one). ``progress`` shows a rich progress bar on ``console``; ``log`` (a callable
    taking one string) receives a line per validation; ``on_start()`` is called once every
    check has passed, just before the first step. Returns a :class:`TrainResult`.

    The writing process holds the run directory's lock (:class:`~qkv.checkpoint.RunLock`):
    a second writer is refused (``lock=False`` when a launcher holds it for its processes).
    A loss that becomes NaN or infinite stops the run with a ValueError; the last
    checkpoint written stays the latest (a checkpoint is never written with NaN weights).
    """
    out = Path(out)
    check_run_dir(out)
    writer = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                  and torch.distributed.get_rank() != 0)
    with RunLock(out) if lock and writer else contextlib.nullcontext():
        return _train(cfg, out, resume=resume, progress=progress, console=console, log=log,
                      on_start=on_start)


def _train(cfg: TrainConfig | None, out: Path, *, resume: bool, progress: bool, console, log,
           on_start) -> TrainResult:
    if resume:
        ck = read_run(out)
        saved = TrainConfig.from_dict(ck.state["config"])
        if cfg is not None and cfg != saved:
            diff = [f"{k}: checkpoint {v!r}, asked {a!r}" for k, v, a in saved.differences(cfg)]
            raise ValueError(f"cannot resume {out}: the config differs from its checkpoint ("
                             + "; ".join(diff) + ")")
        cfg = saved
    else:
        if cfg is None:
            raise ValueError("train needs a TrainConfig unless resume=True")
        if has_checkpoint(out):
            raise ValueError(f"{out} already holds a checkpoint; pass resume=True to continue "
                             "it, or another out= directory")
        ck = None

    device = resolve_device(cfg.device)
    par = DataParallel.current(device)  # None unless torch.distributed runs > 1 process
    if par is not None:
        device = par.device
    task: Task = get_task(cfg.task, **cfg.task_options)
    if ck is not None:
        tok = load_tokenizer(ck.state["tokenizer"])
        if tok != task.tokenizer():
            raise ValueError(f"cannot resume {out}: the task's vocabulary differs from the "
                             "checkpoint's (different qkv or Babel version?)")
    else:
        tok = task.tokenizer()
        _seed_all(cfg.seed)
    check_fits(cfg, tok.vocab_size, 2 * task.max_target_len + 2, device=device,
               world=1 if par is None else par.world)
    model = build_model(cfg, tok, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-9, foreach=True)
    history: list[dict] = []
    start = 0
    if ck is not None:
        load_weights(model, ck.model, ck.path)
        try:
            opt.load_state_dict(optimizer_from_parts(ck.optimizer, ck.state["optimizer"]))
            set_rng_state(ck.state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise ValueError(f"checkpoint {ck.path} is damaged: its optimizer or RNG state "
                             f"does not fit the model ({type(e).__name__}: {e}); resume from "
                             "an earlier copy of the run, or start a new one") from None
        history = list(ck.state.get("history", []))
        start = ck.step
    net = model  # what the training step calls: the model, or DDP around it
    if par is not None:
        par.check_start(cfg.to_dict(), start, cfg.batch_size)
        par.seed_dropout(cfg.seed, start)
        net = par.wrap(model)
    valid = task.validation(cfg.eval_size)
    max_len = task.max_target_len + 1

    def save(step: int) -> None:
        tensors, meta = optimizer_to_parts(opt.state_dict())
        write_checkpoint(out, step, model.state_dict(), tensors, {
            "config": cfg.to_dict(), "tokenizer": tok.to_dict(), "optimizer": meta,
            "rng": rng_state(device), "data": {"seed": cfg.seed, "next_step": step,
                                               **({} if par is None else
                                                  {"world_size": par.world})},
            "max_target_len": task.max_target_len,
            "history": history,
        })

    model.train()
    t0 = time.perf_counter()
    done, valid_exact, interrupted = start, None, False
    bar = TrainingBar(cfg, start, console) if progress and (par is None or par.is_main) else None
    tokens_seen, t_tok = 0, time.perf_counter()
    saved_at = start if ck is not None else None
    if on_start is not None:
        on_start()
    try:
        with _Interrupt() as stop:
            for step in range(start, cfg.steps):
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = task.batch(cfg.seed, step, cfg.batch_size)
                src, tgt_in, tgt_out = _tensors(tok, batch if par is None else par.part(batch),
                                                device)
                logits = net(src, tgt_in)  # (B, Lt, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       tgt_out.reshape(-1), ignore_index=PAD,
                                       label_smoothing=cfg.label_smoothing,
                                       reduction="mean" if par is None else "sum")
                if par is not None:  # DDP's average over ranks = the global batch's mean
                    loss = loss * par.loss_scale(target_tokens(tok, batch))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                real = tgt_out != PAD  # (B, Lt)
                right = ((logits.argmax(-1) == tgt_out) & real).sum().item()
                count = real.sum().item()
                tokens, loss_value = int(real.sum()) + int((src != PAD).sum()), loss.item()
                agreed_stop = False
                if par is not None:  # the global batch's numbers; every rank stops together
                    loss_value, right, count, tokens, asked = par.sum(
                        loss_value / par.world, right, count, tokens,
                        stop.requested or par.stop_requested())
                    # Decide from the sum alone (the same on every rank) and never clear the
                    # flag: a Ctrl-C handled during the sum must count in the next one.
                    agreed_stop = asked > 0
                if not math.isfinite(loss_value):  # every rank sees the same global loss
                    kept = (f"its last checkpoint (step {saved_at}) is kept" if saved_at
                            is not None else "no checkpoint was written")
                    raise ValueError(
                        f"the training loss became {loss_value} at step {step + 1}; the run "
                        f"stopped and {kept} in {out}; lower lr= (it is {cfg.lr:g}) and "
                        "resume, or start again")
                acc = right / count
                tokens_seen += int(tokens)
                rec = {"step": step + 1, "loss": loss_value, "acc": acc, "lr": lr}
                done = step + 1
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    if par is None:
                        valid_exact = evaluate(model, tok, valid, max_len=max_len)
                    else:
                        valid_exact = par.mean_over_ranks(
                            lambda ex: evaluate(model, tok, ex, max_len=max_len), valid)
                    rec["valid_exact"] = valid_exact
                    rec["seconds"] = time.perf_counter() - t0  # wall time of this process
                    if log is not None and (par is None or par.is_main):
                        log(f"step {done}/{cfg.steps}  loss {rec['loss']:.4f}  token acc "
                            f"{acc:.3f}  valid exact-match {valid_exact:.4f}  "
                            f"({time.perf_counter() - t0:.0f} s)")
                history.append(rec)
                if bar is not None:
                    now = time.perf_counter()
                    bar.update(done, rec, tokens_seen / max(now - t_tok, 1e-9), valid_exact)
                interrupted = stop.requested if par is None else agreed_stop
                if interrupted or done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    if par is None or par.is_main:
                        save(done)
                    saved_at = done
                    if par is not None:  # nobody reads or moves on before it is written
                        par.barrier()
                if interrupted:
                    break
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(run=out, step=done, interrupted=interrupted, valid_exact=valid_exact,
                       history=history, seconds=time.perf_counter() - t0)
