"""`BackupAndRestore`: Keras's callback of that name (3.12-3.15), made to resume exactly.

Keras's files and semantics, so that a backup folder written by either is restored by the
other: `<backup_dir>/latest.weights.h5` (the model and optimizer state) and
`<backup_dir>/training_metadata.json` (`{"epoch": completed epochs, "batch": last batch}`),
`*.bkp` copies of the previous pair with `double_checkpoint`, the folder removed when
training ends with `delete_checkpoint`. What differs:

- Atomic and durable: the pair is one write that commits together (the weights file first,
  the metadata file last, each fsync'd and renamed, the folder fsync'd), in the background
  like `ModelCheckpoint`'s saves. The weights file also carries the whole training state
  (below), so it restores on its own: a crash between the two renames leaves fastckpt a
  consistent backup, and Keras the previous epoch number with the new weights.
- Exact: a backup records everything that decides what a `fit` does next, so a resumed
  run ends bit-identical to one that was never interrupted (with deterministic ops and
  seeds): the weights and optimizer (Keras's tree), the seed generators' states (which
  Keras's weight files leave out: dropout masks go on as they would have), the epoch and the
  step inside it (the resumed epoch skips the batches already trained: see
  `_keras_private.skip_steps_of_next_epoch` for when it cannot and starts the epoch over,
  as Keras does), the metrics' accumulators, Python's and NumPy's global random states
  (and torch's, under torch), and the state of every fastckpt callback of the same `fit`
  (`ModelCheckpoint`'s best value, counters and the files `max_to_keep` tracks). A backup
  commits only after the saves those callbacks still have in flight, so the files it
  counts on exist.
- `save_freq=False` means no periodic backups (Keras then backs up after every batch).
- Preemption: on SIGTERM (and any of `preemption_signals`) during `fit`, the backup of the
  current step is written once the step ends, the saves in flight complete, and the
  process then ends as the signal would have ended it; if the step does not end within
  `grace_period` seconds, the saves in flight complete and the signal takes its course.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
import warnings
from typing import Any

import keras
import numpy as np

from fastckpt import _fastckpt, _keras_private, _processes, _training_state, api, formats
from fastckpt import callbacks as _callbacks
from fastckpt._errors import CheckpointContentError

#: The attribute of a backup's weights file that holds the training state (JSON).
STATE_ATTR = "fastckpt.training_state"
#: Keras's suffix of the previous backup's files (`double_checkpoint`).
PREVIOUS_SUFFIX = ".bkp"
# How long preemption waits, by default, for the step in progress: cloud preemption
# notices and Kubernetes' default termination grace period are 30 s; this leaves time to
# write.
DEFAULT_GRACE_PERIOD_S = 25.0


class BackupAndRestore(keras.callbacks.Callback):
    """Backs the training state up to `backup_dir`, and resumes from it, exactly.

    A drop-in for `keras.callbacks.BackupAndRestore`: the same arguments, files and
    behaviour, plus atomic, durable, background backups, an exact resume inside an epoch,
    and preemption handling (see the module's documentation).

    Args:
        backup_dir: the folder of the backup (`latest.weights.h5`,
            `training_metadata.json`). It must not be shared with another `fit`.
        save_freq: `"epoch"` (a backup at each epoch's end), an integer (every that many
            batches), or `False` (none but on preemption).
        double_checkpoint: also keep the previous backup (`*.bkp`), restored when the
            latest one cannot be read.
        delete_checkpoint: remove `backup_dir` when training ends normally.
        save_before_preemption: back up, then end, on SIGTERM (see `preemption_signals`).
        preemption_signals: the signals that mean preemption (add `signal.SIGINT` to
            treat Ctrl-C so).
        grace_period: seconds to wait for the step in progress before giving up the
            preemption backup (the saves in flight still complete).
        save_on_background: `True` writes each backup in the background, `False` in the
            hook; `None` (the default) is `True` except under PyTorch on the CPU, as for
            `fastckpt.ModelCheckpoint`.

    Raises:
        ValueError: an empty `backup_dir`, or a `save_freq` that is not `"epoch"`, an
            integer or `False`.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        save_before_preemption: bool = True,
        *,
        preemption_signals: tuple[int, ...] = (signal.SIGTERM,),
        grace_period: float = DEFAULT_GRACE_PERIOD_S,
        save_on_background: bool | None = None,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError("Empty `backup_dir` argument passed")
        if save_freq is not False and save_freq != "epoch" and not isinstance(save_freq, int):
            raise ValueError(
                "Invalid value for argument `save_freq`. "
                f"Received: save_freq={save_freq}. "
                "Expected either 'epoch' or an integer value."
            )
        formats.check_local(os.fspath(backup_dir), "backup_dir")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.save_before_preemption = save_before_preemption
        self.preemption_signals = tuple(preemption_signals)
        self.grace_period = float(grace_period)
        # None: decided once the model is known (`callbacks.in_background`).
        self.save_on_background = None if save_on_background is None else bool(save_on_background)
        self._weights_path = os.path.join(self.backup_dir, "latest.weights.h5")
        self._training_metadata_path = os.path.join(self.backup_dir, "training_metadata.json")
        # Keras's counters, for `save_freq` batches.
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0
        # Where training is: the epoch in progress and the steps of it that ended.
        self._epoch = 0
        self._steps_done = 0
        self._completed_epochs = 0
        self._due = False  # a backup is due at the next point between two steps
        self._job: api.SaveJob | None = None
        # The kept file the backup in flight writes into, and the one the next one will.
        self._job_reuse: _callbacks._Spare | None = None
        self._kept: _callbacks._Spare | None = None
        self._preempted: int | None = None
        self._ending = False
        self._fit: _keras_private.RunningFit | None = None
        self._handlers: dict[int, Any] = {}
        self._resume: dict[str, Any] | None = None
        # Callback states of the backup for callbacks that register after this one.
        self._pending_states: dict[str, Any] = {}

    # Restore ---------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self.model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, "
                "you model must be built before you call `fit()`. "
                f"Model {self.model} is unbuilt. You can build it "
                "beforehand by calling it on a batch of data."
            )
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        try:
            self._restore(self._weights_path, self._training_metadata_path)
        except (OSError, CheckpointContentError) as e:
            # As Keras: an unreadable latest backup gives way to the previous one, which
            # takes its place (so that the next backup does not keep the bad one as
            # previous). Every process fails alike, on the same files.
            previous = f"{self._weights_path}{PREVIOUS_SUFFIX}"
            if not os.path.exists(previous):
                raise
            warnings.warn(
                f"fastckpt.BackupAndRestore: {self._weights_path} cannot be read ({e}); "
                f"resuming from the previous backup, {previous}",
                stacklevel=2,
            )
            if _processes.is_writer():
                _replace_with_copy(previous, self._weights_path)
                metadata = f"{self._training_metadata_path}{PREVIOUS_SUFFIX}"
                if os.path.exists(metadata):
                    _replace_with_copy(metadata, self._training_metadata_path)
                elif os.path.exists(self._training_metadata_path):
                    os.remove(self._training_metadata_path)
            _processes.barrier(f"fastckpt.BackupAndRestore({self.backup_dir!r}) fell back")
            self._restore(self._weights_path, self._training_metadata_path)
        # Every process has read the backup before process 0 writes the next one.
        _processes.barrier(f"fastckpt.BackupAndRestore({self.backup_dir!r}) restored")
        if _callbacks.in_background(self.save_on_background, self.model):
            # The snapshot buffer, then a file for the first backup to write into.
            arenas = api.prepare(self.model, buffers=1, owner=self)
            after = [a.prefault for a in arenas if a.prefault is not None]
            for path, job in api.reserve_spares(self.model, self._weights_path, 1, after=after):
                self._kept = _callbacks._Spare(os.fspath(path), job)
        self._install_signal_handlers()

    def _restore(self, weights: str, metadata: str) -> None:
        """Loads a backup written by fastckpt (exactly, from the state it carries) or by
        Keras (at the epoch level, from its metadata file)."""
        if not os.path.exists(weights):
            return
        checkpoint = formats.open_checkpoint(weights)
        api.load(self.model, weights)
        text = checkpoint.metadata.get(STATE_ATTR)
        if text is None:
            # Keras's own backup: the epoch from its metadata, the epoch's steps again.
            if os.path.exists(metadata):
                with open(metadata) as f:
                    epoch = int(json.load(f)["epoch"])
                _keras_private.set_initial_epoch(self.model, epoch)
                self._completed_epochs = epoch
            return
        state = json.loads(text)
        if state.get("version", 0) > _training_state.STATE_VERSION:
            raise CheckpointContentError(
                f"{weights}: written by a newer fastckpt, whose training state this one cannot read"
            )
        extras = checkpoint.read(list(checkpoint.extras))
        self._resume = {"state": state, "extras": extras}
        _keras_private.set_initial_epoch(self.model, state["epoch"])
        self._completed_epochs = state["epoch"]
        self._restore_seeds(state, extras, weights)
        random.setstate(_python_random_state(state["python_random"]))
        np.random.set_state(
            (
                "MT19937",
                extras[f"{formats.EXTRA_GROUP}/numpy_random/keys"],
                *state["numpy_random"],
            )
        )
        if state["steps_done"] == 0:
            # At an epoch's end: the next epoch's data iterator draws from torch's
            # generator when it is made, as it did in the interrupted run.
            _set_torch_random_states(_saved_torch_random_states(state, extras), weights)
        callbacks = _training_state.keyed(_training_state.registered(self.model))
        for key, value in state["callbacks"].items():
            if key in callbacks:
                callbacks[key].set_state(value)
            else:
                self._pending_states[key] = value
        if state["steps_done"] > 0:
            _keras_private.skip_steps_of_next_epoch(
                state["steps_done"], self._resume_mid_epoch, self._start_epoch_over
            )

    def _restore_seeds(self, state: dict[str, Any], extras: dict[str, Any], path: str) -> None:
        """The seed generators' states (dropout masks and other random draws go on as in
        the run that wrote the backup), when the model has the same generators."""
        saved = state.get("seeds", [])
        seeds = _keras_private.seed_states(self.model, create_global="global" in saved)
        if "global" not in saved:  # no unseeded draw had been made: none to go on from
            seeds = [(name, variable) for name, variable in seeds if name != "global"]
        if [name for name, _ in seeds] != saved:
            warnings.warn(
                f"{path}: the model's random seed generators are not the ones the backup "
                f"recorded ({len(seeds)} against {len(saved)}); they start afresh, so random "
                "draws (dropout masks, ...) differ from the interrupted run's",
                stacklevel=3,
            )
            return
        for i, (_, variable) in enumerate(seeds):
            variable.assign(extras[f"{formats.EXTRA_GROUP}/seeds/{i}"])

    def _resume_mid_epoch(self, batch: Any) -> None:
        """Just before the first step the resumed epoch trains: the metrics' accumulators
        as they were at the backup's step (once Keras has reset them for the epoch), so
        that the epoch's logs (and what callbacks decide from them) are the interrupted
        run's; and torch's generators, now that the epoch's data iterator has drawn from
        them when it was made, as the interrupted run's had before its backup."""
        assert self._resume is not None
        state, extras = self._resume["state"], self._resume["extras"]
        _set_torch_random_states(_saved_torch_random_states(state, extras), self._weights_path)
        _keras_private.build_compiled_metrics(self.model, batch)
        variables = list(self.model.metrics_variables)
        if len(variables) == len(state["metrics"]):
            for i, variable in enumerate(variables):
                variable.assign(extras[f"{formats.EXTRA_GROUP}/metrics/{i}"])
        else:
            warnings.warn(
                f"fastckpt.BackupAndRestore: the model has {len(variables)} metric "
                f"variables, the backup {len(state['metrics'])}; the metrics of epoch "
                f"{self._completed_epochs + 1} count only the steps trained from here",
                stacklevel=2,
            )
        self._steps_done = state["steps_done"]
        self._last_batch_seen = state["steps_done"] - 1
        self._resume = None

    def _start_epoch_over(self, reason: str) -> None:
        warnings.warn(
            f"fastckpt.BackupAndRestore resumes epoch {self._completed_epochs + 1} from its "
            f"first step, as Keras does: {reason}",
            stacklevel=2,
        )
        self._resume = None

    # When to back up ------------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._pending_states:
            callbacks = _training_state.keyed(_training_state.registered(self.model))
            for key, value in self._pending_states.items():
                if key in callbacks:
                    callbacks[key].set_state(value)
            self._pending_states = {}
        self._epoch = epoch
        self._steps_done = 0
        self._between_steps()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._between_steps()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps_done = batch + 1
        if self._should_save_on_batch(batch):
            self._due = True

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._completed_epochs = epoch + 1
        self._last_batch_seen = 0
        if self.save_freq == "epoch":
            self._due = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        error = None
        try:
            if self.delete_checkpoint:
                self._cancel_unbegun()  # a backup about to be deleted
                self._wait()
                if _processes.is_writer() and os.path.exists(self.backup_dir):
                    shutil.rmtree(self.backup_dir)
            else:
                if self._due:
                    self._backup(final=True)
                self._wait()
        except BaseException as e:
            error = e
        finally:
            self._restore_signal_handlers()
            self._drop_kept()
        _processes.settle(f"fastckpt.BackupAndRestore({self.backup_dir!r})", error)

    def _should_save_on_batch(self, batch: int) -> bool:
        """Keras's count of batches (`save_freq` an integer), with `steps_per_execution`."""
        if self.save_freq is False:
            self._last_batch_seen = batch  # for `training_metadata.json`'s "batch"
            return False
        if self.save_freq == "epoch":
            return False
        assert isinstance(self.save_freq, int)
        self._batches_seen_since_last_saving, due = _callbacks.batches_due(
            self._last_batch_seen, self._batches_seen_since_last_saving, batch, self.save_freq
        )
        self._last_batch_seen = batch
        return due

    def _between_steps(self) -> None:
        """A point where no step runs and every callback has seen the last one: where a
        backup records a state the resumed run can start from."""
        self._collect(wait=False)
        if self._preempted is not None:
            self._backup(final=True)
            self._end_for_signal()
        if self._due:
            self._backup(final=False)

    # Writing ------------------------------------------------------------------------------

    def _backup(self, final: bool) -> None:
        self._due = False
        os.makedirs(self.backup_dir, exist_ok=True)
        model = self.model
        metrics = list(model.metrics_variables)
        python_state = random.getstate()
        numpy_state = np.random.get_state(legacy=True)
        assert isinstance(numpy_state, tuple)  # legacy=True: ("MT19937", keys, ...)
        keys, position, has_gauss, cached = numpy_state[1:]
        others = _training_state.registered(model)
        seeds = _keras_private.seed_states(model)
        state = {
            "version": _training_state.STATE_VERSION,
            "epoch": self._completed_epochs if self._steps_done == 0 else self._epoch,
            "steps_done": self._steps_done,
            "keras": self._keras_metadata(),
            "metrics": [m.path for m in metrics],
            "seeds": [name for name, _ in seeds],
            "callbacks": {k: c.get_state() for k, c in _training_state.keyed(others).items()},
            "python_random": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy_random": [int(position), int(has_gauss), float(cached)],
        }
        tensors = [
            (f"metrics/{i}", np.array(keras.ops.convert_to_numpy(m))) for i, m in enumerate(metrics)
        ]
        tensors += [
            (f"seeds/{i}", np.array(keras.ops.convert_to_numpy(variable)))
            for i, (_, variable) in enumerate(seeds)
        ]
        tensors.append(("numpy_random/keys", np.asarray(keys)))
        torch_states = _torch_random_states()
        if torch_states:
            state["torch_random"] = [name for name, _ in torch_states]
            tensors += [(f"torch_random/{name}", value) for name, value in torch_states]
        # A newer backup replaces one not begun, except under `double_checkpoint`, whose
        # `.bkp` copy is the previous backup, as in Keras: every one is written.
        if self.double_checkpoint or not self._cancel_unbegun():
            self._wait()  # one backup in flight at a time: memory stays one snapshot
        queue_after: list[api.SaveJob | _fastckpt.Job] = [
            j for c in others for j in c.pending_jobs()
        ]
        reuse = self._kept if self._kept is not None and self._kept.usable() else None
        self._job_reuse, self._kept = reuse, None
        if reuse is not None and reuse.reserving is not None and not reuse.reserving.done():
            queue_after.append(reuse.reserving)  # written into once it is filled
        background = _callbacks.in_background(self.save_on_background, model) and not final
        self._job = api.start_save(
            model,
            self._weights_path,
            format="weights_h5",
            background=background,
            queue_after=queue_after,
            hold=True if final else None,
            reuse=None if reuse is None else reuse.path,
            # A kept file has a second name under `double_checkpoint` (the `.bkp`): the
            # writer would refuse to reuse it.
            keep_replaced=not self.double_checkpoint,
            extra=formats.Extra(attrs={STATE_ATTR: json.dumps(state)}, tensors=tensors),
            companions=[(self._training_metadata_path, json.dumps(state["keras"]).encode())],
            previous_suffix=PREVIOUS_SUFFIX if self.double_checkpoint else None,
        )
        if not background:
            self._wait()
        else:
            _callbacks._track(self._job)

    def _cancel_unbegun(self) -> bool:
        """Drops the backup in flight if its write has not begun (the file it was to write
        into is still ours); whether it did."""
        job = self._job
        if job is None or not job.cancel():
            return False
        _callbacks._IN_FLIGHT.discard(job)
        self._job, self._kept, self._job_reuse = None, self._job_reuse, None
        return True

    def _keras_metadata(self) -> dict[str, int]:
        """`training_metadata.json` as Keras writes it: completed epochs, last batch."""
        return {"epoch": self._completed_epochs, "batch": self._last_batch_seen}

    def _collect(self, wait: bool) -> None:
        """Takes the backup in flight once it has ended (waiting for it if `wait`): keeps
        the file it replaced for the next one, or raises its error, once."""
        job = self._job
        if job is None or (not wait and not job.done()):
            return
        while not job.wait(_callbacks._WAIT_SLICE_S):  # a Ctrl-C can interrupt the wait
            pass
        _callbacks._IN_FLIGHT.discard(job)
        self._job = None
        try:
            job.result()
        except BaseException:
            if self._job_reuse is not None:
                _callbacks._remove_spare(self._job_reuse)
            # The error ends `fit`, and Keras calls no `on_train_end` then: every kept
            # mapping goes (the spare stays behind, as a temp file).
            _fastckpt.release_mappings()
            raise
        finally:
            self._job_reuse = None
        self._kept = _callbacks._kept(job)

    def _wait(self) -> None:
        self._collect(wait=True)

    def _drop_kept(self) -> None:
        kept = [] if self._kept is None else [self._kept]
        _callbacks._drop_when_done(kept, release=_callbacks._identities([self._weights_path]))
        self._kept = None

    # Preemption -----------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if not self.save_before_preemption:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "fastckpt.BackupAndRestore cannot watch for preemption signals: fit is not "
                "running on the main thread",
                stacklevel=3,
            )
            return
        self._restore_signal_handlers()  # those of a `fit` that raised, if any
        self._fit = _keras_private.RunningFit()
        for signum in self.preemption_signals:
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._fit is None or (self._fit.found and not self._fit.is_running(frame)):
            # The `fit` raised, so `on_train_end` never put the handlers back: the signal
            # is not ours to handle.
            self._restore_signal_handlers()
            signal.raise_signal(signum)
            return
        if self._preempted is not None:
            return
        self._preempted = signum
        threading.Thread(
            target=self._watchdog, args=(signum, time.monotonic()), daemon=True
        ).start()

    def _watchdog(self, signum: int, since: float) -> None:
        """If the step in progress does not end in time, lets the saves in flight end and
        the signal take its course."""
        time.sleep(max(0.0, self.grace_period - (time.monotonic() - since)))
        if self._ending:
            return  # the step ended: the training thread is ending the process
        _callbacks.wait_for_saves_in_flight()
        _die_of(signum)

    def _end_for_signal(self) -> None:
        signum = self._preempted
        assert signum is not None
        self._ending = True
        _callbacks.wait_for_saves_in_flight()
        self._restore_signal_handlers()
        signal.raise_signal(signum)


def _die_of(signum: int) -> None:
    """Ends the process as `signum` ends it by default, from any thread: Python lets only
    the main thread change a signal's handler, and the main thread is stuck in a step."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signum, 0)  # SIG_DFL
    os.kill(os.getpid(), signum)
    time.sleep(1.0)
    os._exit(128 + signum)  # a signal whose default is not to end the process


def _replace_with_copy(source: str, target: str) -> None:
    """`target` becomes a second name of `source`, atomically and durably (a later write
    never changes a file in place that has two names: see `commit::reusable`)."""
    temp = f"{target}.fastckpt-restoring"
    with contextlib.suppress(FileNotFoundError):
        os.remove(temp)  # left by a crash in here
    os.link(source, temp)
    os.replace(temp, target)
    folder = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _python_random_state(saved: list[Any]) -> tuple[Any, ...]:
    return (saved[0], tuple(saved[1]), saved[2])


def _torch_random_states() -> list[tuple[str, np.ndarray]]:
    """Under torch, its global generators' states ("cpu", "cuda0", ...): Keras's torch
    backend draws from them where a seed generator was made without a seed (`Dropout()`'s
    masks go through `torch.nn.functional.dropout`), so a resumed run must go on from
    them as it does from its seed generators."""
    if keras.backend.backend() != "torch":
        return []
    import torch

    states = [("cpu", torch.get_rng_state().numpy().copy())]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, cuda in enumerate(torch.cuda.get_rng_state_all()):
            states.append((f"cuda{i}", cuda.numpy().copy()))
    return states


def _saved_torch_random_states(
    state: dict[str, Any], extras: dict[str, Any]
) -> list[tuple[str, np.ndarray]]:
    """What `_torch_random_states` recorded in a backup (nothing in one made elsewhere)."""
    names = state.get("torch_random", [])
    return [(name, extras[f"{formats.EXTRA_GROUP}/torch_random/{name}"]) for name in names]


def _set_torch_random_states(saved: list[tuple[str, np.ndarray]], path: str) -> None:
    """Puts back what `_torch_random_states` recorded; a backup from another backend (or
    none of torch's) leaves torch's generators as they are, and so does one from a machine
    with other GPUs, with a warning."""
    if not saved or keras.backend.backend() != "torch":
        return
    import torch

    for name, value in saved:
        state = torch.from_numpy(np.ascontiguousarray(value, dtype=np.uint8))
        if name == "cpu":
            torch.set_rng_state(state)
        elif torch.cuda.is_available() and int(name[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(state, int(name[4:]))
        else:
            warnings.warn(
                f"{path}: the backup recorded torch's random state of GPU {name[4:]}, which "
                "this machine does not have; its random draws differ from the interrupted "
                "run's",
                stacklevel=3,
            )
