"""What the crash and fault tests run in child processes (see `forkserver.py`), and the two
model states they save: state A and state B, every variable (model and optimizer) filled
with values that differ between the states, so a file can be told to hold exactly one.

Each task is `task(emit, **args)`: `emit(event, **fields)` reports to the parent test.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
import time
from pathlib import Path

import keras
import numpy as np
from keras.src import backend

import fastckpt
from fastckpt._fastckpt import testing
from fastckpt.bench.machine import may_raise_priority

SUFFIXES = {
    "safetensors": ".safetensors",
    "weights_h5": ".weights.h5",
    "keras": ".keras",
    "legacy_h5": ".h5",
}


def state_model(width: int = 256) -> keras.Model:
    """Dense -> BatchNormalization -> Dense -> Dense, Adam built: about 1.1M parameters
    (13 MB with the optimizer's slots) at width 1024."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(width, name="d2"),
            keras.layers.Dense(8, name="head"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def all_variables(model: keras.Model) -> list:
    return list(model.variables) + list(model.optimizer.variables)


def state_arrays(model: keras.Model, which: str) -> list[np.ndarray]:
    """The values of state `which` ("A" or "B") for every variable, in `all_variables`
    order. Every variable differs between the states."""
    seed = {"A": 1, "B": 2}[which]
    out = []
    for k, v in enumerate(all_variables(model)):
        dtype = np.dtype(backend.standardize_dtype(v.dtype))
        if dtype.kind == "f":
            arr = np.random.default_rng([seed, k]).standard_normal(v.shape).astype(dtype)
        else:
            arr = np.full(v.shape, seed * 1000 + k, dtype)
        out.append(arr)
    return out


def set_state(model: keras.Model, arrays: list[np.ndarray]) -> None:
    for v, a in zip(all_variables(model), arrays, strict=True):
        v.assign(a)


def _model_in_state(which: str, width: int) -> keras.Model:
    model = state_model(width)
    set_state(model, state_arrays(model, which))
    return model


# ---- tasks ---------------------------------------------------------------------------


def crash_loop(emit, path: str, writer: str = "fastckpt", width: int = 1024) -> None:
    """Saves state A, says "ready", then saves B, A, B, ... to `path` until killed."""
    model = state_model(width)
    states = [state_arrays(model, "A"), state_arrays(model, "B")]

    def save() -> None:
        if writer == "keras":
            model.save_weights(path)
        else:
            fastckpt.save(model, path)

    set_state(model, states[0])
    t0 = time.perf_counter()
    save()
    emit("ready", seconds=time.perf_counter() - t0)
    i = 0
    while True:
        i += 1
        set_state(model, states[i % 2])
        save()
        emit("saved", n=i)


def save_state(emit, path: str, which: str, width: int = 256, repeat: int = 1) -> None:
    """Saves state `which` to `path`, `repeat` times."""
    model = _model_in_state(which, width)
    emit("built")
    for _ in range(repeat):
        fastckpt.save(model, path)
    emit("saved")


def save_under_fsize_limit(emit, path: str, limit: int, width: int = 256) -> None:
    """Saves state B with RLIMIT_FSIZE below the file's size: the write must fail cleanly
    (EFBIG), not kill the process with SIGXFSZ (Python ignores that signal)."""
    model = _model_in_state("B", width)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    fastckpt.save(model, path)
    emit("saved")


def save_as_nobody(emit, path: str, width: int = 256) -> None:
    """Saves state B after dropping root (which bypasses permission checks) for nobody."""
    model = _model_in_state("B", width)
    # fastckpt imports what a save needs when first used, and nobody cannot read this
    # Python's library: import it all while still root.
    from fastckpt import api, formats

    for fmt in formats.FORMATS:
        assert fmt.impl is not None
    assert api.save is fastckpt.save
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    fastckpt.save(model, path)
    emit("saved")


def interrupt_wait(emit, path: str, delay_ms: int, width: int = 256) -> None:
    """Ctrl-C (SIGINT) while the main thread waits on a background save."""
    # Python's own handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored, and Python then installs none).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model = _model_in_state("B", width)
    testing.inject_delay(delay_ms)
    job = fastckpt.save(model, path, background=True)
    sent = threading.Event()

    def interrupt() -> None:
        time.sleep(0.2)
        sent.set()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt).start()
    t0 = time.perf_counter()
    try:
        job.wait()
        emit("not_interrupted", seconds=time.perf_counter() - t0, signalled=sent.is_set())
    except KeyboardInterrupt:
        emit("interrupted", seconds=time.perf_counter() - t0, done=job.done())
    testing.inject_delay(0)
    finished = job.wait(timeout=120)
    error = job.exception(timeout=0) if finished else None
    emit("finished", finished=finished, error=repr(error) if error else None)


def exit_during_background_save(emit, path: str, delay_ms: int, width: int = 256) -> None:
    """Starts a background save and returns at once: the server then ends this child with
    `sys.exit`, a normal interpreter exit with the writer thread still running."""
    model = _model_in_state("B", width)
    testing.inject_delay(delay_ms)
    fastckpt.save(model, path, background=True)
    emit("started", t=time.time())


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _error_info(e: BaseException) -> dict:
    return {
        "type": type(e).__name__,
        "mro": [c.__name__ for c in type(e).__mro__],
        "message": str(e)[:500],
    }


def load_hostile(emit, path: str, loader: str = "load", headroom_mb: int = 1024) -> None:
    """Loads a damaged or hostile file, then verifies it, under an address-space limit of
    `headroom_mb` above what the process already maps, with every unpickling entry point
    (and numpy.load, whose allow_pickle path unpickles) replaced by a tripwire."""
    import pickle

    from fastckpt.verify import verify

    tripped: list[str] = []

    def tripwire(name):
        def refuse(*args, **kwargs):
            tripped.append(name)
            raise RuntimeError(f"{name} was called while loading a checkpoint")

        return refuse

    pickle.load = tripwire("pickle.load")
    pickle.loads = tripwire("pickle.loads")
    pickle.Unpickler = tripwire("pickle.Unpickler")
    np.load = tripwire("numpy.load")
    model = state_model(64)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (headroom_mb << 20), hard))
    results: dict = {}
    try:
        if loader == "load_model":
            loaded = fastckpt.load_model(path)
        else:
            fastckpt.load(model, path)
            loaded = model
        values = [np.asarray(v.numpy()) for v in all_variables(loaded)]
        want = state_arrays(loaded, "A")
        results["load"] = {
            "ok": True,
            "matches_A": all(
                a.dtype == b.dtype and a.tobytes() == b.tobytes()
                for a, b in zip(values, want, strict=True)
            ),
        }
    except BaseException as e:
        results["load"] = _error_info(e)
    try:
        report = verify(path)
        results["verify"] = {"ok": report.ok, "problems": report.problems, "report": str(report)}
    except BaseException as e:
        results["verify"] = _error_info(e)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    emit("done", results=results, tripped=tripped, maxrss_kb=usage.ru_maxrss)


def fuzz_readers(emit, seeds: list[str], work: str, seconds: float, seed: int) -> None:
    """Runs the mutation fuzzer of `fuzz_readers.py` on `seeds` for `seconds`, under an
    address-space limit; every finding is emitted with the input's path."""
    import fuzz_readers

    data = [open(p, "rb").read() for p in seeds]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (1024 << 20), hard))
    found = []

    def on_finding(blob: bytes, message: str) -> None:
        if len(found) >= 20:  # enough to triage; the count is in the stats
            return
        keep = f"{work}.finding{len(found)}"
        with open(keep, "wb") as f:
            f.write(blob)
        found.append(keep)
        emit("finding", path=keep, message=message[:2000])

    stats = fuzz_readers.run(data, work, seconds, seed, on_finding)
    emit("stats", **stats)


def soak(emit, folder: str, saves: int, every: int, suffixes: list[str]) -> None:
    """One training run of a tiny model with a background save after every train step
    (rotating over `suffixes`), each awaited before the next; samples RSS, open file
    descriptors and threads every `every` saves."""
    import psutil

    model = state_model(64)
    x = np.random.default_rng(0).normal(size=(32, 64)).astype("float32")
    y = x[:, :8]
    proc = psutil.Process()
    for i in range(1, saves + 1):
        model.train_on_batch(x, y)
        path = os.path.join(folder, f"ckpt{suffixes[i % len(suffixes)]}")
        job = fastckpt.save(model, path, background=True)
        job.result(timeout=120)
        if i % every == 0:
            emit(
                "sample",
                saves=i,
                rss=proc.memory_info().rss,
                fds=len(os.listdir("/proc/self/fd")),
                threads=threading.active_count(),
                tasks=len(os.listdir("/proc/self/task")),
            )


def keras_zip_growth(emit, folder: str, saves: int) -> None:
    """RSS growth over `saves` `.keras` saves by fastckpt, then by Keras's own
    `model.save`, each after a warm-up."""
    import gc

    import psutil

    model = state_model(64)
    proc = psutil.Process()
    path = os.path.join(folder, "m.keras")
    for name, save in (
        ("fastckpt", lambda: fastckpt.save(model, path, background=True).result()),
        ("keras", lambda: model.save(path)),
    ):
        for _ in range(saves // 4):
            save()
        gc.collect()
        before = proc.memory_info().rss
        for _ in range(saves):
            save()
        gc.collect()
        emit("growth", writer=name, bytes=proc.memory_info().rss - before)


# Resuming after a kill (test_resume.py) ------------------------------------------------------


def _resume_model() -> keras.Model:
    """Deterministic: the same weights, data order and dropout masks in every process."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def resume_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 6)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")


def resume_training(
    emit,
    folder: str,
    epochs: int = 4,
    backup_freq="epoch",
    step_delay: float = 0.0,
    preemption: bool = True,
    background: bool = True,
    grace_period: float = 25.0,
) -> None:
    """Trains the resumable model with a `BackupAndRestore` and three `ModelCheckpoint`s
    (every 3 batches with `max_to_keep`, the best by loss, every epoch), emitting `step`
    after each batch; a killed run started again resumes from the backup. At the end the
    final state is saved with stock Keras (`final.weights.h5`)."""
    model = _resume_model()
    x, y = resume_data()

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            emit("step", batch=batch, epoch=self._epoch)
            if step_delay:
                time.sleep(step_delay)

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    callbacks = [
        fastckpt.ModelCheckpoint(
            os.path.join(folder, "ckpt", "{epoch}-{batch}.weights.h5"),
            save_weights_only=True,
            save_freq=3,
            max_to_keep=3,
            save_on_background=background,
        ),
        fastckpt.BackupAndRestore(
            os.path.join(folder, "backup"),
            save_freq=backup_freq,
            save_before_preemption=preemption,
            save_on_background=background,
            grace_period=grace_period,
        ),
        fastckpt.ModelCheckpoint(
            os.path.join(folder, "best.safetensors"),
            monitor="loss",
            save_best_only=True,
            save_weights_only=True,
            save_on_background=background,
        ),
        fastckpt.ModelCheckpoint(
            os.path.join(folder, "epochs", "{epoch}.keras"), save_on_background=background
        ),
        Steps(),
    ]
    emit("started", pid=os.getpid())
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    model.save_weights(os.path.join(folder, "final.weights.h5"))
    emit("done")


def thread_states() -> dict[int, tuple[str, int, int]]:
    """{tid: (name, policy, nice)} of this process's threads, from /proc/self/task."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # Fields after the name, from `state` (3rd in proc(5)): nice is the 19th, policy the 41st.
        out[int(task.name)] = (name, int(fields[41 - 3]), int(fields[19 - 3]))
    return out


def bytes_written_by_thread() -> dict[int, int]:
    """{tid: bytes the thread has passed to write syscalls} (`wchar` in /proc/.../io)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            io = (task / "io").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(task.name)] = int(io.split("wchar:")[1].split()[0])
    return out


# Written (to /dev/null) by `waited_save_marking_the_wait` just before it waits: where the
# wait begins in an strace log.
WAIT_MARK = b"fastckpt-test: waiting"


def waited_save_marking_the_wait(path: str, report: str, width: int = 4096) -> None:
    """A slowed one-thread background save, waited for once its writer has written, with
    `WAIT_MARK` written just before the wait; `report` gets the threads at nice 19 then and
    whether a thread could leave nice 19 again."""

    model = state_model(width)
    before = set(thread_states())
    testing.inject_delay(150)
    try:
        job = fastckpt.save(model, path, background=True, threads=1)
        deadline = time.monotonic() + 60
        low: list[int] = []
        while not low and time.monotonic() < deadline:
            written = bytes_written_by_thread()
            states = thread_states().items()
            at_19 = [t for t, (_, _, nice) in states if t not in before and nice == 19]
            low = at_19 if any(written.get(t, 0) for t in at_19) else []
            if not low:
                time.sleep(0.01)
        fd = os.open(os.devnull, os.O_WRONLY)
        os.write(fd, WAIT_MARK)
        os.close(fd)
        job.result()
    finally:
        testing.inject_delay(0)
    with open(report, "w") as f:
        json.dump({"may_raise": may_raise_priority(), "low": low, "size": os.path.getsize(path)}, f)
