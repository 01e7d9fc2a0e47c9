"""results.json, results.md and the PNG plots of a run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from fastckpt.bench.measure import fmt_bytes
from fastckpt.bench.targets import (
    SNAPSHOT_FLOOR,
    WRITE_FLOOR,
    Index,
    check_all,
    keras_counterpart,
    median,
)

READ_FLOOR = "floor: read, 1 thread"
DEVICE_FLOOR = "floor: read, every core"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    a = abs(s)
    if a < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if a < 0.1:
        return f"{s * 1e3:.1f} ms"
    if a < 1:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def cell(record: dict | None, quantity: str = "seconds") -> str:
    """'median (min–max)' of one quantity, in time units."""
    if record is None:
        return "-"
    q = record["quantities"].get(quantity)
    if q is None:
        return "-"
    if q["n"] == 1:
        return fmt_time(q["median"])
    return f"{fmt_time(q['median'])} ({fmt_time(q['min'])}–{fmt_time(q['max'])})"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x" if r < 1e4 else f"{r:.3g}x"


def gbps(nbytes: float | None, seconds: float | None) -> str:
    if not nbytes or not seconds or seconds <= 0:
        return "-"
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def _contenders(idx: Index, section: str, target: str | None = None) -> list[str]:
    seen: dict[str, None] = {}
    for r in idx.select(section, target):
        if r["available"] and r["target"] != "*":
            seen.setdefault(r["contender"], None)
    return list(seen)


def header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    libs = m["libraries"]
    build = m.get("fastckpt_build", {})
    mem = m["memory"].get("MemTotal", 0) / 2**30
    lines = [
        "# fastckpt benchmark",
        "",
        f"`{results['command']}` ({results['mode']} mode), started {results['started']}, "
        f"took {results['duration_s'] / 60:.1f} min.",
        "",
        f"- Machine: {m['cpu_model']}, {m['cpus_usable']} usable cores of {m['cpus']}, "
        f"{mem:.0f} GiB RAM; {m['platform']}; Python {m['python']}.",
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()) + ".",
        f"- fastckpt build: commit {build.get('git_commit', '?')}, native module "
        f"`{os.path.basename(build.get('native', '?'))}`"
        + (f" ({build['profile']})" if build.get("profile") else "")
        + ".",
        "- Targets: "
        + "; ".join(
            f"**{k}** = `{v['path']}` ({v['fstype']} on {v['source'] or v['mount']})"
            for k, v in m["targets"].items()
        )
        + ".",
        f"- Load average (1, 5, 15 min) at start {m.get('load_average_start')}, at end "
        f"{m.get('load_average_end')}: the machine is shared, so absolute times are noisy; "
        "compare ratios to the floors measured in the same rounds.",
        "",
        "Every figure is the median of interleaved rounds (each contender in turn, the order "
        "rotated each round), with (min–max). *x floor* is the contender's time over the "
        "floor's in the same rounds. Keras and safetensors do not fsync: the bench fsyncs "
        "their file and folder right after and counts it, so every contender is timed to the "
        "same durability.",
        "",
    ]
    return lines


def targets_section(rows: list[dict]) -> list[str]:
    mark = {True: "met", False: "**not met**", None: "n/a"}
    out = ["## Targets (docs: performance.md)", ""]
    out += _table(
        ["target", "where", "goal", "this run", "", "detail"],
        [
            [r["target"], r["where"], r["goal"], r["value"], mark[r["met"]], r["detail"]]
            for r in rows
        ],
    )
    return out


def wholefit_section(idx: Index) -> list[str]:
    from fastckpt.bench.wholefit import COPY_FLOOR, NO_CALLBACK

    cases = idx.cases("wholefit")
    if not cases:
        return []
    some = idx.select("wholefit")[0]
    out = [
        "## Whole fit: what checkpointing blocks, first save and end-of-fit wait included",
        "",
        f"A new model's first `fit` ({fmt_bytes(some['state_bytes'])} of state: weights "
        "and Adam's slots), the callback saving to one file name unless the name says `{n}` "
        "(a new file each time). *Per checkpoint*: all the time `fit` spent in the "
        "callback's hooks (`on_train_begin`, every batch and epoch end, `on_train_end`), over "
        "the number of checkpoints. *First*: `on_train_begin` and every hook up to the first "
        "save (*train begin* shows that hook alone). *Steady*: the median hook of the later "
        "saves. *End wait*: `on_train_end`, until every checkpoint is durable. *Steps*: the "
        "training steps' time (each step timed alone, between the hooks), over the fit "
        "without a callback's in the same process: what a writer or a buffer being readied "
        "in the background takes from training. *Felt*: the hooks plus the steps' extra "
        "time, per checkpoint: the fit's extra length without the multi-second stalls this "
        "VM puts between some steps of every fit, which make *fit* (the whole fit, beside a "
        "fit without a callback) noisy. The copy floor is one copy of the state into memory "
        "already touched, one thread, in the same rounds. Each round runs in a new process, "
        "as a training script does: on this VM the first touch of memory is expensive (the "
        "host backs it then), and every contender pays it.",
        "",
    ]
    for target in idx.targets("wholefit"):
        out += [f"### {target}", ""]
        for case in cases:
            recs = idx.select("wholefit", target, case)
            if not recs:
                continue
            floor = median(idx.named("wholefit", target, case, COPY_FLOOR))
            base = idx.named("wholefit", target, case, NO_CALLBACK)
            r0 = recs[0]
            every = "each epoch" if r0["every"] == "epoch" else f"every {r0['every']} steps"
            out += [
                f"**{case}**: {r0['checkpoints']} checkpoints, {every}, {r0['steps']} steps; "
                f"copy floor {fmt_time(floor)}; fit without a callback "
                f"{cell(base, 'fit_seconds')}, its steps {cell(base, 'steps')}.",
                "",
            ]
            rows = []
            for r in recs:
                if r["contender"] in (COPY_FLOOR, NO_CALLBACK):
                    continue
                theirs = None
                if r["family"] == "fastckpt":
                    theirs = idx.named("wholefit", target, case, keras_counterpart(r["contender"]))
                rows.append(
                    [
                        r["contender"],
                        cell(r, "per_checkpoint"),
                        ratio(median(r, "per_checkpoint"), floor),
                        ratio(median(theirs, "per_checkpoint"), median(r, "per_checkpoint"))
                        if theirs is not None
                        else "",
                        cell(r, "train_begin"),
                        cell(r, "first"),
                        cell(r, "steady"),
                        cell(r, "end_of_fit_wait"),
                        ratio(median(r, "steps"), median(base, "steps")),
                        cell(r, "felt"),
                        cell(r, "fit_seconds"),
                    ]
                )
            out += _table(
                [
                    "callback",
                    "per checkpoint",
                    "x copy floor",
                    "keras / fastckpt",
                    "train begin",
                    "first",
                    "steady",
                    "end wait",
                    "steps",
                    "felt",
                    "fit",
                ],
                rows,
            )
    return out


def stall_section(idx: Index) -> list[str]:
    recs = idx.select("stall")
    if not recs:
        return []
    targets = idx.targets("stall")
    some = next(r for r in recs if r["target"] != "*")
    floor = median(idx.find("stall", None, None, lambda r: r["contender"] == SNAPSHOT_FLOOR))
    base = {t: idx.named("stall", t, None, "fit without a callback") for t in targets}
    out = [
        "## Stall per checkpoint",
        "",
        f"{some['case']}; `fit` of {some['steps']} steps, a checkpoint every "
        f"{some['save_every']} steps ({some['checkpoints']} per fit). *Blocked*: time `fit` "
        "spent inside the callback's hooks, per checkpoint, timed directly (the snapshot, and "
        "any wait for the previous save to finish). *End wait*: time `on_train_end` waited "
        "for the last background save, once per `fit`. *Fit difference*: (fit with the "
        "callback − fit without) / checkpoints, paired round by round, performance.md's "
        "definition, which also counts steps slowed by a background write but is as noisy as "
        f"two whole `fit`s. Snapshot floor (memcpy of the whole state into touched memory): "
        f"{fmt_time(floor)}. `fit` without a callback: "
        + ", ".join(f"{t} {cell(base[t])}" for t in targets)
        + ".",
        "",
    ]
    rows = []
    for name in _contenders(idx, "stall"):
        r0 = idx.named("stall", None, None, name)
        if r0 is None or "blocked" not in r0["quantities"]:
            continue
        row = [name]
        for t in targets:
            r = idx.named("stall", t, None, name)
            row += [
                cell(r, "blocked"),
                ratio(median(r, "blocked"), floor),
                cell(r, "end_of_fit_wait"),
                cell(r, "stall"),
            ]
        rows.append(row)
    head = ["contender"] + [
        x for t in targets for x in (f"{t}: blocked", "x floor", "end wait", "fit difference")
    ]
    first = idx.find("stall", None, None, lambda r: "first save of a model" in r["contender"])
    tail = []
    if first is not None:
        tail = [
            "The model's first fastckpt background save (walk + fresh snapshot arena, once per "
            "model, waited for): "
            f"{cell(first)}.",
            "",
        ]
    return out + _table(head, rows) + tail


def throughput_section(idx: Index) -> list[str]:
    cases = idx.cases("throughput")
    if not cases:
        return []
    out = [
        "## Durable throughput",
        "",
        "Weights of a model of big float32 variables (32 MiB each, at least 4), from "
        "`save` called to file fsync'd, renamed and folder fsync'd. Cells: time (min–max), "
        "and x the one-thread write floor of the same bytes.",
        "",
    ]
    for t in idx.targets("throughput"):
        out += [f"### {t}", ""]
        rows = []
        for name in _contenders(idx, "throughput", t):
            row = [name]
            for case in cases:
                r = idx.named("throughput", t, case, name)
                floor = median(idx.named("throughput", t, case, WRITE_FLOOR))
                if r is None:
                    row.append("-")
                    continue
                extra = ratio(median(r), floor) if name != WRITE_FLOOR else ""
                blocked = median(r, "blocked")
                if blocked is not None:
                    extra += f", caller blocked {fmt_time(blocked)}"
                row.append(f"{cell(r)} {extra}".strip())
            rows.append(row)
        gb = []
        for case in cases:
            r = idx.named("throughput", t, case, WRITE_FLOOR)
            gb.append(gbps(r.get("state_bytes") if r else None, median(r)))
        rows.append(["write floor bandwidth", *gb])
        out += _table(["contender", *cases], rows)
    return out


def threads_section(idx: Index) -> list[str]:
    recs = idx.select("threads")
    if not recs:
        return []
    targets = idx.targets("threads")
    out = ["## Writer threads", "", f"`fastckpt.save` of {recs[0]['case']} to `.weights.h5`.", ""]
    rows = []
    for name in _contenders(idx, "threads"):
        row = [name]
        for t in targets:
            r = idx.named("threads", t, None, name)
            floor = median(idx.named("threads", t, None, WRITE_FLOOR))
            row += [
                cell(r),
                gbps(r.get("state_bytes") if r else None, median(r)),
                ratio(median(r), floor),
            ]
        rows.append(row)
    head = ["contender"] + [x for t in targets for x in (t, "GB/s", "x floor")]
    return out + _table(head, rows)


def variables_section(idx: Index) -> list[str]:
    cases = idx.cases("variables")
    if not cases:
        return []
    out = [
        "## Per-variable overhead",
        "",
        "One layer of N float32 8x8 variables (256 bytes each). fastckpt walks a model once "
        "and reuses the plan; the walk, paid by the first save only, is its own row. Last "
        "column: time per variable at the largest N.",
        "",
    ]
    for t in idx.targets("variables"):
        out += [f"### {t}", ""]
        rows = []
        last = cases[-1]
        for name in _contenders(idx, "variables"):
            row = [name] + [cell(idx.named("variables", t, c, name)) for c in cases]
            r = idx.named("variables", t, last, name)
            per = median(r) / r["variables"] if r else None
            row.append(fmt_time(per))
            rows.append(row)
        out += _table(["contender", *cases, f"per variable ({last})"], rows)
    return out


def slowdown_section(idx: Index) -> list[str]:
    recs = [r for r in idx.select("slowdown") if r["available"]]
    if not recs:
        return []
    out = [
        "## Training step time while a background write runs",
        "",
        f"{recs[0]['case']}: `train_on_batch` steps timed one by one, in windows with no "
        "write and while a background save runs: into the file the save before it replaced "
        "and kept, as `ModelCheckpoint` writes (on tmpfs the snapshot is taken straight "
        "into the mapping kept of it, and the write copies none of it), "
        "or a new file each time (`fastckpt.save(..., background=True)`). *Lost per write*: "
        "the steps during one write, less as many steps of the window before it: what the "
        "write took from training in all (the ratio also falls when a writer takes the "
        "same CPU more slowly, over more steps).",
        "",
    ]
    rows = []
    for r in recs:
        during = r["quantities"].get("step_during_write")
        rows.append(
            [
                r["target"],
                r["contender"],
                cell(r, "step_quiet"),
                cell(r, "step_during_write"),
                str(during["n"]) if during else "0",
                ratio(median(r, "step_during_write"), median(r, "step_quiet")),
                cell(r, "lost_per_write"),
                cell(r, "blocked"),
                cell(r, "write"),
            ]
        )
    head = [
        "target",
        "writer",
        "step, no write",
        "step during write",
        "steps",
        "ratio",
        "lost per write",
        "caller blocked",
        "write",
    ]
    return out + _table(head, rows)


def memory_section(idx: Index) -> list[str]:
    recs = [r for r in idx.select("memory") if r["available"]]
    if not recs:
        return []
    out = [
        "## Extra host memory",
        "",
        "Each row in a fresh process: RSS sampled every 2 ms during the saves, minus RSS just "
        "before the first save (model built and trained). Drift: RSS after the last save minus "
        "after the first.",
        "",
    ]
    rows = [
        [
            r["target"],
            r["contender"],
            f"{r['state_bytes'] / 2**20:.0f} MiB",
            str(r["saves"]),
            f"{r['extra_peak_bytes'] / 2**20:.0f} MiB",
            f"{r['extra_peak_ratio']:.2f}x",
            f"{r['drift_bytes'] / 2**20:+.1f} MiB",
        ]
        for r in recs
    ]
    head = ["target", "contender", "checkpoint", "saves", "peak extra RSS", "x checkpoint", "drift"]
    return out + _table(head, rows)


def load_section(idx: Index) -> list[str]:
    recs = idx.select("load")
    if not recs:
        return []
    targets = idx.targets("load")
    out = [
        "## Load",
        "",
        f"{recs[0]['case']}, read back into the same model (`load_model`: a new one). On disk "
        "each load starts with the file evicted from the page cache (posix_fadvise "
        "DONTNEED on that file); tmpfs is memory either way.",
        "",
    ]
    rows = []
    # The file read on every core is what the device gives (runs before it had only the
    # one-thread read).
    every_core = any(idx.named("load", t, None, DEVICE_FLOOR) for t in targets)
    floor_name = DEVICE_FLOOR if every_core else READ_FLOOR
    for name in _contenders(idx, "load"):
        row = [name]
        for t in targets:
            r = idx.named("load", t, None, name)
            floor = median(idx.named("load", t, None, floor_name))
            keras = median(idx.named("load", t, None, "keras model.load_weights(.weights.h5)"))
            row += [cell(r), ratio(median(r), floor), ratio(keras, median(r))]
        rows.append(row)
    floor_head = "x read on every core" if every_core else "x read floor"
    head = ["contender"] + [x for t in targets for x in (t, floor_head, "speed-up vs load_weights")]
    return out + _table(head, rows)


def missing_section(results: dict[str, Any]) -> list[str]:
    seen: dict[str, str] = {}
    for r in results["records"]:
        if not r["available"]:
            seen.setdefault(r["contender"], r["note"])
    for r in results["records"]:
        if r["available"] and r["note"] and r["family"] == "fastckpt":
            seen.setdefault(r["contender"], r["note"])
    out = []
    if seen:
        out += ["## Notes on contenders", ""]
        out += [f"- {name}: {note}" for name, note in seen.items()] + [""]
    if results["errors"]:
        out += ["## Errors", ""]
        for section, text in results["errors"].items():
            out += [f"### {section}", "", "```", text.strip(), "```", ""]
    return out


def markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    idx = Index(results["records"])
    lines = header(results)
    lines += targets_section(results["targets"])
    for section in (
        wholefit_section,
        stall_section,
        throughput_section,
        threads_section,
        variables_section,
        slowdown_section,
        memory_section,
        load_section,
    ):
        lines += section(idx)
    lines += missing_section(results)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in results["section_seconds"].items())
    lines += [f"Section times: {secs}.", ""]
    return "\n".join(lines)


def write_all(results: dict[str, Any], out: str, plots: bool = True) -> list[str]:
    """Writes results.json, results.md and (if matplotlib imports) the PNG plots."""
    results["targets"] = check_all(results)
    written = []
    pngs: list[str] = []
    if plots:
        try:
            from fastckpt.bench import plots as plotting

            pngs = plotting.write_plots(results, out)
        except ImportError as e:
            results["errors"]["plots"] = f"matplotlib missing: {e}"
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    written.append(os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results, pngs))
    written.append(os.path.join(out, "results.md"))
    return written + [os.path.join(out, p) for p in pngs]
