"""`qkv train` and `qkv translate` on the command line: outputs, alignment views, and the
one-line errors (exit code 2) for every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qkv.cli import main
from qkv.decode import load_run, translate

from helpers import one_thread

TRAIN = ["--steps", "60", "--batch-size", "32", "--lr", "3e-3", "--warmup", "5",
         "--d-model", "32", "--heads", "2", "--encoder-layers", "1", "--decoder-layers", "1",
         "--ff-dim", "64", "--eval-every", "30", "--eval-size", "30",
         "--checkpoint-every", "30", "--quiet"]



def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e, one_thread():
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "rev"
    with pytest.raises(SystemExit) as e, one_thread():
        main(["train", "reverse", "--out", str(out), *TRAIN])
    assert e.value.code in (0, None)
    return out


def test_train_writes_a_run(run_dir):
    r = load_run(run_dir)
    assert r.step == 60 and r.config.task == "reverse" and r.config.model.d_model == 32


def test_translate_prints_the_output(run_dir, capsys):
    code, out, err = run(capsys, "translate", run_dir, "abcde")
    assert code == 0, err
    r = load_run(run_dir)
    want = r.model.greedy(r.tokenizer.batch(["abcde"]), max_len=13)
    assert out.strip() == r.tokenizer.decode(want[0].tolist())
    code, out_beam, _ = run(capsys, "translate", run_dir, "abcde", "--beam", "3")
    best, _ = r.model.beam_search(r.tokenizer.batch(["abcde"]), beam=3, max_len=13)
    assert code == 0 and out_beam == r.tokenizer.decode(best[0].tolist()) + "\n"


def test_show_attention_and_files(run_dir, capsys, tmp_path):
    code, out, err = run(capsys, "translate", run_dir, "abcdefg", "--show-attention")
    assert code == 0, err
    assert "cross-attention, decoder layer 0, head 0" in out
    assert "head 1" in out
    for name in ("align.png", "align.svg", "align.html"):
        code, _, err = run(capsys, "translate", run_dir, "abcdefg", "-o", tmp_path / name)
        assert code == 0, err
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "align.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "align.html").read_text()
    assert "<script" in page and "http://" not in page.split("Content-Security-Policy")[0]


def test_translate_warns_when_the_text_is_outside_the_task(run_dir, capsys):
    code, out, err = run(capsys, "translate", run_dir, "abcde")
    assert code == 0 and out.endswith("\n") and err == ""
    # 16 characters: reverse sources have 1 to 12; still answered, after a one-line warning
    code, out, err = run(capsys, "translate", run_dir, "abcdefghijklmnop")
    assert code == 0 and out.endswith("\n")  # the answer (this small model's may be empty)
    assert err == ("qkv: warning: 'abcdefghijklmnop' is outside what task 'reverse' was "
                   "trained on: it has 16 characters; sources have 1 to 12; the output is a "
                   "guess\n")


def test_translate_warns_on_text_that_is_not_a_date(tmp_path, capsys):
    out_dir = tmp_path / "dates"
    tiny = ["--steps", "1", "--batch-size", "4", "--d-model", "16", "--heads", "2",
            "--encoder-layers", "1", "--decoder-layers", "1", "--ff-dim", "16",
            "--eval-every", "1", "--eval-size", "2", "--checkpoint-every", "1", "--quiet"]
    assert run(capsys, "train", "dates", "--out", out_dir, *tiny)[0] == 0
    code, out, err = run(capsys, "translate", out_dir, "hello world")
    assert code == 0 and out.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qkv: warning: 'hello world' is outside what task 'dates' was trained on: it is not "
        "written like any date of the task")
    assert lines[0].endswith("; the output is a guess")
    for date in ("28 novembre 2026", "Nov 28, 2026", "2026年11月28日"):
        code, _, err = run(capsys, "translate", out_dir, date)
        assert code == 0 and err == "", (date, err)


def test_library_translate_warns_with_its_own_category(run_dir):
    from qkv.tasks import OutsideTaskWarning

    with pytest.warns(OutsideTaskWarning, match="it has 13 characters; sources have 1 to 12"):
        t = translate(load_run(run_dir), "abcdefghijklm")
    assert t.text == "abcdefghijklm" and t.attention.num_layers == 1


@pytest.mark.parametrize("args, message", [
    (["train", "nope"], "unknown task 'nope'"),
    (["translate", "{empty}", "abc"], "has no checkpoint"),
    (["translate", "{missing}", "abc"], "does not exist"),
    (["translate", "{run}", "abcXYZ"], "outside the vocabulary of this model: 'X' (U+0058)"),
    (["translate", "{run}", ""], "the input text is empty"),
    (["translate", "{run}", "abc", "-o", "{tmp}/a.jpg"], "expected a .png, .svg or .html"),
    (["translate", "{run}", "abc", "--beam", "0"], "--beam must be >= 1"),
    (["translate", "{run}", "abc", "--show-attention", "--layer", "3"], "layer 3 is out of"),
    (["translate", "{incompatible}", "abc"], "incompatible with its config"),
    (["train", "reverse", "--out", "{run}"], "already holds a checkpoint"),
    (["train", "reverse", "--out", "{run}", "--resume", "--d-model", "64"],
     "--d-model 64 (checkpoint: 32)"),
    (["train", "reverse", "--out", "{run}", "--resume", "--heads", "4", "--rotary"],
     "--heads 4 (checkpoint: 2), --rotary (checkpoint: sinusoidal)"),
    (["train", "copy", "--out", "{run}", "--resume"], "it trains task 'reverse'"),
    (["train", "reverse", "--out", "{tmp}/new", "--steps", "0"], "steps must be an int >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    incompatible = tmp_path / "incompatible"
    shutil.copytree(run_dir, incompatible)
    state_file = next(incompatible.glob("step-0000060")) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["ff_dim"] = 128  # the saved weights have 64
    state_file.write_text(json.dumps(state))
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "run": run_dir,
             "tmp": tmp_path, "incompatible": incompatible}
    code, _, err = run(capsys, *[a.format(**paths) for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkv: error: "), err
    assert message in lines[0]
