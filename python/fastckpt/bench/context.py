"""What every section of a run shares: settings, target folders, progress and the records."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

from fastckpt.bench.measure import Progress, Stats
from fastckpt.bench.settings import Settings


@dataclasses.dataclass
class Context:
    """One benchmark run.

    Attributes:
        settings: what to measure and how often.
        targets: scratch folder per target ("tmpfs", "disk"), emptied after each case.
        progress: where progress lines go.
        backends: the Keras backends of the whole-fit section (empty: every one available).
        records: one dict per (section, target, case, contender); see `add`.
    """

    settings: Settings
    targets: dict[str, str]
    progress: Progress
    backends: tuple[str, ...] = ()
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def path(self, target: str, name: str) -> str:
        return os.path.join(self.targets[target], name)

    def add(
        self,
        section: str,
        target: str,
        case: str,
        contender: str,
        stats: dict[str, Stats] | None = None,
        *,
        family: str = "",
        available: bool = True,
        note: str = "",
        **extra: Any,
    ) -> dict[str, Any]:
        """Records one contender's figures for one case (or why it has none)."""
        record = {
            "section": section,
            "target": target,
            "case": case,
            "contender": contender,
            "family": family,
            "available": available,
            "note": note,
            "quantities": {k: v.to_json() for k, v in (stats or {}).items()},
            **extra,
        }
        self.records.append(record)
        return record

    def clear(self, target: str) -> None:
        """Empties a target's scratch folder (files a failed save may have left)."""
        folder = self.targets[target]
        for name in os.listdir(folder):
            full = os.path.join(folder, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                try:
                    os.unlink(full)
                except FileNotFoundError:
                    pass


def remove(path: str) -> None:
    """Deletes a file or folder a contender wrote; absent is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def file_bytes(path: str) -> int:
    """Size of a checkpoint: a file, or all files under a folder."""
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, n))
            for root, _, names in os.walk(path)
            for n in names
        )
    return os.path.getsize(path)
