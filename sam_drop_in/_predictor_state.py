"""The image state shared by SamPredictor and SamOnnxPredictor, committed in one place.

Torch-free (the ONNX Runtime predictor uses it without torch): an embedding is anything with
``ndim`` 4, a torch tensor or a numpy array.
"""

from typing import Any, Tuple

from ._errors import InputError
from ._locking import LockedState, serialised


class PredictorState(LockedState):
    """``set_embedding`` / ``reset_image`` / ``get_image_embedding`` and the attributes upstream's
    SamPredictor has (``features``, ``original_size``, ``input_size``, ``is_image_set``,
    ``orig_h``, ``orig_w``, ``input_h``, ``input_w``). Code that assigns those attributes by hand
    (e.g. Caption-Anything) keeps working: predict reads only them. The methods hold the
    predictor's ``lock`` (``_locking``); the subclass calls ``_init_lock()`` first thing."""

    @serialised
    def set_embedding(self, features: Any, original_size: Tuple[int, ...], input_size: Tuple[int, ...]) -> None:
        """
        Makes the predictor ready to predict on an image embedding, exactly as after ``set_image``
        (which commits through this method once its encoder call has succeeded).

        Arguments:
          features (torch.Tensor or np.ndarray): 1xCxHxW image embedding (1x256x64x64 for SAM),
            as ``get_image_embedding()`` returns it.
          original_size (tuple(int, int)): (H, W) of the image before resizing.
          input_size (tuple(int, int)): (H, W) after ResizeLongestSide, before padding.

        Raises ``InputError`` for features that are not 4-D or a size that is not two integers;
        the predictor's state is then unchanged.
        """
        if getattr(features, "ndim", None) != 4:
            raise InputError(f"features must be a 1xCxHxW embedding, got {type(features).__name__} "
                             f"of shape {tuple(getattr(features, 'shape', ()))}.")
        try:
            original_size, input_size = (tuple(int(s) for s in size) for size in (original_size, input_size))
        except (TypeError, ValueError):
            original_size = input_size = ()
        if len(original_size) != 2 or len(input_size) != 2:
            raise InputError("original_size and input_size must each be (H, W), two integers.")
        self.reset_image()
        self.original_size = original_size
        self.input_size = input_size
        self.orig_h, self.orig_w = original_size
        self.input_h, self.input_w = input_size
        self.features = features
        self.is_image_set = True

    @serialised
    def get_image_embedding(self) -> Any:
        """The embedding of the set image, 1xCxHxW (C = 256, H = W = 64 for SAM), float32."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    @serialised
    def reset_image(self) -> None:
        """Forgets the set image and its embedding."""
        self.is_image_set = False
        self.features = None
        self.orig_h = None
        self.orig_w = None
        self.input_h = None
        self.input_w = None
