"""A rich progress bar showing loss and steps/s (or a no-op when disabled), with an optional step callback."""

from __future__ import annotations

import time
from typing import Callable


class StepBar:
    """``on_advance(done, total)`` runs at every `advance`, with or without the bar (a federated site runs with the
    bar off and reports its steps through shared.progress.ProgressRecord this way)."""

    def __init__(
        self,
        total: int,
        description: str,
        enabled: bool = True,
        on_advance: Callable[[int, int], None] | None = None,
    ):
        self.total, self.description, self.enabled = total, description, enabled
        self.on_advance = on_advance
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
        if self.on_advance is not None:
            self.on_advance(done, self.total)
        if self._progress is None:
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        text = " ".join(f"{k} {v:.4f}" for k, v in info.items()) + f" {rate:.2f} it/s"
        self._progress.update(self._task, completed=done, info=text)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
