"""What the numbers were measured on: CPU, memory, file systems, library versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from importlib import metadata
from typing import Any

LIBRARIES = ("keras", "tensorflow", "numpy", "h5py", "safetensors", "fastckpt", "orbax-checkpoint")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def may_raise_priority() -> bool:
    """Whether a thread of this process may return from nice 19 to the main thread's nice
    value (`CAP_SYS_NICE`, or a `RLIMIT_NICE` that allows it): whether a waited write's
    writers may (most containers may not). Tried on a thread of its own."""
    result: list[bool] = []

    def attempt() -> None:
        main = os.getpriority(os.PRIO_PROCESS, os.getpid())
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, main)
            result.append(os.getpriority(os.PRIO_PROCESS, 0) == main)
        except PermissionError:
            result.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return result[0]


def memory_bytes() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def filesystem(path: str) -> dict[str, str]:
    """The mount holding `path`: its mount point, type and source, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    best: dict[str, str] = {"mount": "", "fstype": "unknown", "source": ""}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount = left.split()[4].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best["mount"]):
                    fstype, source = [*right.split(), "", ""][:2]
                    best = {"mount": mount, "fstype": fstype, "source": source}
    except OSError:
        pass
    return best


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        version = None
        for dist in (name, f"{name}-cpu"):
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        out[name] = version or "not installed"
    import fastckpt

    out["fastckpt"] = fastckpt.__version__
    return out


def fastckpt_build() -> dict[str, str]:
    """Where fastckpt was imported from, its git commit when run from a checkout, and the
    native module's file (a `dev-fast` in-place build is slower than the release wheel)."""
    import fastckpt
    from fastckpt import _fastckpt

    here = os.path.dirname(fastckpt.__file__)
    out = {"package": here, "native": getattr(_fastckpt, "__file__", "")}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if dirty:
            out["git_commit"] += "-dirty"
        # Within a checkout, paths relative to it: a report is committed with the code.
        top = subprocess.run(
            ["git", "-C", here, "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        out["package"] = os.path.relpath(out["package"], top)
        if out["native"]:
            out["native"] = os.path.relpath(out["native"], top)
    except (OSError, subprocess.SubprocessError):
        pass
    profile = os.environ.get("FASTCKPT_BUILD_PROFILE")
    if profile:
        out["profile"] = profile
    return out


def describe(targets: dict[str, str]) -> dict[str, Any]:
    """Everything about the machine a reader needs to judge the figures."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "memory": memory_bytes(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
        "fastckpt_build": fastckpt_build(),
        "targets": {name: {"path": path, **filesystem(path)} for name, path in targets.items()},
        "load_average_start": load_average(),
        "env": {
            k: os.environ[k]
            for k in ("KERAS_BACKEND", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")
            if k in os.environ
        },
    }
