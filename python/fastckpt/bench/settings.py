"""How much each mode measures. The default run fits in 15 minutes on 2 cores."""

from __future__ import annotations

import dataclasses

from fastckpt.bench.measure import GIB, MIB

SECTIONS = (
    "wholefit",
    "throughput",
    "threads",
    "variables",
    "stall",
    "slowdown",
    "load",
    "memory",
)

# The Keras backends the whole-fit section can run under (each where it is importable).
BACKENDS = ("tensorflow", "jax", "torch")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes, counts and repetitions for one run.

    Attributes:
        sizes: checkpoint sizes of the throughput figure.
        reps / reps_large: interleaved rounds per case (large: 1 GiB and up).
        legacy_h5_max: largest size at which the legacy `.h5` writers run (Keras's is slow).
        thread_counts / thread_size: the writer-thread scaling figure.
        variable_counts: the per-variable figure.
        stall_weight_bytes: weights of the training model (a checkpoint holds ~3x with Adam).
        stall_checkpoints / stall_every: checkpoints per `fit`, one every so many steps.
            Far enough apart that a background write, which uses idle CPU only, ends
            before the next checkpoint (480 MiB took up to 3.2 s of training on 2 cores):
            at 6 steps (0.8 s) the next save waited for it, and the stall measured the
            machine's write bandwidth rather than the checkpoint's own cost.
        stall_formats: the suffixes fastckpt's callback saves to in the stall figure.
        slowdown_saves: background saves timed step by step.
        memory_saves: background saves watched for peak RSS (flat over many saves).
        memory_keras: also probe Keras's savers' memory (each a fresh process, ~10 s).
    """

    mode: str
    sizes: tuple[int, ...]
    reps: int
    reps_large: int
    legacy_h5_max: int
    thread_counts: tuple[int, ...]
    thread_size: int
    variable_counts: tuple[int, ...]
    variable_reps: int
    stall_weight_bytes: int
    stall_checkpoints: int
    stall_every: int
    stall_reps: int
    stall_formats: tuple[str, ...]
    slowdown_saves: int
    memory_saves: int
    memory_keras: bool
    load_reps: int

    def reps_for(self, nbytes: int) -> int:
        return self.reps_large if nbytes >= GIB else self.reps


QUICK = Settings(
    mode="quick",
    sizes=(32 * MIB,),
    reps=2,
    reps_large=2,
    legacy_h5_max=0,
    thread_counts=(1, 2),
    thread_size=32 * MIB,
    variable_counts=(200,),
    variable_reps=2,
    stall_weight_bytes=8 * MIB,
    stall_checkpoints=2,
    stall_every=3,
    stall_reps=2,
    stall_formats=(".weights.h5", ".keras"),
    slowdown_saves=3,
    memory_saves=3,
    memory_keras=False,
    load_reps=2,
)

DEFAULT = Settings(
    mode="default",
    sizes=(64 * MIB, 256 * MIB, GIB),
    reps=3,
    reps_large=3,
    legacy_h5_max=64 * MIB,
    thread_counts=(1, 2, 4, 8),
    thread_size=GIB,
    variable_counts=(10, 100, 1000, 3000),
    variable_reps=3,
    stall_weight_bytes=160 * MIB,
    stall_checkpoints=2,
    stall_every=24,
    stall_reps=3,
    stall_formats=(".weights.h5", ".keras"),
    slowdown_saves=8,
    memory_saves=12,
    memory_keras=True,
    load_reps=3,
)

FULL = dataclasses.replace(
    DEFAULT,
    mode="full",
    sizes=(64 * MIB, 256 * MIB, GIB, 4 * GIB),
    reps=5,
    reps_large=5,
    legacy_h5_max=GIB,
    variable_counts=(10, 100, 1000, 3000, 10_000, 20_000),
    variable_reps=5,
    stall_checkpoints=3,
    stall_every=32,
    stall_reps=5,
    stall_formats=(".weights.h5", ".keras", ".safetensors"),
    slowdown_saves=10,
    memory_saves=200,
    load_reps=5,
)

MODES = {"quick": QUICK, "default": DEFAULT, "full": FULL}
