"""Stage 2's readers: each backend's way from a plan's variables to host arrays.

A reader gives every value of a plan either as host arrays (`__call__`: views of the
backend's own buffers where it allows, for a save that holds them or copies them into the
arena) or straight into an arena's buffers (`read_into`). Where the values live on an
accelerator, every one of them goes through the arena, in one batched transfer:

- TensorFlow: one `ReadVariableOp` per variable through the eager fast path (~14 us,
  against ~160 us for Keras's `convert_to_numpy`), then on a CPU a DLPack view of the
  buffer; on an NVIDIA GPU, DLPack capsules of the device buffers, copied by the CUDA
  driver into the pinned arena (`_fastckpt.copy_from_dlpack`).
- JAX: on a CPU, every transfer started before any is waited for (`copy_to_host_async`),
  then numpy views of the buffers; on an NVIDIA GPU, DLPack capsules copied by the CUDA
  driver into the pinned arena, as for TensorFlow; on other accelerators, the started
  transfers' host copies, copied into the arena. JAX buffers are never lent to a write:
  Keras's jitted steps donate the state they are given.
- torch: on a CPU, numpy views of the parameters' storage (which the optimizer updates in
  place, so a view is only valid until the next step); on a CUDA device, non-blocking
  copies into pinned arena buffers on a side stream that first waits for the training
  stream, and one wait.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from fastckpt import _fastckpt
from fastckpt._walk import SavePlan
from fastckpt.formats import numpy_dtype

# Variables at least this large are copied into the reused arena by readers of host
# memory; smaller ones are copied one by one.
LARGE_BYTES = 256 << 10
# Arena buffers start on a page, so the writer can send them to disk with direct I/O
# without going through a bounce buffer.
PAGE = 4096


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def page_aligned(size: int) -> np.ndarray:
    """Fresh memory of `size` bytes (zeros, not yet faulted in), starting on a page: a
    mapping of its own, in small pages.

    Not numpy's allocator, which asks for transparent huge pages for large arrays: a huge
    page takes a whole free 2 MiB block, which on a VM that hands free memory back to its
    host (virtio-balloon free page reporting) is exactly the memory the host has dropped,
    so touching it first costs 5-7x more (576 MiB: 0.7-1.2 s against 0.17 s in small
    pages, README "Training while a checkpoint is written"); copies into the buffer once
    touched ran at the same speed either way.
    """
    block = mmap.mmap(-1, max(size, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(block, np.uint8)[:size]


@dataclasses.dataclass
class HostBlock:
    """The memory of one arena.

    Attributes:
        array: the bytes, page-aligned.
        pinned: what keeps them pinned for device-to-host copies (a torch pinned tensor,
            or a CUDA driver registration), or None for plain memory; pinned memory is
            resident already, so it needs no faulting in.
    """

    array: np.ndarray
    pinned: Any = None


class Reader:
    """Reads every value of a plan; `dtypes[i]` is the dtype of value i as read (under JAX
    with x64 off, a float64 variable holds float32 values, and saves them: as Keras does).

    Attributes:
        views_outlive_steps: whether the host arrays `__call__` returns stay valid whatever
            the model does next (else only until the next training or evaluation step).
        on_device: the values live in accelerator memory: every one goes through the
            arena, in one batched device-to-host transfer, and there is no host buffer
            to lend.
    """

    dtypes: list[np.dtype]
    views_outlive_steps = False
    on_device = False

    def __call__(self) -> list[np.ndarray]:
        """Host arrays of every value, views of the backend's buffers where it allows."""
        raise NotImplementedError

    def arena_min_bytes(self) -> int:
        """Values at least this large go into the arena (on a device: all of them)."""
        return 0 if self.on_device else LARGE_BYTES

    def host_block(self, size: int) -> HostBlock:
        """New memory for an arena of `size` bytes."""
        return HostBlock(page_aligned(size))

    def read_into(self, views: dict[int, np.ndarray], state: dict[str, Any]) -> list[np.ndarray]:
        """Every value, those with an arena buffer (`views`, by value index) copied into it
        on every core, the others copied one by one unless they outlive training steps;
        `state` is the arena's, for the reader to keep what it derives from the arena
        between snapshots."""
        arrays = self()
        if not self.views_outlive_steps:
            arrays = [a if i in views else np.array(a) for i, a in enumerate(arrays)]
        pairs = []
        for i, dest in views.items():
            pairs.append((arrays[i], dest))
            arrays[i] = dest
        _fastckpt.copy_into(pairs)
        return arrays


def _pinned_block(size: int) -> HostBlock:
    """Page-aligned memory pinned with the CUDA driver (plain memory if it cannot be)."""
    array = page_aligned(size)
    return HostBlock(array, _fastckpt.pin_host(array))


def values_readable_off_thread() -> bool:
    """Whether a thread other than the training thread may read the variables' values
    while `fit` runs. Not under JAX: a training step takes the values out of the
    variables (Keras's `_purge_model_variables`), and only a callback's `model` puts them
    back, on the training thread."""
    return bool(keras.backend.backend() != "jax")


def current_values(model: keras.Model) -> dict[int, Any]:
    """The values the model's, its metrics' and its optimizer's variables hold now, by
    `id` of the variable: read on the training thread, for a reader made on another
    (`values_readable_off_thread`). Only what they are (dtype, device) is used of them:
    under JAX a training step may donate them meanwhile."""
    variables = list(model.variables) + list(getattr(model, "metrics_variables", []))
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return {id(v): v.value for v in variables}


def value_of(variable: Any, values: Mapping[int, Any] | None) -> Any:
    """`variable`'s value, from `values` (`current_values`) where it is there."""
    if values is not None and id(variable) in values:
        return values[id(variable)]
    return variable.value


def reader_for(plan: SavePlan, values: Mapping[int, Any] | None = None) -> Reader | None:
    """The reader of a plan under the current backend, or None (then values are read one by
    one with `convert_to_numpy`); `values` (`current_values`) for a reader made off the
    training thread."""
    if plan.dynamic:
        return None
    name = keras.backend.backend()
    if name == "tensorflow":
        return _TensorFlowReader(plan)
    if name == "jax":
        return _JaxReader(plan, values)
    if name == "torch":
        return _TorchReader(plan, values)
    return None


# TensorFlow -------------------------------------------------------------------------------


class _DLPack:
    """Adapts TensorFlow's DLPack capsule to numpy's `from_dlpack` protocol."""

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        import tensorflow as tf

        return tf.experimental.dlpack.to_dlpack(self._tensor)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def _host_view(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU tensor's buffer without a copy, or a copy where DLPack
    cannot express the dtype (bfloat16) or the tensor lives on an accelerator."""
    try:
        if "CPU" in tensor.device:
            view: np.ndarray = np.from_dlpack(_DLPack(tensor))
            return view
    except (TypeError, ValueError, RuntimeError, BufferError):
        pass
    return np.asarray(tensor.numpy())


def _first_replica(variable: Any) -> Any:
    """The variable itself, or under a `tf.distribute` strategy (`MirroredStrategy`) its
    first replica's copy: replicas are kept equal on every update, and a save holds one."""
    import tensorflow as tf

    if isinstance(variable, tf.distribute.DistributedValues):
        return variable.distribute_strategy.experimental_local_results(variable)[0]
    return variable


class _TensorFlowReader(Reader):
    """Reads every variable of a plan with TensorFlow's fast-path eager op: large ones as
    views of their buffers (TensorFlow copies a variable's buffer on write while a read of
    it is referenced, so a view keeps the value of the snapshot), small ones as copies. On
    a GPU, all of them through the CUDA driver into the pinned arena."""

    views_outlive_steps = True

    def __init__(self, plan: SavePlan) -> None:
        from fastckpt import _keras_private

        self._read_op = _keras_private.tf_read_variable_op()
        tf_vars = [_first_replica(e.source.value) for e in plan.entries]
        self._handles = [(v.handle, v.dtype) for v in tf_vars]
        self._shapes = [tuple(v.shape) for v in tf_vars]
        self.dtypes = [
            numpy_dtype(keras.backend.standardize_dtype(e.source.dtype)) for e in plan.entries
        ]
        self._large = [
            nbytes(s, d) >= LARGE_BYTES for s, d in zip(self._shapes, self.dtypes, strict=True)
        ]
        on_gpu = any("GPU" in v.device for v in tf_vars)
        # Without the CUDA driver (another vendor's GPU) values still come through the
        # arena in one pass, each by TensorFlow's own (synchronous) copy.
        self.on_device = on_gpu
        self._cuda = on_gpu and _fastckpt.cuda_available()

    def __call__(self) -> list[np.ndarray]:
        read = self._read_op
        values = [read(handle, dtype) for handle, dtype in self._handles]
        out = []
        for tensor, shape, large in zip(values, self._shapes, self._large, strict=True):
            if large:
                out.append(_host_view(tensor).reshape(shape))
            else:
                out.append(np.asarray(tensor.numpy(), order="C"))
        return out

    def host_block(self, size: int) -> HostBlock:
        return _pinned_block(size) if self._cuda else super().host_block(size)

    def read_into(self, views: dict[int, np.ndarray], state: dict[str, Any]) -> list[np.ndarray]:
        if not self.on_device:
            return super().read_into(views, state)
        import tensorflow as tf

        read = self._read_op
        values = [read(handle, dtype) for handle, dtype in self._handles]
        pairs = []
        for i, dest in views.items():
            capsule = None
            if self._cuda:
                try:
                    capsule = tf.experimental.dlpack.to_dlpack(values[i])
                except (TypeError, ValueError, RuntimeError, tf.errors.InvalidArgumentError):
                    capsule = None  # a dtype DLPack cannot carry: TensorFlow copies it
            if capsule is None:
                dest[...] = np.asarray(values[i].numpy()).reshape(dest.shape)
            else:
                pairs.append((capsule, dest))
        # One wait for the device (the step that wrote the values), every copy queued, one
        # wait for the copies; the capsules hold the tensors until it returns.
        _fastckpt.copy_from_dlpack(pairs)
        return [views[i] for i in range(len(values))]


# JAX --------------------------------------------------------------------------------------


class _JaxReader(Reader):
    """Reads every variable of a plan under JAX. On a CPU: all device-to-host transfers are
    started before any is waited for, then each array is viewed as numpy (its own buffer,
    which stays valid only until the next training or evaluation step donates it: Keras's
    jitted steps donate the state they are given). On an NVIDIA GPU: DLPack capsules of the
    device buffers (each waits for its value, and keeps it from being donated until the
    capsule is dropped), copied by the CUDA driver into the pinned arena in one batch."""

    def __init__(self, plan: SavePlan, values: Mapping[int, Any] | None = None) -> None:
        self._variables = [e.source for e in plan.entries]
        held = [value_of(v, values) for v in self._variables]
        self.dtypes = [np.dtype(x.dtype) for x in held]
        # (The sharding, not `devices()`: a value read earlier may have been donated.)
        devices = [x.sharding.device_set for x in held]
        platforms = {d.platform for found in devices for d in found}
        self.on_device = bool(platforms - {"cpu"})
        # The driver's path takes single-device arrays on NVIDIA GPUs; sharded arrays,
        # and other accelerators, come through JAX's own host transfers.
        self._cuda = (
            self.on_device
            and platforms <= {"cpu", "gpu", "cuda"}
            and all(len(found) == 1 for found in devices)
            and _fastckpt.cuda_available()
        )

    def __call__(self) -> list[np.ndarray]:
        values = [v.value for v in self._variables]
        for value in values:
            value.copy_to_host_async()
        return [np.asarray(value, order="C") for value in values]

    def host_block(self, size: int) -> HostBlock:
        return _pinned_block(size) if self._cuda else super().host_block(size)

    def read_into(self, views: dict[int, np.ndarray], state: dict[str, Any]) -> list[np.ndarray]:
        if not self._cuda:
            return super().read_into(views, state)
        values = [v.value for v in self._variables]
        capsules = [values[i].__dlpack__() for i in views]
        _fastckpt.copy_from_dlpack(list(zip(capsules, views.values(), strict=True)))
        del capsules  # hands the buffers back to JAX, donatable again
        return [views[i] for i in range(len(values))]


# torch ------------------------------------------------------------------------------------


def _torch_host_view(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU tensor's storage (numpy has no bfloat16: viewed through
    int16 as ml_dtypes' bfloat16)."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        view: np.ndarray = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return view
    out: np.ndarray = tensor.numpy()
    return out


class _TorchReader(Reader):
    """Reads every variable of a plan under torch: on a CPU as numpy views of the
    parameters' storage (valid until the next step updates them in place); on CUDA by
    non-blocking copies into pinned arena buffers on a side stream, waited for once."""

    def __init__(self, plan: SavePlan, values: Mapping[int, Any] | None = None) -> None:
        import torch

        self._variables = [e.source for e in plan.entries]
        held = [value_of(v, values) for v in self._variables]
        self.dtypes = [numpy_dtype(keras.backend.standardize_dtype(t.dtype)) for t in held]
        cuda = [t.device for t in held if t.device.type == "cuda"]
        self.on_device = bool(cuda) or any(t.device.type != "cpu" for t in held)
        self._device = cuda[0] if cuda else None
        self._stream = None if self._device is None else torch.cuda.Stream(self._device)

    def __call__(self) -> list[np.ndarray]:
        out = []
        for variable in self._variables:
            value = variable.value
            if value.device.type != "cpu":
                value = value.detach().cpu()
            view = _torch_host_view(value)
            out.append(view if view.flags.c_contiguous else np.ascontiguousarray(view))
        return out

    def host_block(self, size: int) -> HostBlock:
        if self._device is None:
            return super().host_block(size)
        import torch

        # cudaHostAlloc'd memory: page-aligned and resident; torch's pinned allocator
        # rounds up and caches blocks, so a freed arena's memory is reused by the next.
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return HostBlock(pinned.numpy(), pinned)

    def read_into(self, views: dict[int, np.ndarray], state: dict[str, Any]) -> list[np.ndarray]:
        if not self.on_device:
            return super().read_into(views, state)
        import torch

        targets = state.get("torch")
        if targets is None:
            # torch tensors over the arena's numpy views (same memory: the pinned block,
            # or plain memory when the values are on a device without pinned memory).
            targets = state["torch"] = {i: _torch_over(view) for i, view in views.items()}
        values = [v.value for v in self._variables]
        if self._stream is None:
            for i, target in targets.items():
                target.copy_(values[i].detach().reshape(target.shape))
        else:
            stream = self._stream
            # The copies start once the training step that wrote the values has run;
            # they run beside whatever the training stream does next, and are waited
            # for once, before the arena is handed to the writer.
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                for i, target in targets.items():
                    target.copy_(values[i].detach().reshape(target.shape), non_blocking=True)
            stream.synchronize()
        return [views[i] for i in range(len(values))]


def _torch_over(view: np.ndarray) -> Any:
    """A torch tensor over a numpy array's memory, of the array's dtype and shape."""
    import torch

    if view.dtype.name == "bfloat16":
        return torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(view)
