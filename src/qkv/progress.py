"""The progress bar of :func:`qkv.train.train` (rich): step, loss, token accuracy, tokens/s,
validation exact-match and ETA; ``QKV_NO_PROGRESS=1`` turns it off."""

from __future__ import annotations

import os

__all__ = ["TrainingBar"]


class TrainingBar:
    """The rich progress bar: step, loss, token accuracy, tokens/s, validation, ETA."""

    def __init__(self, cfg, start: int, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{cfg.task}[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  "
                       "{task.fields[tps]} tok/s  valid {task.fields[valid]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
            disable=bool(os.environ.get("QKV_NO_PROGRESS")),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=cfg.steps, completed=start,
                                           loss="-", acc="-", tps="-", valid="-")

    def update(self, done: int, rec: dict, tps: float, valid: float | None) -> None:
        self.progress.update(self.task, completed=done, loss=f"{rec['loss']:.4f}",
                             acc=f"{rec['acc']:.3f}", tps=f"{tps:,.0f}",
                             valid="-" if valid is None else f"{valid:.3f}")

    def close(self) -> None:
        self.progress.stop()
