"""Progress for people and for logs: a tqdm bar on a terminal, a plain line every N steps otherwise.

A tqdm bar redraws itself with carriage returns; written to a file or a pipe (``nohup``,
``| tee``, a batch scheduler's log) every redraw becomes a frame of junk. ``progress_bar``
gives a tqdm bar when its stream (stderr, where tqdm draws) is a terminal or the code runs
in a notebook, and otherwise a ``LineProgress``: the same interface (``update``,
``set_postfix``, ``close``, ``n``, iteration), printing one plain line every ``every``
updates to stdout, next to the other messages of a run (so a log keeps them in order)::

    epoch 3/10  batch 120/469  loss 0.4120  lr 0.05  12.3 batch/s
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm
from tqdm.autonotebook import tqdm as notebook_or_plain_tqdm


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _in_notebook() -> bool:
    """tqdm.auto picked its notebook widget (Jupyter's stderr is no terminal, yet it draws fine)."""
    return notebook_or_plain_tqdm is not plain_tqdm


class LineProgress:
    """A progress reporter for logs: tqdm's interface, one plain line every ``every`` updates.

    Args:
        iterable: iterate over it, counting one update per item (as ``tqdm(iterable)``).
        total: the number of updates expected (default ``len(iterable)``), shown as ``n/total``.
        desc: the line's start, e.g. ``epoch 3/10``.
        initial: the count to start from (a resumed epoch).
        unit: what is counted, e.g. ``batch``; it names the count and the rate.
        every: print a line when the count reaches a multiple of this.
        stream: where the lines go (default: ``sys.stdout`` at construction).
    """

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, *, desc: str = "",
                 initial: int = 0, unit: str = "it", every: int = 10, stream: Optional[TextIO] = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.every = max(1, int(every))
        self.n = initial
        self.postfix: dict[str, Any] = {}
        self.stream = stream if stream is not None else sys.stdout
        self._start_n, self._t0 = initial, time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; print a line when the count passes a multiple of ``every``."""
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every:
            print(self.line(), file=self.stream, flush=True)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Values shown at the end of the next line (``loss=0.41`` prints ``loss 0.41``)."""
        self.postfix = dict(values)

    def line(self) -> str:
        """The current line: description, count, postfix values and rate."""
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        parts = [self.desc, f"{self.unit} {count}"] if self.desc else [f"{self.unit} {count}"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        elapsed = time.perf_counter() - self._t0
        if elapsed > 0 and self.n > self._start_n:
            parts.append(f"{(self.n - self._start_n) / elapsed:.1f} {self.unit}/s")
        return "  ".join(parts)

    def close(self) -> None:
        """Nothing to tidy up (there is no bar to clear); for tqdm's interface."""

    @staticmethod
    def write(text: str) -> None:
        """Print ``text`` (tqdm.write's interface)."""
        print(text, flush=True)


def progress_bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, *, desc: str = "",
                 initial: int = 0, unit: str = "it", every: int = 10, disable: bool = False,
                 stream: Optional[TextIO] = None) -> Any:
    """A tqdm bar on a terminal or in a notebook, else a ``LineProgress`` printing every ``every`` updates.

    Args:
        iterable, total, desc, initial, unit: as for ``tqdm``.
        every: for logs, the number of updates between two lines.
        disable: show nothing (a disabled tqdm, which still counts ``n``).
        stream: the stream whose being a terminal decides (default ``sys.stderr``, where tqdm draws).

    Returns:
        An object with tqdm's ``update``, ``set_postfix``, ``close``, ``n`` and iteration.
    """
    stream = stream if stream is not None else sys.stderr
    if disable:
        return plain_tqdm(iterable, total=total, initial=initial, disable=True)
    if _in_notebook() or is_terminal(stream):
        return auto_tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, leave=False,
                         dynamic_ncols=True, file=None if _in_notebook() else stream)
    return LineProgress(iterable, total, desc=desc, initial=initial, unit=unit, every=every)


def shows_next(bar: Any, n: int = 1) -> bool:
    """Whether ``bar``'s next ``update(n)`` will be shown: a line of a ``LineProgress`` at its
    ``every``, a tqdm bar about every 10 (so a costly postfix, e.g. a loss read back from
    the GPU, is computed only for the updates someone sees)."""
    every = getattr(bar, "every", 10)
    return (bar.n + n) // every > bar.n // every
