"""Only the command line knows its flags: library errors name arguments (``word=``,
``strict=True``, ``out=``), and ``qkv`` shows them as ``--word``, ``--strict``, ``--out``."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.attention_map import AttentionMap
from qkv.checkpoint import find_checkpoint
from qkv.cli import main
from qkv.cli.flags import FLAGS, to_flags
from qkv.train import resolve_device


def run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code or 0, capsys.readouterr().err


@pytest.mark.parametrize("message, shown", [
    ("word='!!' has no letters", "--word '!!' has no letters"),
    ("shorten it (or drop strict=True to truncate it)", "shorten it (or drop --strict to "
                                                         "truncate it)"),
    ("CUDA is not available; use device='cpu'", "CUDA is not available; use --device cpu"),
    ("pass resume=True to continue it, or another out= directory",
     "pass --resume to continue it, or another --out directory"),
    ("train a run with out='my runs/x' first", "train a run with --out 'my runs/x' first"),
    ("nproc=3 on cuda", "--nproc 3 on cuda"),
    ("use a larger batch_size=", "use a larger --batch-size"),
])
def test_to_flags_rewrites_argument_names(message, shown):
    assert to_flags(message) == shown


def test_to_flags_leaves_other_text_alone():
    for text in ("layout=3 stdout=1", "the word 'x' is not in the text", "heads=4",
                 "a qkv.train config", ""):
        assert to_flags(text) == text
    assert set(FLAGS.values()) == {"--" + k.replace("_", "-") for k in FLAGS}


def test_library_errors_name_arguments_not_flags(tmp_path):
    amap = AttentionMap(tokens=["a", "b"], weights=np.full((1, 1, 2, 2), 0.5))
    with pytest.raises(ValueError, match=r"^word='!!' has no letters") as e:
        amap.find("!!")
    with pytest.raises(ValueError, match=r"out='.*missing' first") as f:
        find_checkpoint(tmp_path / "missing")
    for err in (e, f):
        assert "--" not in str(err.value)


def test_cli_errors_name_flags(tmp_path, capsys):
    code, err = run(capsys, "translate", tmp_path / "missing", "abc")
    assert code == 2 and f"train a run with --out {tmp_path / 'missing'} first" in err
    assert err.count("\n") == 1


def test_device_error_names_the_argument_then_the_flag(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is about a machine without CUDA")
    with pytest.raises(ValueError, match=r"use device='cpu'$"):
        resolve_device("cuda")
    code, err = run(capsys, "train", "reverse", "--out", tmp_path / "r", "--device", "cuda",
                    "--quiet")
    assert code == 2 and err.strip().endswith("use --device cpu"), err
