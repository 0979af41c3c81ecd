"""``qkv train TASK`` and ``qkv translate RUN_DIR TEXT``: train a seq2seq Transformer, use it.

``train`` writes checkpoints into ``--out`` (default ``runs/TASK``) and continues one with
``--resume``; Ctrl-C saves a checkpoint and stops (exit code 130). ``translate`` decodes a
text with the latest checkpoint of a run and can show the cross-attention alignment in the
terminal (``--show-attention``) or write it as PNG/SVG or self-contained HTML (``-o``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .map_files import HeadOption, LayerOption, check_map_file, save_map_file
from .threads import threads_option, uses_threads

# Defaults of the model/optimiser options; None in the signatures means "not given", so
# --resume can tell an explicit option (which must match the checkpoint) from a default.
_DEFAULTS = {
    "steps": 3000, "batch_size": 64, "lr": 2e-3, "seed": 0, "device": "cpu",
    "d_model": 64, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ff_dim": 256,
    "dropout": 0.0, "positions": "sinusoidal", "warmup": 100, "eval_every": 250,
    "eval_size": 1000, "checkpoint_every": 250,
}
# The options that shape the model (TrainConfig.model, a TransformerConfig).
_MODEL = ("d_model", "num_heads", "encoder_layers", "decoder_layers", "ff_dim", "dropout",
          "positions")


def _config(task: str, options: dict):
    """The TrainConfig of ``options`` (field name -> value), the model's in ``model``."""
    from ..models.seq2seq import TransformerConfig
    from ..tasks import TASKS
    from ..train import TrainConfig

    model = TransformerConfig(vocab_size=None, **{k: options[k] for k in _MODEL})
    return TrainConfig(task=task, model=model, task_options=dict(TASKS[task].default_options),
                       **{k: v for k, v in options.items() if k not in _MODEL})


def _saved(cfg, name: str):
    """The value of option ``name`` in a TrainConfig."""
    return getattr(cfg.model if name in _MODEL else cfg, name)


def _as_flag(name: str, value) -> str:
    """Option ``name`` set to ``value`` as it is written on the command line."""
    if name == "positions":
        return f"--{value}"  # --rotary / --sinusoidal
    return f"{'--heads' if name == 'num_heads' else '--' + name.replace('_', '-')} {value}"


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text, show_default=False)


@app.command("train")
@uses_threads
def train_command(
    task: Annotated[str, typer.Argument(
        help="The task: dates, reverse, sort, copy or summarize.")],
    steps: Annotated[int | None, _opt("Optimizer steps (default: 3000).")] = None,
    batch_size: Annotated[int | None, _opt("Examples per step (default: 64).")] = None,
    lr: Annotated[float | None, _opt("Peak learning rate (AdamW, warm-up then cosine) "
                                     "(default: 0.002).")] = None,
    seed: Annotated[int | None, _opt("Seed of the initialisation and of every batch "
                                     "(default: 0).")] = None,
    device: Annotated[str | None, _opt("cpu, cuda or auto (default: cpu).")] = None,
    out: Annotated[Path | None, _opt("Run directory for checkpoints (default: runs/TASK).")]
    = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    d_model: Annotated[int | None, _opt("Model width (default: 64).")] = None,
    heads: Annotated[int | None, _opt("Attention heads (default: 4).")] = None,
    encoder_layers: Annotated[int | None, _opt("Encoder layers (default: 2).")] = None,
    decoder_layers: Annotated[int | None, _opt("Decoder layers (default: 2).")] = None,
    ff_dim: Annotated[int | None, _opt("Feed-forward width (default: 256).")] = None,
    dropout: Annotated[float | None, _opt("Dropout (default: 0).")] = None,
    rotary: Annotated[bool | None, typer.Option(
        "--rotary/--sinusoidal", help="Rotary or sinusoidal positions (default: sinusoidal).",
        show_default=False)] = None,
    warmup: Annotated[int | None, _opt("Warm-up steps (default: 100).")] = None,
    eval_every: Annotated[int | None, _opt("Validate every N steps (default: 250).")] = None,
    eval_size: Annotated[int | None, _opt("Validation examples (default: 1000).")] = None,
    checkpoint_every: Annotated[int | None, _opt("Checkpoint every N steps (default: 250).")]
    = None,
    threads: Annotated[int | None, threads_option()] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    nproc: Annotated[int | None, _opt("Train data-parallel on N local processes "
                                      "(DistributedDataParallel: gloo on CPU, NCCL with one "
                                      "GPU each); --batch-size is the global batch, split "
                                      "across them. Leave it out under torchrun.")] = None,
) -> None:
    """Train a Transformer encoder-decoder on TASK and save checkpoints in --out.

    summarize has its own defaults, sized for a 2-core CPU: --steps 3000 --batch-size 32
    --d-model 128 --ff-dim 512 --eval-every 500 --eval-size 200 --checkpoint-every 100.
    """
    from rich.console import Console

    from ..decode import load_run
    from ..tasks import TASKS
    from ..train import TrainConfig, evaluate

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    given = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": device,
        "d_model": d_model, "num_heads": heads, "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers, "ff_dim": ff_dim, "dropout": dropout,
        "positions": None if rotary is None else ("rotary" if rotary else "sinusoidal"),
        "warmup": warmup, "eval_every": eval_every, "eval_size": eval_size,
        "checkpoint_every": checkpoint_every,
    }
    given = {k: v for k, v in given.items() if v is not None}
    run_dir = out if out is not None else Path("runs") / task
    console = Console(stderr=True)
    from ..checkpoint import check_run_dir

    check_run_dir(run_dir)
    if resume:
        from ..train import read_run

        saved = TrainConfig.from_dict(read_run(run_dir).state["config"])
        if saved.task != task:
            raise ValueError(f"cannot resume {run_dir}: it trains task {saved.task!r}, not "
                             f"{task!r}")
        diff = [f"{_as_flag(k, v)} (checkpoint: {_saved(saved, k)})"
                for k, v in given.items() if _saved(saved, k) != v]
        if diff:
            raise ValueError(f"cannot resume {run_dir} with a different config: "
                             + ", ".join(diff) + "; drop these options to resume")
        cfg = None
    else:
        from ..checkpoint import has_checkpoint

        cfg = _config(task, {**_DEFAULTS, **TASKS[task].train_defaults, **given})
        if has_checkpoint(run_dir):
            raise ValueError(f"{run_dir} already holds a checkpoint; pass --resume to continue "
                             "it or choose another --out")
    from rich.markup import escape

    from .launch import run_training

    label = "resuming" if resume else "training"
    # Printed once every check has passed (under torchrun by rank 0 alone).
    announce = (f"[bold]{label}[/bold] {escape(task)} in {escape(str(run_dir))}"
                + (f" on {nproc} processes" if nproc and nproc > 1 else ""))
    result = run_training(cfg, run_dir, resume=resume, quiet=quiet, nproc=nproc,
                          threads=threads, console=console, announce=announce)
    if result is None:  # one of torchrun's other ranks
        return
    if result.interrupted:
        from .interrupt import ignore_further_interrupts

        ignore_further_interrupts()  # the run has stopped; only the exit is left
        console.print(f"interrupted at step {result.step}: checkpoint saved in {run_dir}; "
                      f"continue with: qkv train {task} --out {run_dir} --resume")
        sys.exit(130)
    lines = [f"done: step {result.step} in {result.seconds:.0f} s"]
    if result.valid_exact is not None:
        lines.append(f"validation exact-match {result.valid_exact:.4f}")
    run = load_run(run_dir)
    if run.config.task == "dates":
        from ..tasks import get_task

        t = get_task("dates", **run.config.task_options)
        held = evaluate(run.model, run.tokenizer, t.validation(run.config.eval_size,
                                                               split="heldout"),
                        max_len=t.max_target_len + 1)
        lines.append(f"held-out locales exact-match {held:.4f}")
    console.print("; ".join(lines))
    use = "summarize {} FILE.py" if task == "summarize" else "translate {} TEXT"
    console.print(f"checkpoint: {run_dir}; try: qkv {use.format(run_dir)}")


@app.command("translate")
@uses_threads
def translate_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by qkv train.")],
    text: Annotated[str, typer.Argument(help="The text to translate, e.g. '28 novembre 2026'.")],
    beam: Annotated[int, typer.Option(help="Beam width; 1 = greedy decoding.")] = 1,
    show_attention: Annotated[bool, typer.Option(
        "--show-attention", help="Print the cross-attention alignment (rows = output "
        "characters, columns = input characters).")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the alignment to FILE: .png, .svg or .html.")] = None,
    layer: LayerOption = None,
    head: HeadOption = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, threads_option()] = None,
) -> None:
    """Translate TEXT with the latest checkpoint in RUN_DIR and print the output."""
    import warnings

    from ..decode import load_run, translate
    from ..tasks import OutsideTaskWarning

    if isinstance(beam, bool) or beam < 1:
        raise ValueError(f"--beam must be >= 1; got {beam}")
    check_map_file(output)
    if not text:
        raise ValueError("the input text is empty; give the text to translate, e.g. "
                         f"qkv translate {run_dir} '28 novembre 2026'")
    run = load_run(run_dir, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OutsideTaskWarning)
        result = translate(run, text, beam=beam)
    for w in caught:  # before the answer: it is a guess
        print(f"qkv: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    amap = result.attention
    layer = amap.num_layers - 1 if layer is None else layer
    heads = list(range(amap.num_heads)) if head is None else [head]
    for h in heads:
        amap.check_head(layer, h)
    typer.echo(result.output)
    if show_attention:
        from rich.console import Console
        from rich.text import Text

        from ..viz import terminal

        con = Console()
        for h in heads:
            con.print(Text(f"cross-attention, decoder layer {layer}, head {h}: rows = output, "
                           "columns = input", style="bold"))
            con.print(terminal.heatmap(amap, layer, h))
    if output is not None:
        save_map_file(amap, output, layer=layer, head=head)
