"""Progress of long saves, loads and conversions: bytes done and the rate, read from a
native counter (`_fastckpt.Progress`) by a thread while the work runs with the GIL
released. On a terminal the line is a bar redrawn in place; elsewhere (a log, a pipe) a
plain line every few seconds, and always one last line with the total."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

from fastckpt import _fastckpt

# Redraws of a bar, and lines of a log.
_BAR_EVERY_S = 0.1
_LINE_EVERY_S = 5.0
_BAR_WIDTH = 24


def size_text(nbytes: float) -> str:
    """`1.02 GiB`, `512 B`, `1020 MiB`: binary units, three significant digits (or the
    whole number, from 100 up)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            digits = ".0f" if unit == "B" or nbytes >= 100 else ".3g"
            return f"{nbytes:{digits}} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def rate_text(nbytes: float, seconds: float) -> str:
    return f"{size_text(nbytes / seconds)}/s" if seconds > 0 else "-"


class Reporter:
    """Reports a counter's bytes while a `with` block runs, to `stream` (default stderr).

    Args:
        label: what is being done, e.g. `"saving m.keras"`.
        total: the bytes the work will count, for the percentage (0: unknown).
        stream: where to write; a bar when it is a terminal, plain lines otherwise.
        enabled: False makes the reporter silent (the library's default).

    Attributes:
        progress: the counter to hand to the native call (`progress=`).
    """

    def __init__(
        self, label: str, total: int = 0, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label = label
        self.total = total
        self.progress = _fastckpt.Progress()
        self._stream = sys.stderr if stream is None else stream
        self._enabled = enabled
        self._bar = enabled and _is_terminal(self._stream)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> Reporter:
        self._started = time.perf_counter()
        if self._enabled:
            self._thread = threading.Thread(target=self._run, name="fastckpt-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._enabled:
            seconds = time.perf_counter() - self._started
            done = self.progress.bytes
            end = "failed" if kind is not None else "done"
            self._write(
                f"{self.label}: {end}, {size_text(done)} in {seconds:.2f} s "
                f"({rate_text(done, seconds)})",
                final=True,
            )

    def _run(self) -> None:
        every = _BAR_EVERY_S if self._bar else _LINE_EVERY_S
        while not self._done.wait(every):
            self._write(self._line())

    def _line(self) -> str:
        done = self.progress.bytes
        seconds = time.perf_counter() - self._started
        rate = rate_text(done, seconds)
        if not self.total:
            return f"{self.label}: {size_text(done)}, {rate}"
        share = min(done / self.total, 1.0)
        text = f"{size_text(done)} of {size_text(self.total)} ({share:.0%}), {rate}"
        if not self._bar:
            return f"{self.label}: {text}"
        filled = round(share * _BAR_WIDTH)
        return f"{self.label} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {text}"

    def _write(self, line: str, final: bool = False) -> None:
        if self._bar:
            # Redraw in place; the last line stays.
            self._stream.write(f"\r\x1b[K{line}" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
