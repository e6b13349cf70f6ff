"""A rich progress bar showing loss and steps/s (or a no-op when disabled)."""

from __future__ import annotations

import time


class StepBar:
    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._progress = None
        self._task = None
        self.start = time.perf_counter()

    def __enter__(self) -> StepBar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, info="")
        self.start = time.perf_counter()
        return self

    def advance(self, done: int, **info: float) -> None:
        if self._progress is None:
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        text = " ".join(f"{k} {v:.4f}" for k, v in info.items()) + f" {rate:.2f} it/s"
        self._progress.update(self._task, completed=done, info=text)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
