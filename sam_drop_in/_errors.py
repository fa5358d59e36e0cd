"""Exception types shared by the predictor, the generators and the ONNX predictor.

This module imports nothing heavy: the ONNX Runtime predictor uses it without torch.
"""


class InputError(ValueError, AssertionError):
    """Bad user input (image, prompt or argument).

    segment_anything signals bad input with ``assert``. Code written against it catches
    ``AssertionError``; code written for us may catch ``ValueError``. This type is both, and
    unlike a bare ``assert`` it is still raised under ``python -O``.
    """
