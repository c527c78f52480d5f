"""Torch-free reading and writing of the reference NAMM trainer's ``ckpt.pt``.

* :mod:`.reader` -- an allow-listed ``torch.save`` reader (no stock unpickling).
* :mod:`.writer` -- a ``torch.save``-compatible writer.
* :mod:`.reference` -- the trainer checkpoint's layout: the NAMM's parameter
  vector and normalisation buffers in, a reference-loadable state dict out.

Only the standard library and numpy are used.
"""

from .errors import CheckpointError
from .reader import load_torch_pickle
from .reference import (
    NORM_BINS,
    PARAM_LAYOUT,
    PARAM_SIZE,
    ReferenceCheckpoint,
    read_reference_checkpoint,
    write_reference_checkpoint,
)

__all__ = [
    "NORM_BINS",
    "PARAM_LAYOUT",
    "PARAM_SIZE",
    "CheckpointError",
    "ReferenceCheckpoint",
    "load_torch_pickle",
    "read_reference_checkpoint",
    "write_reference_checkpoint",
]
