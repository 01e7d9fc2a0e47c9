"""Settings read from the environment, at every use (so they can change at run time), by
the code paths that need no framework (saves and conversions alike)."""

from __future__ import annotations

import os


def direct_io_allowed() -> bool:
    """Whether writes may use direct I/O: yes unless `FASTCKPT_DIRECT_IO` is `0`, `false`,
    `off` or `no`."""
    value = os.environ.get("FASTCKPT_DIRECT_IO", "")
    return value.strip().lower() not in ("0", "false", "off", "no")
