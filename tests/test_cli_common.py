"""What every ``qkv`` command shares: --version, --help without type noise on flags, and the
CPU thread rule (one thread unless --threads N; the caller's count given back)."""

from __future__ import annotations

import platform
import re

import pytest
import torch

import qkv
import qkv.decode
import qkv.models
from bert_model import model
from qkv.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and err == ""
    assert out == (f"qkv {qkv.__version__} (torch {torch.__version__}, Python "
                   f"{platform.python_version()})\n")


@pytest.mark.parametrize("command, flags", [
    ([], ["--version", "--help"]),
    (["demo"], ["--json", "--help"]),
    (["explain"], ["--words", "--tokens", "--hide-special", "--rollout", "--strict", "--json"]),
    (["train"], ["--resume", "--rotary", "--sinusoidal", "--quiet"]),
    (["translate"], ["--show-attention"]),
    (["summarize"], ["--show-attention"]),
])
def test_help_shows_flags_without_a_type(capsys, monkeypatch, command, flags):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "<bool>" not in out
    for flag in flags:
        line = next(x for x in out.splitlines() if re.search(rf"{flag}\b", x))
        assert "<" not in line.split(flag, 1)[1].split("  ")[0]  # no type right after it
    if command:  # options that take a value still say which
        assert re.search(r"--threads\s+<int>", out) or command == ["demo"]


def _record_threads(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records torch's thread count when called."""
    seen = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_explain_runs_on_one_thread_and_gives_the_callers_count_back(capsys, monkeypatch):
    model()  # loaded once per test process
    seen = _record_threads(monkeypatch, qkv.models, "load_pretrained")
    n = torch.get_num_threads()
    for args, want in (([], 1), (["--threads", "3"], 3)):
        code, _, err = run(capsys, "explain", "The cat sat.", "--json", *args)
        assert code == 0, err
        assert seen[-1] == want
        assert torch.get_num_threads() == n


def test_train_and_translate_thread_rule(capsys, monkeypatch, tmp_path):
    tiny = ["--steps", "2", "--batch-size", "4", "--d-model", "16", "--heads", "2",
            "--encoder-layers", "1", "--decoder-layers", "1", "--ff-dim", "16",
            "--eval-every", "2", "--eval-size", "2", "--checkpoint-every", "2", "--quiet"]
    import qkv.cli.launch

    n = torch.get_num_threads()
    trained = _record_threads(monkeypatch, qkv.cli.launch, "run_training")
    assert run(capsys, "train", "copy", "--out", tmp_path / "r", *tiny)[0] == 0
    assert trained == [1] and torch.get_num_threads() == n
    decoded = _record_threads(monkeypatch, qkv.decode, "translate")
    for args, want in (([], 1), (["--threads", "2"], 2)):
        code, _, err = run(capsys, "translate", tmp_path / "r", "abc", *args)
        assert code == 0, err
        assert decoded[-1] == want and torch.get_num_threads() == n


@pytest.mark.parametrize("command", [["explain", "The cat sat."], ["train", "copy"],
                                     ["translate", "runs/none", "abc"],
                                     ["summarize", "runs/none", "x.py"]])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_thread_count_is_one_line(capsys, command, value):
    code, out, err = run(capsys, *command, "--threads", value)
    assert code == 2 and out == ""
    assert err == f"qkv: error: --threads must be a whole number >= 1; got {value}\n"
