"""`fastckpt verify PATH`: is this checkpoint whole? Structure and checksums, without a model.

What is checked depends on what the format records:
- `.safetensors`: the header (every offset and size against the file), then every tensor
  read against the CRC-32C that fastckpt stores per tensor (files written by other tools
  carry none: their payloads are read but cannot be checked).
- `.keras`: every zip member read through its CRC-32 (the zip format's own checksum, which
  covers the weights file), safe member names, no decompression bombs, then the weights
  file's structure as for `.weights.h5`.
- `.weights.h5`, `.weights.json` shards, legacy `.h5`: HDF5 checks its own metadata
  (superblock and object-header checksums); there is no checksum of the data in this
  format, so the payloads are read and bounds-checked but a flipped bit in them cannot be
  seen.
Memory stays bounded: payloads are summed in 1 MiB pieces where they lie (zstd frames as
they are decoded), zip members read in 1 MiB pieces; only what h5py alone can read
(chunked or filtered datasets) is read into memory, a batch at a time.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

from fastckpt import formats
from fastckpt._errors import CheckpointContentError
from fastckpt.formats import keras_zip

_PIECE = 1 << 20


@dataclasses.dataclass
class VerifyReport:
    """What `verify` found.

    Attributes:
        path: the file checked.
        format: its format, by suffix.
        ok: nothing wrong was found.
        tensors: tensors read.
        payload_bytes: their bytes.
        checksums: checksums that were checked and matched.
        unchecked: tensors whose data has no checksum in the file.
        problems: what is wrong, empty when `ok`.
    """

    path: str
    format: str
    ok: bool = True
    tensors: int = 0
    payload_bytes: int = 0
    checksums: int = 0
    unchecked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.path}: {'OK' if self.ok else 'DAMAGED'} ({self.format})"
        lines = [
            head,
            f"  {self.tensors} tensors, {self.payload_bytes} payload bytes, "
            f"{self.checksums} checksums verified, {self.unchecked} tensors without one",
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _check_zip_crcs(path: str, report: VerifyReport) -> None:
    with zipfile.ZipFile(path) as zf:
        keras_zip.check_zip_members(path, zf)
        for info in zf.infolist():
            with zf.open(info) as member:  # zipfile checks the CRC-32 at the member's end
                while member.read(_PIECE):
                    pass
            report.checksums += 1


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Checks a checkpoint's structure and every checksum it carries.

    Returns:
        A `VerifyReport`; `report.ok` is False with the reason in `report.problems` when
        the file is damaged, truncated, hostile or not a checkpoint.

    Raises:
        OSError: the file cannot be read at all (FileNotFoundError, PermissionError, ...).
        ValueError: the path's suffix names no checkpoint format.
    """
    path = os.fspath(path)
    report = VerifyReport(path, formats.format_for(path).name)
    try:
        if report.format == "keras":
            with formats.content_errors(path):
                _check_zip_crcs(path, report)
        checkpoint = formats.open_checkpoint(path, legacy=True)
        # Summed in place (zstd frames streamed through the decoder), never read into
        # arrays: a header's sizes cannot make this allocate. Checks the CRC-32C where
        # there is one.
        checkpoint.checksums()
        for info in checkpoint.tensors.values():
            report.tensors += 1
            report.payload_bytes += info.nbytes
            if info.crc32c is not None:
                report.checksums += 1
            elif report.format != "keras":  # a .keras file's data is under the zip's CRC
                report.unchecked += 1
    except CheckpointContentError as e:
        report.ok = False
        report.problems.append(str(e))
    return report
