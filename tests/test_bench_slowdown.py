"""The step-slowdown bench's arithmetic (`fastckpt.bench.training._slowdown_rounds`) on a
clock of the test's own: each step takes a known time, so what a write took from training
in all is known exactly. No time is measured."""

import types

import pytest

from fastckpt.bench import training

QUIET, DURING = 10.0, 12.5


class _Writes:
    """Write k (from 1) keeps k + 1 steps busy; `fail_at` makes that write's finish raise."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.left = 0
        self.started = 0
        self.closed = False
        self.fail_at = fail_at

    def start(self) -> object:
        self.started += 1
        self.left = self.started + 1
        return self

    def done(self, job: object) -> bool:
        return self.left == 0

    def finish(self, job: object) -> None:
        if self.started == self.fail_at:
            raise OSError("the write failed")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def rounds(monkeypatch):
    """Runs `_slowdown_rounds` with `saves` writes on a fake clock: a step takes QUIET
    units, or DURING while a write is in flight."""
    now = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def run(writes: _Writes, saves: int) -> dict:
        def step(i: int) -> None:
            if writes.left:
                writes.left -= 1
                now[0] += DURING
            else:
                now[0] += QUIET

        ctx = types.SimpleNamespace(settings=types.SimpleNamespace(slowdown_saves=saves))
        setup = types.SimpleNamespace(step=step)
        return training._slowdown_rounds(ctx, setup, writes)

    return run


def test_lost_per_write_is_every_step_of_a_write_over_the_usual_step(rounds):
    writes = _Writes()
    stats = rounds(writes, saves=3)
    # Writes of 2, 3 and 4 steps, each step 2.5 units over the usual one.
    assert stats["lost_per_write"].runs == [5.0, 7.5, 10.0]
    assert stats["step_during_write"].runs == [DURING] * 9
    assert stats["step_quiet"].median == QUIET
    # The windows between writes grow with the writes (at least 4 steps).
    assert len(stats["step_quiet"].runs) == 4 + 4 + 4
    assert stats["write"].runs == [2 * DURING, 3 * DURING, 4 * DURING]
    assert writes.closed


def test_a_failed_write_raises_and_the_writes_are_still_closed(rounds):
    writes = _Writes(fail_at=2)
    with pytest.raises(OSError, match="the write failed"):
        rounds(writes, saves=3)
    assert writes.started == 2
    assert writes.closed
