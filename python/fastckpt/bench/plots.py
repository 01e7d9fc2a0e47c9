"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Any

from fastckpt.bench.targets import SNAPSHOT_FLOOR, WRITE_FLOOR, Index, median

COLORS = {"fastckpt": "tab:blue", "keras": "tab:red", "other": "tab:green", "floor": "black"}


def _color(record: dict, i: int) -> Any:
    import matplotlib.pyplot as plt

    base = COLORS.get(record["family"])
    if record["family"] in ("fastckpt", "keras"):
        cmap = plt.get_cmap("Blues" if record["family"] == "fastckpt" else "Reds")
        return cmap(0.45 + 0.1 * (i % 6))
    return base or "gray"


def _line_style(record: dict, i: int) -> dict[str, Any]:
    """Floors are dashed black lines; contenders take their family's colour."""
    if record["family"] == "floor":
        return {"ls": "--", "color": "black"}
    return {"color": _color(record, i)}


def _series(idx: Index, section: str, target: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in idx.select(section, target):
        if r["available"]:
            out.setdefault(r["contender"], []).append(r)
    return out


def draw_stall(ax, idx: Index, target: str) -> bool:
    recs = [r for r in idx.select("stall", target) if "blocked" in r["quantities"]]
    if not recs:
        return False
    names = [r["contender"] for r in recs]
    q = [r["quantities"]["blocked"] for r in recs]
    values = [max(x["median"], 1e-4) for x in q]
    lo = [max(v - max(x["min"], 1e-4), 0) for v, x in zip(values, q, strict=True)]
    hi = [max(x["max"] - v, 0) for v, x in zip(values, q, strict=True)]
    colors = [_color(r, i) for i, r in enumerate(recs)]
    ax.barh(names, values, xerr=[lo, hi], color=colors)
    floor = median(idx.find("stall", None, None, lambda r: r["contender"] == SNAPSHOT_FLOOR))
    if floor:
        ax.axvline(floor, color="black", ls="--", lw=1, label="snapshot floor (memcpy)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("training blocked per checkpoint (s, log)")
    ax.set_title(f"Stall per checkpoint ({target})", fontsize=9)
    ax.invert_yaxis()
    ax.tick_params(labelsize=7)
    return True


def draw_throughput(ax, idx: Index, target: str) -> bool:
    series = _series(idx, "throughput", target)
    if not series:
        return False
    for i, (name, recs) in enumerate(series.items()):
        pts = [(r["state_bytes"], r["state_bytes"] / median(r) / 1e9) for r in recs if median(r)]
        if not pts or name == SNAPSHOT_FLOOR:
            continue
        xs, ys = zip(*sorted(pts), strict=True)
        style = _line_style(recs[0], i)
        ax.plot([x / 2**20 for x in xs], ys, marker="o", ms=3, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("checkpoint size (MiB)")
    ax.set_ylabel("durable GB/s")
    ax.set_title(f"Durable throughput ({target})", fontsize=9)
    ax.legend(fontsize=6)
    return True


def draw_variables(ax, idx: Index, target: str) -> bool:
    series = _series(idx, "variables", target)
    if not series:
        return False
    for i, (name, recs) in enumerate(series.items()):
        pts = sorted((r["variables"], median(r)) for r in recs if median(r))
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = _line_style(recs[0], i)
        ax.plot(xs, ys, marker="o", ms=3, label=name, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("variables")
    ax.set_ylabel("save time (s)")
    ax.set_title(f"Per-variable overhead ({target})", fontsize=9)
    ax.legend(fontsize=6)
    return True


def draw_threads(ax, idx: Index, target: str) -> bool:
    recs = [r for r in idx.select("threads", target) if r["available"]]
    ours = sorted((r["threads"], r) for r in recs if r["family"] == "fastckpt")
    if not ours:
        return False
    xs = [n for n, _ in ours]
    ax.plot(
        xs,
        [r["state_bytes"] / median(r) / 1e9 for _, r in ours],
        marker="o",
        label="fastckpt .weights.h5",
    )
    floor = next((r for r in recs if r["contender"] == WRITE_FLOOR), None)
    if floor:
        ax.axhline(
            floor["state_bytes"] / median(floor) / 1e9,
            color="black",
            ls="--",
            label="write floor, 1 thread",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("writer threads")
    ax.set_ylabel("durable GB/s")
    ax.set_title(f"Writer threads, {recs[0]['case']} ({target})", fontsize=9)
    ax.legend(fontsize=7)
    return True


def draw_load(ax, idx: Index, target: str) -> bool:
    recs = [r for r in idx.select("load", target) if r["available"]]
    if not recs:
        return False
    ax.barh(
        [r["contender"] for r in recs],
        [median(r) for r in recs],
        color=[_color(r, i) for i, r in enumerate(recs)],
    )
    ax.set_xlabel("load time (s)")
    ax.set_title(f"Load, {recs[0]['case']} ({target})", fontsize=9)
    ax.invert_yaxis()
    ax.tick_params(labelsize=7)
    return True


def write_plots(results: dict[str, Any], out: str) -> list[str]:
    """One PNG per figure (a panel per target) and `summary.png`; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = Index(results["records"])
    targets = list(results["machine"]["targets"])
    written = []
    figures = {
        "stall.png": (draw_stall, "stall"),
        "throughput.png": (draw_throughput, "throughput"),
        "threads.png": (draw_threads, "threads"),
        "variables.png": (draw_variables, "variables"),
        "load.png": (draw_load, "load"),
    }
    for name, (draw, section) in figures.items():
        present = [t for t in targets if idx.select(section, t)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(6.5 * len(present), 4.2), squeeze=False)
        for ax, t in zip(axes[0], present, strict=True):
            draw(ax, idx, t)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)
    disk = "disk" if "disk" in targets else targets[0]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    drawn = [
        draw_stall(axes[0][0], idx, disk),
        draw_throughput(axes[0][1], idx, disk),
        draw_variables(axes[1][0], idx, targets[0]),
        draw_load(axes[1][1], idx, disk),
    ]
    if any(drawn):
        for ax, ok in zip([a for row in axes for a in row], drawn, strict=True):
            if not ok:
                ax.set_axis_off()
        fig.suptitle(
            f"fastckpt bench ({results['mode']}), {results['machine']['cpu_model']}, "
            f"{results['machine']['cpus_usable']} cores",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(os.path.join(out, "summary.png"), dpi=110)
        written.append("summary.png")
    plt.close(fig)
    return written
