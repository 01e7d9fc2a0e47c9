"""The exception tree. OS failures surface as the builtin `OSError` subclasses
(`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, ...); everything else that
fastckpt raises about a checkpoint is a `CheckpointError`."""


class CheckpointError(Exception):
    """A checkpoint could not be saved or loaded."""


class CheckpointContentError(CheckpointError, ValueError):
    """What a checkpoint holds (or was asked to hold) is wrong: a corrupt or hostile file,
    a checksum mismatch, a variable whose shape or dtype does not match the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError, ValueError):
    """No checkpoint file at the path. Both a `FileNotFoundError` (what the OS says) and a
    `ValueError` (what `keras.saving.load_model` raises for a missing file), so code
    written for either catches it."""
