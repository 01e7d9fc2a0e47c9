"""The Keras versions fastckpt is tested against.

fastckpt reuses Keras's private saving traversal (`keras.src.saving.saving_lib`) so that
names and order match Keras's own files exactly; that API changes between minor releases,
so outside the tested range fastckpt refuses to run rather than write a wrong file.
"""

import keras

SUPPORTED = ((3, 15), (3, 15))
SUPPORTED_TEXT = "keras>=3.15,<3.16"


def keras_version() -> tuple[int, int]:
    major, minor = keras.__version__.split(".")[:2]
    return int(major), int(minor)


def check_keras_version() -> None:
    """Raises ImportError naming the supported range when the installed Keras is outside it."""
    if not (SUPPORTED[0] <= keras_version() <= SUPPORTED[1]):
        raise ImportError(
            f"fastckpt supports {SUPPORTED_TEXT}, but keras {keras.__version__} is "
            f"installed. Install a supported version: pip install '{SUPPORTED_TEXT}'"
        )
