"""SamPredictor's API on ONNX Runtime alone: numpy, pillow and onnxruntime, no torch.

Typical use, after ``sam-drop-in export-onnx --checkpoint ... --model-type vit_t
--output decoder.onnx --encoder-output encoder.onnx``::

    from sam_drop_in.onnx_predictor import SamOnnxPredictor
    predictor = SamOnnxPredictor("encoder.onnx", "decoder.onnx")
    predictor.set_image(rgb_uint8_image)
    masks, scores, low_res_logits = predictor.predict(point_coords=np.array([[x, y]]),
                                                      point_labels=np.array([1]))

Inputs, outputs, shapes, dtypes and error messages are those of ``SamPredictor``. This module
must not import torch (directly or through its imports): it is tested with torch blocked.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ._constants import PIXEL_MEAN, PIXEL_STD  # upstream's, for files without our metadata
from ._locking import serialised
from ._predictor_state import PredictorState
from ._validation import check_box, check_image, check_mask_input, check_point_prompts, check_resizable, to_float32
from .utils.transforms import ResizeLongestSide

__all__ = ["SamOnnxPredictor", "ResizeLongestSideNumpy"]

# Keys of the metadata that onnx_export writes into every file (metadata_props, JSON values).
METADATA_PREFIX = "sam_drop_in."


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "SamOnnxPredictor needs onnxruntime: pip install 'sam-drop-in[onnx]' (or pip install onnxruntime)."
        ) from e
    return onnxruntime


# The torch predictor's transform; its numpy methods import no torch. The old name stays public.
ResizeLongestSideNumpy = ResizeLongestSide


def session_metadata(session) -> Dict[str, Any]:
    """The ``sam_drop_in.*`` metadata of an ONNX Runtime session: prefix removed, values decoded."""
    raw = session.get_modelmeta().custom_metadata_map
    return {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in raw.items() if k.startswith(METADATA_PREFIX)}


PathOrBytes = Union[str, "os.PathLike[str]", bytes]


class SamOnnxPredictor(PredictorState):
    """``SamPredictor`` on ONNX Runtime: ``set_image`` runs the exported encoder once,
    ``predict`` runs the exported decoder per prompt set.

    Thread safety as ``SamPredictor``: calls on one predictor hold ``self.lock`` (an ``RLock``)
    and run one at a time; hold ``with predictor.lock:`` across ``set_image`` and the predicts
    that must see that image.

    The encoder may be exported with or without preprocessing (both are handled); the decoder
    must be exported with ``return_single_mask=False`` (the default) so that both
    ``multimask_output`` settings can be served, as SamPredictor does. Files exported by
    upstream's script work too (defaults: image size 1024, upstream's pixel mean and std).
    """

    def __init__(
        self,
        encoder_path: PathOrBytes,
        decoder_path: PathOrBytes,
        providers: Optional[Sequence[Any]] = None,
        sess_options: Any = None,
    ) -> None:
        """
        Arguments:
          encoder_path (str, PathLike or bytes): ONNX image encoder (``export_encoder``).
          decoder_path (str, PathLike or bytes): ONNX decoder (``export_decoder``).
          providers (list or None): ONNX Runtime execution providers; default CPU.
          sess_options (onnxruntime.SessionOptions or None): e.g. to set intra-op threads.
        """
        self._init_lock()
        ort = _import_onnxruntime()
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]

        def session(path):
            if not isinstance(path, bytes):
                path = os.fspath(path)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"ONNX model not found: {path!r}. Export one with `sam-drop-in export-onnx`.")
            return ort.InferenceSession(path, sess_options=sess_options, providers=providers)

        self.encoder_session = session(encoder_path)
        self.decoder_session = session(decoder_path)
        enc_meta = session_metadata(self.encoder_session)
        dec_meta = session_metadata(self.decoder_session)
        for meta, expected, path in ((enc_meta, "encoder", encoder_path), (dec_meta, "decoder", decoder_path)):
            if meta.get("kind", expected) != expected:
                raise ValueError(
                    f"{path!r} is an exported {meta['kind']}, not a {expected}; check the argument order "
                    "SamOnnxPredictor(encoder_path, decoder_path)."
                )

        enc_input = self.encoder_session.get_inputs()[0]
        self._encoder_input_name = enc_input.name
        # The preprocessing variant takes a rank-3 HxWx3 image; the bare encoder a rank-4 batch.
        self.include_preprocessing = bool(enc_meta.get("include_preprocessing", len(enc_input.shape) == 3))
        self.img_size = int(enc_meta.get("img_size", dec_meta.get("img_size", 1024)))
        self.pixel_mean = np.asarray(enc_meta.get("pixel_mean", PIXEL_MEAN), np.float32).reshape(3, 1, 1)
        self.pixel_std = np.asarray(enc_meta.get("pixel_std", PIXEL_STD), np.float32).reshape(3, 1, 1)
        self.mask_threshold = float(dec_meta.get("mask_threshold", 0.0))

        self._decoder_outputs = [o.name for o in self.decoder_session.get_outputs()]
        missing = {"masks", "iou_predictions", "low_res_masks"} - set(self._decoder_outputs)
        if missing:
            raise ValueError(f"{decoder_path!r} lacks decoder outputs {sorted(missing)}; export it with export_decoder.")
        num_masks = self.decoder_session.get_outputs()[self._decoder_outputs.index("iou_predictions")].shape[-1]
        if dec_meta.get("return_single_mask", num_masks == 1):
            raise ValueError(
                f"{decoder_path!r} was exported with return_single_mask=True; SamOnnxPredictor needs all "
                "masks. Export the decoder again without --return-single-mask."
            )
        embed_shape = self.decoder_session.get_inputs()[0].shape
        self._mask_input_size = int(embed_shape[2]) * 4 if isinstance(embed_shape[2], int) else 256

        self.transform = ResizeLongestSide(self.img_size)
        self.reset_image()

    @serialised
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the image embedding of ``image`` for later ``predict`` calls.

        Arguments:
          image (np.ndarray): HxWx3 image, uint8 with values in [0, 255] or float with values in
            [0, 1] (as SamPredictor). Each side must be at least 1 pixel once the long side is
            scaled to img_size.
          image_format (str): channel order of ``image``, 'RGB' or 'BGR'.

        Raises ``InputError`` (a ValueError and an AssertionError) for a bad image or format; the
        previously set image, if any, stays set.
        """
        rgb = check_image(image, image_format)
        check_resizable(rgb.shape[0], rgb.shape[1], self.img_size)
        resized = self.transform.apply_image(rgb)  # h x w x 3 uint8, long side img_size
        if self.include_preprocessing:
            feed = resized.astype(np.float32)
        else:
            # Sam.preprocess in numpy: normalise in float32, zero-pad bottom/right.
            chw = (resized.transpose(2, 0, 1).astype(np.float32) - self.pixel_mean) / self.pixel_std
            feed = np.zeros((1, 3, self.img_size, self.img_size), np.float32)
            feed[0, :, : chw.shape[1], : chw.shape[2]] = chw
        features = self.encoder_session.run(None, {self._encoder_input_name: feed})[0]
        self.set_embedding(features, image.shape[:2], resized.shape[:2])  # only after the encoder succeeded

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
        """Predict masks for prompts on the image set with ``set_image``.

        Arguments:
          point_coords (np.ndarray or None): Nx2 point prompts, (X, Y) in pixels of the original image.
          point_labels (np.ndarray or None): N labels, 1 foreground, 0 background, -1 padding
            (the point is ignored). 2 and 3 (the decoder's box corners) are refused: use box=.
          box (np.ndarray or None): length-4 box, XYXY in pixels of the original image.
          mask_input (np.ndarray or None): 1x256x256 low-resolution logits, typically from a
            previous call's third output.
          multimask_output (bool): return 3 masks instead of 1.
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
        mask_input = check_mask_input(mask_input, self._mask_input_size)

        # Decoder convention (upstream's ONNX example): box corners are points labelled 2 and 3;
        # without a box a padding point (0, 0) labelled -1 is appended, as the prompt encoder does.
        all_coords = [np.zeros((0, 2))]
        all_labels = [np.zeros((0,))]
        if coords is not None:
            all_coords.append(to_float32(self.transform.apply_coords(coords, self.original_size), "point_coords"))
            all_labels.append(labels.astype(np.float64))
        if box is not None:
            all_coords.append(to_float32(self.transform.apply_boxes(box, self.original_size), "box").reshape(2, 2))
            all_labels.append(np.array([2.0, 3.0]))
        elif coords is not None:
            all_coords.append(np.zeros((1, 2)))
            all_labels.append(np.array([-1.0]))
        size = self._mask_input_size
        mask_feed = np.zeros((1, 1, size, size), np.float32) if mask_input is None else mask_input[None]  # float32

        feeds = {
            "image_embeddings": self.features,
            "point_coords": np.concatenate(all_coords).astype(np.float32)[None],
            "point_labels": np.concatenate(all_labels).astype(np.float32)[None],
            "mask_input": mask_feed,
            "has_mask_input": np.array([mask_input is not None], np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
        }
        outputs = dict(zip(self._decoder_outputs, self.decoder_session.run(None, feeds)))
        # Output 0 is the single-mask token, 1..3 the multimask ones (as MaskDecoder.forward).
        pick = slice(1, None) if multimask_output else slice(0, 1)
        masks = outputs["masks"][0, pick]
        scores = outputs["iou_predictions"][0, pick].astype(np.float32)
        low_res = outputs["low_res_masks"][0, pick].astype(np.float32)
        masks = masks.astype(np.float32) if return_logits else masks > self.mask_threshold
        return masks, scores, low_res
