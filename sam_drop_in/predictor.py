from typing import Optional, Tuple

import numpy as np
import torch

from ._errors import InputError, PromptShapeError
from ._locking import serialised
from ._predictor_state import PredictorState
from ._validation import (
    LABELS_HELP,
    check_box,
    check_image,
    check_mask_input,
    check_mask_magnitude,
    check_original_size,
    check_point_prompts,
    check_resizable,
    to_float32,
)
from .modeling import Sam
from .modeling.image_decoder import ImageDecoder
from .utils.transforms import ResizeLongestSide


class SamPredictor(PredictorState):
    def __init__(self, sam_model: Sam) -> None:
        """
        Computes the image embedding of an image once, then predicts masks for any number of
        prompts on it.

        One predictor may be shared by several threads: ``set_image``, ``set_torch_image``,
        ``predict``, ``predict_torch``, ``get_image_embedding`` and ``reset_image`` hold
        ``self.lock`` (a ``threading.RLock``), so calls on one predictor run one at a time and
        each sees one image's embedding and sizes, never a mix. To keep an image set for the
        predicts that follow, hold the lock across them::

            with predictor.lock:
                predictor.set_image(image)
                masks, scores, logits = predictor.predict(...)

        Arguments:
          sam_model (Sam): the model used for mask prediction.
        """
        super().__init__()
        self._init_lock()
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @serialised
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """
        Computes the image embedding of ``image`` for later ``predict`` calls.

        Arguments:
          image (np.ndarray): HxWx3 image, uint8 with values in [0, 255] or float with values in
            [0, 1] (converted as segment_anything does: multiplied by 255, truncated). Each side
            must be at least 1 pixel once the long side is scaled to the encoder's img_size
            (1024): e.g. at least 2 pixels for a long side of 3000.
          image_format (str): channel order of ``image``, 'RGB' or 'BGR'.

        Raises ``InputError`` (a ValueError and an AssertionError) for a bad image or format; the
        previously set image, if any, stays set.
        """
        rgb = check_image(image, image_format)
        check_resizable(rgb.shape[0], rgb.shape[1], self.transform.target_length)
        if self.model.image_format != "RGB":
            rgb = rgb[..., ::-1]
        input_image = self.transform.apply_image(rgb)
        input_image_torch = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(input_image_torch, image.shape[:2])

    @serialised
    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """
        Computes the image embedding of an image already resized with ResizeLongestSide.

        Arguments:
          transformed_image (torch.Tensor): 1x3xHxW, long side = the encoder's img_size (1024),
            values in [0, 255] (any real dtype).
          original_image_size (tuple(int, int)): (H, W) of the image before resizing, whole
            numbers >= 1 that resize to at least 1 pixel a side.
        """
        img_size = self.model.image_encoder.img_size
        if not (
            isinstance(transformed_image, torch.Tensor)
            and transformed_image.ndim == 4
            and transformed_image.shape[1] == 3
            and max(*transformed_image.shape[2:]) == img_size
            and min(*transformed_image.shape[2:]) >= 1
        ):
            raise InputError(f"set_torch_image input must be BCHW with long side {img_size}.")
        original_image_size = check_original_size(original_image_size, self.transform.target_length)
        # Compute first, then commit: a failure leaves the previous image set.
        input_image = self.model.preprocess(transformed_image)
        features = self.model.image_encoder(input_image)
        self.set_embedding(features, original_image_size, transformed_image.shape[-2:])

    @serialised
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """
        Predicts masks for prompts on the image set with ``set_image``.

        Arguments:
          point_coords (np.ndarray or None): Nx2 point prompts, (X, Y) in pixels of the original image.
          point_labels (np.ndarray or None): N labels, 1 foreground, 0 background, -1 padding
            (the point is ignored).
          box (np.ndarray or None): length-4 box, XYXY in pixels of the original image.
          mask_input (np.ndarray or None): 1x256x256 low-resolution logits, typically from a
            previous call's third output.
          multimask_output (bool): return 3 masks (better for ambiguous prompts such as one
            click) instead of 1.
          return_logits (bool): return un-thresholded logits instead of binary masks.

        Returns:
          (np.ndarray): CxHxW masks at the original size, bool (float32 logits if return_logits),
            C = 3 if multimask_output else 1.
          (np.ndarray): C float32 predicted quality (IoU) scores.
          (np.ndarray): Cx256x256 float32 low-resolution logits.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords, labels = check_point_prompts(point_coords, point_labels)
        box = check_box(box)
        mask_input = check_mask_input(mask_input)

        coords_torch = labels_torch = box_torch = mask_input_torch = None
        if coords is not None:
            coords = to_float32(self.transform.apply_coords(coords, self.original_size), "point_coords")
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = to_float32(self.transform.apply_boxes(box, self.original_size), "box")
            box_torch = torch.as_tensor(box, dtype=torch.float, device=self.device)[None]
        if mask_input is not None:
            mask_input_torch = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]

        masks, iou_predictions, low_res_masks = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_input_torch, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou_predictions[0].cpu().numpy(), low_res_masks[0].cpu().numpy()

    @serialised
    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Predicts masks for a batch of prompts already transformed with ResizeLongestSide.
        All B prompts share the image embedding, which is never copied per prompt.

        Arguments:
          point_coords (torch.Tensor or None): BxNx2 points, (X, Y) in the resized frame.
          point_labels (torch.Tensor or None): BxN labels, 1 foreground, 0 background, -1
            padding (the point is ignored; pads prompts with fewer points to N).
          boxes (torch.Tensor or None): Bx4 boxes, XYXY in the resized frame.
          mask_input (torch.Tensor or None): Bx1x256x256 low-resolution logits.
          multimask_output (bool): return 3 masks per prompt instead of 1.
          return_logits (bool): return logits instead of binary masks.

        Returns:
          (torch.Tensor): BxCxHxW masks at the original size, bool (float logits if return_logits).
          (torch.Tensor): BxC predicted quality scores.
          (torch.Tensor): BxCx256x256 low-resolution logits.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        _check_torch_prompts(point_coords, point_labels, boxes, mask_input)
        low_res_masks, iou_predictions = self.image_decoder().decode(
            point_coords, point_labels, boxes, mask_input, multimask_output
        )
        masks = self.model.postprocess_masks(low_res_masks, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res_masks

    @serialised
    def image_decoder(self) -> ImageDecoder:
        """
        The prompt encoder and mask decoder bound to the set image: the entry point that
        ``predict_torch`` and the mask generators decode prompts with. Kept between calls while
        the embedding and the weights are unchanged (``ImageDecoder.is_current``), so the decoder's
        per-image work is paid once per image, also when ``features`` is assigned directly.

        Returns:
          (ImageDecoder): see sam_drop_in.modeling.image_decoder.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if self._image_decoder is None or not self._image_decoder.is_current(self.model, self.features):
            self._image_decoder = ImageDecoder(self.model, self.features)
        return self._image_decoder

    @property
    def device(self) -> torch.device:
        return self.model.device

    @serialised
    def reset_image(self) -> None:
        """Forgets the set image, its embedding and the decoder's work kept for it."""
        super().reset_image()
        self._image_decoder = None


def _check_torch_prompts(point_coords, point_labels, boxes, mask_input) -> None:
    """Shape and value checks for predict_torch's batched prompts, so mistakes fail with a clear
    message instead of deep inside the decoder (shape errors are PromptShapeError, a RuntimeError
    and IndexError like upstream's failures there) or as NaN scores (values)."""
    batch = []
    if point_coords is not None:
        if point_labels is None:
            raise InputError("point_labels must be supplied if point_coords is supplied.")
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
            raise PromptShapeError(
                f"point_coords must be BxNx2 (X, Y in the resized frame), got {tuple(point_coords.shape)}."
            )
        if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise PromptShapeError(
                f"point_labels must be BxN matching point_coords {tuple(point_coords.shape)}, got {tuple(point_labels.shape)}."
            )
        _check_finite_float32(point_coords, "point_coords")
        if not bool(((point_labels == 1) | (point_labels == 0) | (point_labels == -1)).all()):
            bad = torch.unique(point_labels[(point_labels != 1) & (point_labels != 0) & (point_labels != -1)])
            raise InputError(f"{LABELS_HELP}; got {bad.tolist()}.")
        batch.append(("point_coords", point_coords.shape[0]))
    if boxes is not None:
        if boxes.ndim not in (2, 3) or boxes.shape[-1] != 4:
            raise PromptShapeError(f"boxes must be Bx4 (XYXY in the resized frame), got {tuple(boxes.shape)}.")
        _check_finite_float32(boxes, "boxes")
        batch.append(("boxes", boxes.reshape(-1, 4).shape[0]))
    if mask_input is not None:
        if mask_input.ndim != 4 or mask_input.shape[1] != 1:
            raise PromptShapeError(f"mask_input must be Bx1x256x256, got {tuple(mask_input.shape)}.")
        if mask_input.numel():
            check_mask_magnitude(float(mask_input.detach().abs().max()))
        batch.append(("mask_input", mask_input.shape[0]))
    if len({b for _, b in batch}) > 1:
        raise PromptShapeError("prompt batch sizes differ: " + ", ".join(f"{n} has {b}" for n, b in batch) + ".")


def _check_finite_float32(x: torch.Tensor, name: str) -> None:
    """Refuse prompt values that are not finite in float32, the precision the prompt encoder uses."""
    if x.is_floating_point() and not bool(torch.isfinite(x.detach().float()).all()):
        raise InputError(
            f"{name} has NaN or infinite values, or values too large for float32 (largest "
            f"{torch.finfo(torch.float32).max:.3g}). Pass coordinates in the resized frame."
        )
