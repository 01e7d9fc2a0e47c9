"""Timing on a noisy machine: interleaved repetitions, medians with min-max, RSS sampling.

Every figure the benchmark reports is the median of several runs taken in turn with the
other contenders of the same case (A B C A B C ...), so that a burst of load from another
process lands on all of them rather than on one.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

MIB = 1 << 20
GIB = 1 << 30


@dataclasses.dataclass
class Stats:
    """Seconds (or any quantity) over repeated runs."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "n": len(self.runs),
            "runs": self.runs,
        }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Runs `fn` once; returns (seconds, its result)."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@dataclasses.dataclass
class Trial:
    """One contender in an interleaved comparison.

    `run` does the work and returns either its seconds (when it times itself, e.g. to leave
    out a setup step) or a dict of named quantities, the main one under "seconds".
    `setup`/`cleanup` run untimed around every run; `warmup` runs it once untimed before
    the first round (for contenders with one-time costs that the report shows elsewhere).
    """

    name: str
    run: Callable[[], float | dict[str, float]]
    setup: Callable[[], Any] | None = None
    cleanup: Callable[[], Any] | None = None
    warmup: bool = False


def interleave(
    trials: Sequence[Trial], reps: int, on_rep: Callable[[int], Any] | None = None
) -> dict[str, dict[str, Stats]]:
    """Runs the trials that ask for it once untimed, then `reps` rounds of all in turn.

    The order rotates from one round to the next so no contender always runs first (after a
    quiet spell) or last. Returns `{trial: {quantity: Stats}}`.
    """
    out: dict[str, dict[str, list[float]]] = {t.name: {} for t in trials}
    for t in trials:
        if t.warmup:
            _run_once(t)
    for rep in range(reps):
        shift = rep % len(trials) if trials else 0
        for t in list(trials[shift:]) + list(trials[:shift]):
            for key, value in _run_once(t).items():
                out[t.name].setdefault(key, []).append(value)
        if on_rep is not None:
            on_rep(rep)
    return {name: {k: Stats(v) for k, v in q.items()} for name, q in out.items()}


def _run_once(t: Trial) -> dict[str, float]:
    if t.setup is not None:
        t.setup()
    gc.collect()
    try:
        got = t.run()
    finally:
        if t.cleanup is not None:
            t.cleanup()
    return got if isinstance(got, dict) else {"seconds": float(got)}


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size, from /proc (no dependency); 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:
            return 0


class RssSampler:
    """Samples RSS in a thread every `interval` seconds; `peak` is the highest seen.

    Reading /proc/self/statm takes a few microseconds and releases the GIL while sleeping, so
    the sampler does not slow what it measures."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fastckpt-bench-rss", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class Progress:
    """One line per step, with the elapsed time since the run began."""

    def __init__(self, stream: Any = None, quiet: bool = False) -> None:
        self.start = time.perf_counter()
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        if self.quiet:
            return
        minutes, seconds = divmod(self.elapsed, 60)
        print(f"[{int(minutes):3d}:{seconds:04.1f}] {text}", file=self.stream, flush=True)


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as the checkpoint sizes are chosen."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
