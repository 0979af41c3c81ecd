"""The command line's contract on bad input: one line on stderr (``qkv: error: ...``) and
exit code 2, never a traceback or a box; user text is printed as text, never as markup."""

from __future__ import annotations

import json
import math

import pytest

from qkv.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("qkv: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("args, says", [
    (["train"], "Missing argument 'task'. (see: qkv train --help)"),
    (["train", "reverse", "--steps", "x"], "Invalid value for '--steps'"),
    (["demo", "--nope"], "No such option: --nope (see: qkv demo --help)"),
    (["trian"], "No such command 'trian'"),
])
def test_usage_errors_are_one_line(capsys, args, says):
    """Before: typer's 5-6 line box."""
    code, out, err = run(capsys, *args)
    assert says in one_line_error(code, err)
    assert out == ""


def test_train_validates_before_it_announces(capsys, tmp_path):
    """Before: "training reverse in DIR" was printed, then the error."""
    code, out, err = run(capsys, "train", "reverse", "--out", tmp_path / "r", "--nproc", 0)
    assert "--nproc must be >= 1; got 0" in one_line_error(code, err)
    assert out == ""
    assert not (tmp_path / "r").exists()


def test_out_must_be_a_directory(capsys, tmp_path):
    """Before: a raw "[Errno 17] File exists"."""
    f = tmp_path / "hostname"
    f.write_text("x\n")
    for out in (f, f / "below"):
        code, _, err = run(capsys, "train", "reverse", "--out", out)
        assert f"--out {out} must be a run directory, but '{f}' is a file" in \
            one_line_error(code, err)


@pytest.mark.parametrize("args, says", [
    (["--seed", 2**70], "seed must be below 2**63"),
    (["--batch-size", 10**12], "--batch-size 1000000000000 does not fit"),
    (["--d-model", 2**20], "the model does not fit: --d-model 1048576"),
])
def test_sizes_that_cannot_work_are_refused_before_allocating(capsys, tmp_path, args, says):
    """Before: OverflowError and MemoryError tracebacks."""
    code, _, err = run(capsys, "train", "reverse", "--out", tmp_path / "r", *args)
    assert says in one_line_error(code, err)


def test_demo_refuses_sizes_that_cannot_fit(capsys):
    code, _, err = run(capsys, "demo", "--heads", 3000, "--head-dim", 3_000_000)
    assert "keep --heads x --head-dim below about" in one_line_error(code, err)
    code, _, err = run(capsys, "demo", "--words", "a b", "--seed", 2**70)
    assert "--seed must be in [0, 2**63)" in one_line_error(code, err)


def test_demo_prints_words_as_text_not_markup(capsys):
    """Before: rich.errors.MarkupError for "[/x]"."""
    code, out, err = run(capsys, "demo", "--words", "the [/x] cat [bold]b")
    assert code == 0, err
    assert "[/x]" in out and "[bold]b" in out


def test_demo_json_is_valid_json_with_nan_inputs(capsys):
    """Before: bare NaN in the output (invalid JSON)."""
    code, out, err = run(capsys, "demo", "--query", "nan,1,2", "--json")
    assert code == 0, err

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    data = json.loads(out, parse_constant=refuse)
    assert data["query"][0][0] is None and data["query"][0][1:] == [1.0, 2.0]
    assert data["weights"][0] == [None, None, None]
    code, out, _ = run(capsys, "demo", "--json")
    assert math.isclose(sum(json.loads(out)["weights"][0]), 1.0)


def test_explain_prints_words_as_text_not_markup(capsys):
    """Before: rich.errors.MarkupError for --word "[/x]"."""
    code, out, err = run(capsys, "explain", "a cat [/x] sat", "--word", "[/x]")
    assert code == 0, err
    assert "showing where [/x] looks" in out and "top keys of '[/x]'" in out


def test_ctrl_c_in_process_exits_130_and_gives_ctrl_c_back(capsys, monkeypatch):
    """main([...]) called from Python: Ctrl-C during a command is one line and SystemExit
    130, and the caller's SIGINT handler is back afterwards (the console script ignores
    further Ctrl-C until it exits; a caller that goes on must not lose Ctrl-C)."""
    import signal

    import qkv.cli as cli

    def interrupted_app(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_register", lambda: interrupted_app)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main(["demo"])
    assert e.value.code == 130
    assert capsys.readouterr().err == "qkv: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before
