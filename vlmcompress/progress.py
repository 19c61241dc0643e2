"""One progress display for all long work (stages of `apply`, `bench`, zoo training, the trainer): a rich bar on a
terminal, plain lines elsewhere (CI logs, pipes), nothing when disabled.

    with Progress("training", total=steps, unit="steps") as bar:
        for step in ...:
            bar.update(advance=1, loss=0.42, lr=1e-4)

`fields` are shown after the bar (`loss 0.420  lr 1.0e-04`); plain output prints nothing for work that ends within
`plain_every` seconds, else a line every `plain_every` seconds and the last one, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any

_ACTIVE = None  # the rich display currently on screen, if any


def _format(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
        parts.append(f"{key} {value}")
    return "  ".join(parts)


class Progress:
    """A progress display over `total` units (`None`: unknown). `stream`: stderr by default; `rich`: None decides
    by whether the stream is a terminal; `transient`: a rich bar disappears when done (plain lines stay)."""

    def __init__(self, description: str, total: int | None, unit: str = "", enabled: bool = True, *,
                 stream=None, rich: bool | None = None, transient: bool = False, plain_every: float = 10.0):
        self.description, self.total, self.unit = description, total, unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.rich = self.stream.isatty() if rich is None else rich
        self.transient, self.plain_every = transient, plain_every
        self.completed = 0
        self.fields: dict[str, Any] = {}
        self._bar = None
        self._nested = False
        self._start = self._last_line = 0.0

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        global _ACTIVE
        if self.enabled and self.rich and _ACTIVE is not None:
            # rich allows one live display: a display opened inside another (the trainer inside `apply`'s
            # stages) is one more line of the outer one
            self._bar, self._nested = _ACTIVE, True
            self._task = self._bar.add_task(self.description, total=self.total, info="")
            return self
        if self.enabled and self.rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn(self.unit), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(file=self.stream), transient=self.transient)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
            _ACTIVE = self._bar
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        if self._bar is not None and self._nested:
            self._bar.remove_task(self._task)
            self._bar = None
        elif self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
            _ACTIVE = None
        elif self.enabled and exc[0] is None and self._last_line not in (0.0, -1):
            self._plain(force=True)  # the final count of long work whose total was not reached

    def update(self, advance: int = 0, description: str | None = None, total: int | None = None,
               completed: int | None = None, **fields: Any) -> None:
        """Move on by `advance` units (or to `completed`), optionally changing the description, the total and the
        fields shown after the bar."""
        self.completed = completed if completed is not None else self.completed + advance
        if description is not None:
            self.description = description
        if total is not None:
            self.total = total
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, description=self.description, total=self.total,
                             info=_format(self.fields))
        elif advance or completed is not None:  # plain lines report progress, not every change of description
            self._plain()

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first unit or without a total)."""
        if not self.total or not self.completed:
            return None
        elapsed = time.perf_counter() - self._start
        return elapsed / self.completed * (self.total - self.completed)

    def _plain(self, force: bool = False) -> None:
        now = time.perf_counter()
        done = self.total is not None and self.completed >= self.total
        if self._last_line == -1:
            return  # the last line was printed already
        # work that ends within `plain_every` seconds prints nothing; longer work a line every `plain_every`
        # seconds and the last one
        since = now - (self._last_line or self._start)
        if not force and since < self.plain_every and not (done and self._last_line):
            return
        count = f"{self.completed}/{self.total}" if self.total is not None else str(self.completed)
        eta = self.eta()
        tail = [_format(self.fields)] if self.fields else []
        tail.append(f"{now - self._start:.0f}s" + (f", ETA {eta:.0f}s" if eta is not None and not done else ""))
        print(f"{self.description}: {count} {self.unit}".rstrip() + "  " + "  ".join(tail), file=self.stream,
              flush=True)
        self._last_line = -1 if done else now
