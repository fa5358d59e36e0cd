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


class PromptShapeError(InputError, RuntimeError, IndexError):
    """A prompt of the wrong shape (points, labels, box, mask input, or their batch sizes).

    segment_anything fails on these deep inside the model with a ``RuntimeError`` or an
    ``IndexError`` (which one depends on the prompt and on torch's kernels). This type is both,
    besides an :class:`InputError`, so that handlers written for upstream's failure keep catching it.
    Other bad input (image, values, labels) raises a plain :class:`InputError`: upstream either
    asserts there or does not fail at all.
    """


class ImageDtypeError(InputError, TypeError):
    """An image of a dtype that cannot be an image (integers other than uint8, bool, objects).

    segment_anything's ``ResizeLongestSide.apply_image`` fails on these with torchvision's
    ``TypeError``; this type is one too, besides an :class:`InputError`.
    """


class WebRuntimeError(RuntimeError):
    """onnxruntime-web (the browser decoder's runtime of ``sam-drop-in serve``) could not be
    fetched or verified: npm missing, the fetch failed, or the tarball's hash is not the pinned one."""
