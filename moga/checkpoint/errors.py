"""The one error type of moga.checkpoint: a file that cannot be loaded as asked; the message says why
and what to do."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A file that cannot be loaded as a Wan2.1 T2V checkpoint; the message says why and what to do."""
