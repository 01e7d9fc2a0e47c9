"""Stage 2: SavePlan -> host arrays, all taken at the same training step.

This is the only stage on the training thread. Each value becomes a C-contiguous numpy
array that the write job owns until the file is durable.
"""

from __future__ import annotations

import numpy as np
from keras.src import backend

from fastckpt._walk import SavePlan


def to_host(value) -> np.ndarray:
    """One value as a C-contiguous host array (bfloat16 stays ml_dtypes.bfloat16)."""
    # Not np.ascontiguousarray: it turns 0-d values into 1-d arrays.
    return np.asarray(backend.convert_to_numpy(value), order="C")


def snapshot(plan: SavePlan) -> list[np.ndarray]:
    """Host copies of every value in the plan, in plan order."""
    return [to_host(e.source) for e in plan.entries]
