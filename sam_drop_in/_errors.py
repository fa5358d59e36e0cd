"""Every exception type of the package: the predictor, the generators, the ONNX predictor and
the checkpoint loaders raise these.

This module imports nothing heavy: the ONNX Runtime predictor uses it without torch.
"""


class InputError(ValueError, AssertionError):
    """Bad user input (image, prompt or argument).

    segment_anything signals bad input with ``assert``. Code written against it catches
    ``AssertionError``; code written for us may catch ``ValueError``. This type is both, and
    unlike a bare ``assert`` it is still raised under ``python -O``.
    """


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint could not be found, read, recognised or matched to the model.

    A ``ValueError`` (the file's content is wrong for the request) and a ``RuntimeError`` (what
    torch's strict ``load_state_dict`` raised in segment_anything, so existing handlers work).
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The local file, or the Hub repo / revision / file, does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked to construct objects other than tensors; refused, nothing executed."""
