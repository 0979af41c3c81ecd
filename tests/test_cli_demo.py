"""`qkv demo`: the textbook numbers, JSON output, the multi-head example and error exits."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qkv.cli import main

Q = np.array([0.2, 0.1, 0.3])
K = np.array([[0.1, 0.2, 0.3], [0.2, 0.3, 0.1], [0.3, 0.1, 0.2]])
V = np.eye(3)


def textbook():
    scores = Q @ K.T
    scaled = scores / np.sqrt(3)
    weights = np.exp(scaled) / np.exp(scaled).sum()
    return scores, scaled, weights, weights @ V


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_demo_json_matches_textbook(capsys):
    code, out, _ = run(capsys, "demo", "--json")
    assert code == 0
    data = json.loads(out)
    scores, scaled, weights, output = textbook()
    assert np.allclose(data["scores"][0], scores, atol=1e-15)
    assert np.allclose(data["scaled"][0], scaled, atol=1e-15)
    assert np.allclose(data["weights"][0], weights, atol=1e-15)
    assert np.allclose(data["output"][0], output, atol=1e-15)
    assert data["scale"] == pytest.approx(1 / np.sqrt(3))


def test_demo_table_prints_textbook_numbers(capsys):
    code, out, _ = run(capsys, "demo")
    assert code == 0
    for arr in textbook():
        for x in np.atleast_1d(arr).ravel():
            assert f"{x:.4f}" in out
    assert "softmax" in out


def test_demo_multi_head(capsys):
    code, out, _ = run(capsys, "demo", "--heads", "2", "--words", "the cat sat", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["words"] == ["the", "cat", "sat"] and len(data["per_head"]) == 2
    for h in data["per_head"]:
        w = np.array(h["weights"])
        assert w.shape == (3, 3) and np.allclose(w.sum(1), 1)
        scaled = np.array(h["scaled"])
        assert np.allclose(w, np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True))
    again = json.loads(run(capsys, "demo", "--heads", "2", "--words", "the cat sat",
                           "--json")[1])
    assert again == data  # seeded
    code, text, _ = run(capsys, "demo", "--heads", "2", "--words", "the cat sat")
    assert code == 0 and "head 1" in text and "cat" in text
    assert "2 heads of 4 dims" in " ".join(text.split())


def test_demo_counts_in_the_singular(capsys):
    code, text, _ = run(capsys, "demo", "--heads", "1", "--head-dim", "1", "--words", "a b")
    assert code == 0
    assert "1 head of 1 dim," in " ".join(text.split())
    assert "1 heads" not in text and "1 dims" not in text


def test_demo_keeps_the_callers_random_state(capsys):
    import torch

    before = torch.get_rng_state()
    assert run(capsys, "demo", "--heads", "2", "--seed", "7", "--json")[0] == 0
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("args,msg", [
    (["--keys", "1,2"], "head dim 2 but q has 3"),
    (["--heads", "0"], ">= 1"),
    (["--words", "   "], "at least one word"),
    (["--values", "1,x"], "numbers"),
    (["--keys", "1,2,3; 4,5"], "equal length"),
])
def test_demo_bad_input_exits_2_with_one_line(capsys, args, msg):
    code, _, err = run(capsys, "demo", *args)
    assert code == 2
    assert err.startswith("qkv: error:") and msg in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "qkv", "demo", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "single-head"
    bad = subprocess.run([sys.executable, "-m", "qkv", "demo", "--nope"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
