"""`fit` with each checkpoint callback of the stall figure, and without one.

The stall per checkpoint is (a callback's row - the no-callback row) / CHECKPOINTS; pass
`--benchmark-columns=median,min,max` and read the two rows side by side."""

import os

import pytest

from fastckpt.bench import contenders

EVERY = 3
CHECKPOINTS = 2
STEPS = EVERY * (CHECKPOINTS + 1) - 1

CALLBACKS = [c for c in contenders.callback_contenders() if c.available]


def test_fit_without_callback(benchmark, training_setup):
    benchmark.pedantic(training_setup.fit, args=(STEPS,), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("contender", CALLBACKS, ids=lambda c: c.label)
def test_fit_with_callback(benchmark, contender, training_setup, target):
    path = os.path.join(target, f"cb{contender.suffix}" if contender.suffix else "orbax")

    def fit():
        training_setup.fit(STEPS, [contender.make(path, EVERY)])

    benchmark.extra_info["checkpoints"] = CHECKPOINTS
    benchmark.pedantic(fit, rounds=5, warmup_rounds=1)
