"""Exceptions raised by more than one module, kept apart so that none of them imports another's.

`CheckpointError` is raised by the loader (gemma2.checkpoint) and by the int8 placement it calls
(gemma2.quantize); `except CheckpointError` catches every way a checkpoint can be wrong.
"""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the model it claims to be."""
