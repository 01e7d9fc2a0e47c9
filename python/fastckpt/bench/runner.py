"""`fastckpt bench`: runs the sections in one process and writes the report."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from fastckpt.bench import machine
from fastckpt.bench.context import Context
from fastckpt.bench.measure import Progress
from fastckpt.bench.settings import MODES, SECTIONS, Settings


@dataclasses.dataclass
class Options:
    """What `fastckpt bench` was asked for.

    Attributes:
        mode: "quick", "default" or "full".
        out: folder for results.json, results.md and the PNG plots.
        disk: folder on a real file system for the disk target (a scratch folder is made
            inside it); default: inside `out`.
        tmpfs: folder on tmpfs for the memory target; default /dev/shm. "" skips it.
        sections: which sections to run (default: all).
        plots: write the PNG plots (needs matplotlib).
        backends: the Keras backends of the whole-fit section (default: every one this
            environment can import).
    """

    mode: str = "default"
    out: str = "bench-results"
    disk: str | None = None
    tmpfs: str | None = "/dev/shm"
    sections: Sequence[str] = SECTIONS
    plots: bool = True
    command: str = ""
    backends: Sequence[str] = ()


def _scratch(parent: str, label: str) -> str:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"fastckpt-bench-{label}-", dir=parent)


def make_targets(opts: Options, progress: Progress) -> dict[str, str]:
    """Scratch folders for the tmpfs and disk targets; warns when a "disk" is tmpfs."""
    targets = {}
    if opts.tmpfs:
        fs = machine.filesystem(opts.tmpfs)["fstype"]
        if fs != "tmpfs":
            progress.say(f"note: --tmpfs {opts.tmpfs} is on {fs}, not tmpfs")
        targets["tmpfs"] = _scratch(opts.tmpfs, "tmpfs")
    disk_parent = opts.disk or opts.out
    fs = machine.filesystem(disk_parent)["fstype"]
    if fs in ("tmpfs", "ramfs"):
        progress.say(f"note: the disk target {disk_parent} is on {fs}: pass --disk DIR")
    targets["disk"] = _scratch(disk_parent, "disk")
    return targets


def run(opts: Options) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to `opts.out`)."""
    settings: Settings = MODES[opts.mode]
    progress = Progress()
    # Keras logs a legacy-format warning through absl on every `model.save("x.h5")`.
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.makedirs(opts.out, exist_ok=True)
    targets = make_targets(opts, progress)
    info = machine.describe(targets)
    progress.say(
        f"fastckpt bench ({settings.mode}): {info['cpus_usable']} cores, "
        f"{info['cpu_model']}; targets "
        + ", ".join(f"{k}={v['path']} ({v['fstype']})" for k, v in info["targets"].items())
    )
    ctx = Context(settings, targets, progress, tuple(opts.backends))
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    setup = None
    try:
        for section in SECTIONS:
            if section not in opts.sections:
                continue
            t0 = time.perf_counter()
            try:
                if section in ("stall", "slowdown", "load") and setup is None:
                    from fastckpt.bench.training import make_setup

                    setup = make_setup(ctx)
                _run_section(section, ctx, setup)
            except Exception as e:  # one failing section must not lose the others
                errors[section] = "".join(traceback.format_exception(e))[-4000:]
                progress.say(f"{section}: FAILED: {type(e).__name__}: {e}")
            finally:
                timings[section] = round(time.perf_counter() - t0, 1)
                progress.say(f"{section}: done in {timings[section]:.1f} s")
            if section == "load":
                setup = None
            gc.collect()
    finally:
        for folder in targets.values():
            shutil.rmtree(folder, ignore_errors=True)
    info["load_average_end"] = machine.load_average()
    results = {
        "schema": 1,
        "command": opts.command or "fastckpt bench",
        "mode": settings.mode,
        "settings": dataclasses.asdict(settings),
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(progress.elapsed, 1),
        "section_seconds": timings,
        "machine": info,
        "records": ctx.records,
        "errors": errors,
    }
    from fastckpt.bench import report

    written = report.write_all(results, opts.out, plots=opts.plots)
    progress.say("wrote " + ", ".join(written))
    return results


def _run_section(section: str, ctx: Context, setup: Any) -> None:
    if section == "wholefit":
        from fastckpt.bench.wholefit import run_all

        ctx.records += run_all(ctx.settings.mode, ctx.targets, ctx.progress.say, ctx.backends)
    elif section == "throughput":
        from fastckpt.bench.throughput import run_sizes

        run_sizes(ctx)
    elif section == "threads":
        from fastckpt.bench.throughput import run_threads

        run_threads(ctx)
    elif section == "variables":
        from fastckpt.bench.variables import run_variables

        run_variables(ctx)
    elif section == "stall":
        from fastckpt.bench.training import run_stall

        run_stall(ctx, setup)
    elif section == "slowdown":
        from fastckpt.bench.training import run_slowdown

        run_slowdown(ctx, setup)
    elif section == "load":
        from fastckpt.bench.loading import run_load

        run_load(ctx, setup)
    elif section == "memory":
        from fastckpt.bench.memory import run_memory

        run_memory(ctx)
    else:
        raise ValueError(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")


def main_exit_code(results: dict[str, Any]) -> int:
    if results["errors"]:
        print(
            f"fastckpt bench: {len(results['errors'])} section(s) failed: "
            + ", ".join(results["errors"]),
            file=sys.stderr,
        )
        return 1
    return 0
