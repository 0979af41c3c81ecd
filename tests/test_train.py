"""Training: schedule, atomic checkpoints, save -> load, exact resume after SIGKILL, Ctrl-C."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkv import checkpoint as ckpt
from qkv.decode import load_run
from qkv.models.seq2seq import TransformerConfig
from qkv.train import TrainConfig, evaluate, lr_at, train

from helpers import one_thread

TINY = {"d_model": 32, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 64}
REPO = Path(__file__).resolve().parents[1]



def model(**kw) -> TransformerConfig:
    return TransformerConfig(**{"vocab_size": None, **TINY, **kw})


def config(**kw) -> TrainConfig:
    """The test run's config; model fields (d_model, dropout, ...) go into ``model``."""
    shape = {k: kw.pop(k) for k in list(kw) if k in TransformerConfig.__dataclass_fields__}
    base = {"task": "reverse", "task_options": {"min_len": 3, "max_len": 7}, "steps": 40,
            "batch_size": 32, "lr": 3e-3, "warmup": 5, "eval_every": 20, "eval_size": 50,
            "checkpoint_every": 10, "model": model(**{"dropout": 0.1, **shape})}
    return TrainConfig(**{**base, **kw})


def test_learning_rate_schedule():
    cfg = config(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 55) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(cfg, 100) == pytest.approx(1e-4)
    lrs = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        config(steps=0)
    with pytest.raises(ValueError, match="not divisible"):
        config(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(None, tmp_path, resume=True)
    with pytest.raises(ValueError, match="unknown task"):
        train(config(task="nope"), tmp_path / "x")


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    ckpt.atomic_write(target, b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("run") / "reverse"
    with one_thread():
        result = train(config(), out, progress=False)
    return out, result


def test_checkpoint_layout_and_contents(short_run):
    out, result = short_run
    assert result.step == 40 and not result.interrupted
    pointer = json.loads((out / "checkpoint.json").read_text())
    assert pointer["step"] == 40 and pointer["dir"] == "step-0000040"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "step-0000030",
                                                     "step-0000040"]
    state = json.loads((out / "step-0000040" / "state.json").read_text())
    assert state["step"] == 40 and state["config"]["task"] == "reverse"
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    assert state["data"] == {"seed": 0, "next_step": 40}
    assert [h["step"] for h in state["history"]] == list(range(1, 41))
    opt = load_file(str(out / "step-0000040" / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in opt)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.pt"))


def test_save_load_gives_identical_outputs(short_run, tmp_path):
    out, _ = short_run
    a, b = load_run(out), load_run(out)
    src = a.tokenizer.batch(["abc", "gfedcba", "zz"])
    tgt = a.tokenizer.batch(["cba", "abcdefg", "zz"], bos=True)
    with torch.no_grad():
        assert torch.equal(a.model(src, tgt), b.model(src, tgt))
    assert torch.equal(a.model.greedy(src, max_len=8), b.model.greedy(src, max_len=8))
    # the loaded model is the trained one: its parameters equal the saved tensors
    saved = load_file(str(out / "step-0000040" / "model.safetensors"))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, saved[k])
    # an incompatible checkpoint: weights that do not fit the config in state.json
    bad = tmp_path / "bad"
    state = json.loads((out / "step-0000040" / "state.json").read_text())
    state.pop("format"), state.pop("step")
    state["config"]["model"]["d_model"] = 64
    weights = dict(saved)
    ckpt.write_checkpoint(bad, 40, weights, {}, state)
    with pytest.raises(ValueError, match=r"incompatible with its config: .*"
                                         r"checkpoint \(32,\), config \(64,\)"):
        load_run(bad)


def test_resume_with_a_different_config_is_refused(short_run):
    out, _ = short_run
    with pytest.raises(ValueError, match=r"config differs from its checkpoint.*lr"):
        train(config(lr=1e-2), out, resume=True)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(config(), out)


def _subprocess_train(out: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QKV_NO_PROGRESS": "1",
           "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "qkv", "train", "reverse", "--out", str(out),
            "--steps", str(steps), "--batch-size", "32", "--lr", "3e-3", "--warmup", "5",
            "--d-model", "32", "--heads", "2", "--encoder-layers", "1", "--decoder-layers",
            "1", "--ff-dim", "64", "--dropout", "0.1", "--eval-every", "100",
            "--eval-size", "50", "--checkpoint-every", "10", "--quiet", "--threads", "1"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (out / "checkpoint.json").exists():
            return json.loads((out / "checkpoint.json").read_text())["step"]
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint existed: {proc.stdout.read()}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def _cli_config(steps: int) -> TrainConfig:
    return TrainConfig(task="reverse", steps=steps, batch_size=32, lr=3e-3, warmup=5,
                       eval_every=100, eval_size=50, checkpoint_every=10,
                       model=model(dropout=0.1))


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Kill -9 a training process once it has checkpointed, resume it: the parameters at
    the end are bit-identical to those of a run that was never interrupted."""
    steps = 200
    killed = tmp_path / "killed"
    proc = _subprocess_train(killed, steps)
    at = _wait_for_checkpoint(proc, killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at = json.loads((killed / "checkpoint.json").read_text())["step"]
    assert 10 <= at < steps, "the run must be killed mid-training"
    with one_thread():
        load_run(killed)  # the checkpoint left behind is complete and loadable
        resumed = train(None, killed, resume=True, progress=False)
        straight = train(_cli_config(steps), tmp_path / "straight", progress=False)
    assert resumed.step == straight.step == steps
    a = load_file(str(killed / f"step-{steps:07d}" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / f"step-{steps:07d}" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same loss curve, step for step
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "int"
    proc = _subprocess_train(out, 100_000)
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    assert "interrupted at step" in text and "--resume" in text
    run = load_run(out)
    assert 10 <= run.step < 100_000
    assert json.loads((out / "checkpoint.json").read_text())["step"] == run.step


def test_evaluate_exact_match(short_run):
    out, _ = short_run
    run = load_run(out)
    with one_thread():
        outs = run.model.greedy(run.tokenizer.batch(["abc", "xyz"]), max_len=8)
    decoded = [run.tokenizer.decode(r.tolist()) for r in outs]
    examples = [("abc", decoded[0]), ("xyz", decoded[1] + "!")]
    assert evaluate(run.model, run.tokenizer, examples, max_len=8) == 0.5


# ---- the config: a TransformerConfig inside, and checkpoints of the flat form before it ----
FLAT = ("d_model", "num_heads", "encoder_layers", "decoder_layers", "ff_dim", "dropout",
        "positions")


def _flat_form(d: dict) -> dict:
    """A config as checkpoints stored it when TrainConfig copied the model's fields."""
    model = d.pop("model")
    return {**d, **{k: model[k] for k in FLAT}}


def test_config_holds_a_transformer_config():
    cfg = TrainConfig(task="reverse")
    # the defaults of `qkv train` (and of TrainConfig before it held a TransformerConfig)
    assert cfg.model == TransformerConfig(vocab_size=None, d_model=64, num_heads=4,
                                          encoder_layers=2, decoder_layers=2, ff_dim=256,
                                          dropout=0.0, positions="sinusoidal")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["model"]["d_model"] == 64
    assert cfg.model_config(11).vocab_size == 11
    with pytest.raises(ValueError, match="vocab_size is 12 but the task's vocabulary has 11"):
        config(vocab_size=12).model_config(11)
    with pytest.raises(ValueError, match="pad/bos/eos ids must be the tasks' ids"):
        config(pad_id=3, bos_id=4, eos_id=5)
    with pytest.raises(TypeError, match="model must be a TransformerConfig; got dict"):
        TrainConfig(task="reverse", model={"d_model": 32})
    with pytest.raises(ValueError, match="needs the size of its vocabulary"):
        from qkv.models.seq2seq import Transformer

        Transformer(TransformerConfig(vocab_size=None))


def test_config_reads_the_flat_form_of_older_checkpoints():
    cfg = config(d_model=48, num_heads=3, positions="rotary")
    flat = _flat_form(cfg.to_dict())
    assert "model" not in flat and flat["d_model"] == 48
    assert TrainConfig.from_dict(flat) == cfg
    # a field the flat form left out took TrainConfig's default of that time (dropout 0)
    del flat["dropout"]
    assert TrainConfig.from_dict(flat).model.dropout == 0.0
    with pytest.raises(ValueError, match=r"unknown keys \['d_model'\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "d_model": 48})  # both forms at once
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        TrainConfig.from_dict({**flat, "colour": 1})


def test_checkpoint_with_the_flat_config_loads_and_resumes(short_run, tmp_path):
    out, _ = short_run
    old = tmp_path / "old"
    ck = ckpt.read_checkpoint(out)
    state = {k: v for k, v in ck.state.items() if k not in ("format", "step")}
    state["config"] = _flat_form(dict(state["config"]))
    ckpt.write_checkpoint(old, ck.step, ck.model, ck.optimizer, state)
    assert "model" not in json.loads((old / f"step-{ck.step:07d}" / "state.json")
                                     .read_text())["config"]
    a, b = load_run(out), load_run(old)
    assert a.config == b.config and a.step == b.step
    src = a.tokenizer.batch(["abc", "gfedcba"])
    assert torch.equal(a.model.greedy(src, max_len=8), b.model.greedy(src, max_len=8))
    with one_thread():  # resuming reads the flat config; the run is finished: no step left
        resumed = train(None, old, resume=True, progress=False)
    assert resumed.step == 40  # the run was finished; nothing left to do, no error
    with pytest.raises(ValueError, match=r"config differs from its checkpoint.*"
                                         r"model\.d_model: checkpoint 32, asked 64"):
        train(config(d_model=64), old, resume=True)
