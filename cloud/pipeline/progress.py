"""Training progress: loss, throughput and ETA, live on a terminal, plain lines in a log.

The training loop reports to a ``Progress`` (start, step, epoch end, close);
what a human sees is decided here. On a terminal the display is a ``rich``
progress bar redrawn in place; when stderr is piped (CI, a log file, a
``torchrun`` child) it writes one plain line about every tenth of the run, so
logs never fill with carriage returns or escape codes.

NOTE: torch-free, and ``rich`` is imported only when a terminal is drawn.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """What the training loop tells a display; every method is cheap and optional to show."""

    def start(self, total_steps: int, epochs: int, done_steps: int = 0) -> None: ...

    def step(self, steps: int, samples: int, loss: float) -> None: ...

    def epoch_end(self, epoch: int, epochs: int, loss: float, val: str) -> None: ...

    def close(self) -> None: ...


def format_eta(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for an ETA; ``?`` while unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Meter:
    """Throughput and ETA over the steps run by *this* process (a resumed run starts fresh)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.total = 0
        self.done = 0
        self._t0 = clock()
        self._done0 = 0
        self._samples = 0

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self._done0 = total, done, done
        self._t0, self._samples = self._clock(), 0

    def advance(self, steps: int, samples: int) -> None:
        self.done += steps
        self._samples += samples

    def rate(self) -> float:
        """Samples per second since start."""
        elapsed = self._clock() - self._t0
        return self._samples / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        elapsed = self._clock() - self._t0
        ran = self.done - self._done0
        return elapsed / ran * (self.total - self.done) if ran > 0 else float("nan")


class LineProgress:
    """Plain lines, one per epoch that ends a tenth of the run (and the last one)."""

    def __init__(self, stream: TextIO, clock: Any = time.monotonic) -> None:
        self._stream = stream
        self._meter = _Meter(clock)
        self._loss = float("nan")

    def start(self, total_steps: int, epochs: int, done_steps: int = 0) -> None:
        self._meter.start(total_steps, done_steps)

    def step(self, steps: int, samples: int, loss: float) -> None:
        self._meter.advance(steps, samples)
        self._loss = loss

    def epoch_end(self, epoch: int, epochs: int, loss: float, val: str) -> None:
        if epoch != epochs and epoch % max(1, epochs // 10) != 0:
            return
        m = self._meter
        self._stream.write(
            f"epoch {epoch}/{epochs}  step {m.done}/{m.total}  loss {loss:.4f}  {val}  "
            f"{m.rate():.0f} samples/s  ETA {format_eta(m.eta())}\n"
        )
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class RichProgress:
    """A ``rich`` bar redrawn in place: steps, loss, samples/s, ETA, last validation figure."""

    def __init__(self, stream: TextIO, *, force_terminal: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        console = Console(file=stream, force_terminal=force_terminal)
        self._bar = Bar(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.0f} samples/s  {task.fields[val]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._meter = _Meter()
        self._task: Any = None

    def start(self, total_steps: int, epochs: int, done_steps: int = 0) -> None:
        self._meter.start(total_steps, done_steps)
        self._bar.start()
        self._task = self._bar.add_task(
            "train",
            total=total_steps,
            completed=done_steps,
            epoch=f"-/{epochs}",
            loss=float("nan"),
            rate=0.0,
            val="",
        )

    def step(self, steps: int, samples: int, loss: float) -> None:
        self._meter.advance(steps, samples)
        self._bar.update(self._task, advance=steps, loss=loss, rate=self._meter.rate())

    def epoch_end(self, epoch: int, epochs: int, loss: float, val: str) -> None:
        self._bar.update(self._task, epoch=f"{epoch}/{epochs}", loss=loss, val=val)

    def close(self) -> None:
        self._bar.stop()


def default_progress(stream: TextIO | None = None) -> Progress:
    """A live bar when ``stream`` (default stderr) is a terminal, else plain lines."""
    out = stream or sys.stderr
    if out.isatty():
        try:
            return RichProgress(out)
        except ImportError:  # rich is in the cloud extra, but a bare install still trains
            pass
    return LineProgress(out)


class NullProgress:
    """Shows nothing: for ranks other than 0, and for library callers."""

    def start(self, total_steps: int, epochs: int, done_steps: int = 0) -> None:
        pass

    def step(self, steps: int, samples: int, loss: float) -> None:
        pass

    def epoch_end(self, epoch: int, epochs: int, loss: float, val: str) -> None:
        pass

    def close(self) -> None:
        pass
