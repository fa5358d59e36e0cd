"""SamAutomaticMaskGenerator: segment_anything's "everything" mode, same records, less work.

The records are those of ``segment_anything.SamAutomaticMaskGenerator`` for the same model and
image, and the structure is upstream's: ``generate`` -> ``_generate_masks`` -> ``_process_crop``
per crop -> ``_process_batch`` per ``points_per_batch`` points, then ``postprocess_small_regions``,
with upstream's signatures and MaskData fields, so a subclass that overrides any of them (as
CNOS and others do) changes what it would change upstream. The work differs only inside
``_process_batch``, and only where it cannot change a record:

- The predicted-IoU filter needs no mask, so it runs on the decoder's outputs before anything
  is upsampled; only its survivors are upsampled to full resolution (upstream upsamples all
  three masks of every prompt first).
- Stability is still computed on the full-resolution upsampled logits, exactly as upstream, but
  only for the IoU survivors, a few masks at a time; boxes and edge tests only for the
  stability survivors, each in one batched operation instead of a Python loop per mask.
- RLE encoding waits until the crop's box NMS has run, and then encodes only its survivors
  (upstream encodes every stability survivor, and most of them are suppressed). Until then a
  mask is kept bit-packed (np.packbits, H*W/8 bytes), and the RLE of the unpacked mask is the
  one it would have had. This is done when ``_process_batch`` is this class's own; a subclass
  that overrides it gets its records from its ``_process_batch`` as upstream.
- The decoder's per-image work is done once per crop (the predictor keeps it between batches).
- Nothing is deep-copied when batches and crops are concatenated.
"""

import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._errors import InputError
from ._validation import check_image
from .modeling import Sam
from .predictor import SamPredictor
from .utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    box_nms,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_data_to_records,
    mask_to_rle_pytorch,
    remove_small_regions,
    require_opencv,
    require_pycocotools,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

# Full-resolution float logits of this many masks exist at once while upsampling survivors
# (each is 4 MB at the 1024x1024 intermediate size): bounded memory, still batched.
_UPSAMPLE_CHUNK = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_generator_args(points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
                          stability_score_offset, box_nms_thresh, crop_n_layers, crop_nms_thresh, crop_overlap_ratio,
                          crop_n_points_downscale_factor, point_grids, min_mask_region_area, output_mode) -> None:
    """Refuse options that upstream would crash on later (ZeroDivisionError, IndexError, ...) or
    that silently keep nothing, with a message naming the option. InputError is a ValueError and
    an AssertionError, so handlers written for upstream's asserts still catch it."""
    if (points_per_side is None) == (point_grids is None):
        raise InputError("Exactly one of points_per_side or point_grid must be provided.")
    if output_mode not in _OUTPUT_MODES:
        raise InputError(f"Unknown output_mode {output_mode}.")
    if not _is_int(crop_n_layers) or crop_n_layers < 0:
        raise InputError(f"crop_n_layers must be an integer >= 0 (0: the whole image only), got {crop_n_layers!r}.")
    if not _is_real(crop_n_points_downscale_factor) or crop_n_points_downscale_factor < 1:
        raise InputError(
            "crop_n_points_downscale_factor must be a number >= 1 (crop layer i uses "
            f"points_per_side / factor**i points per side), got {crop_n_points_downscale_factor!r}."
        )
    if points_per_side is not None:
        if not _is_real(points_per_side) or points_per_side < 1:
            raise InputError(f"points_per_side must be a positive integer, got {points_per_side!r}.")
        last = int(points_per_side / (crop_n_points_downscale_factor**crop_n_layers))
        if last < 1:
            raise InputError(
                f"crop layer {crop_n_layers} would get no points: points_per_side / "
                f"crop_n_points_downscale_factor**crop_n_layers = {points_per_side} / "
                f"{crop_n_points_downscale_factor}**{crop_n_layers} < 1. Raise points_per_side or lower "
                "crop_n_layers or crop_n_points_downscale_factor."
            )
    else:
        if not isinstance(point_grids, (list, tuple)) or len(point_grids) < crop_n_layers + 1:
            n = len(point_grids) if isinstance(point_grids, (list, tuple)) else type(point_grids).__name__
            raise InputError(
                f"point_grids must be a list with one grid per crop layer (crop_n_layers + 1 = "
                f"{crop_n_layers + 1}), got {n}."
            )
        for i, grid in enumerate(point_grids[: crop_n_layers + 1]):
            shape = getattr(grid, "shape", None)
            if not isinstance(grid, np.ndarray) or grid.ndim != 2 or grid.shape[1] != 2 or grid.shape[0] == 0:
                raise InputError(
                    f"point_grids[{i}] must be a non-empty Kx2 numpy array of (x, y) in [0, 1], got "
                    f"{type(grid).__name__} of shape {shape}."
                )
    if not _is_int(points_per_batch) or points_per_batch <= 0:
        raise InputError(f"points_per_batch must be a positive integer, got {points_per_batch!r}.")
    for name, value, meaning in (("pred_iou_thresh", pred_iou_thresh, "0 keeps every predicted IoU"),
                                 ("stability_score_thresh", stability_score_thresh, "0 keeps every stability score"),
                                 ("box_nms_thresh", box_nms_thresh, "a box IoU; 1 keeps every box"),
                                 ("crop_nms_thresh", crop_nms_thresh, "a box IoU; 1 keeps every box")):
        if not _is_real(value) or not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be a number in [0, 1] ({meaning}), got {value!r}.")
    if not _is_real(stability_score_offset) or stability_score_offset < 0:
        raise InputError(f"stability_score_offset must be a number >= 0 (a logit shift), got {stability_score_offset!r}.")
    if not _is_real(crop_overlap_ratio) or not 0.0 <= crop_overlap_ratio < 1.0:
        raise InputError(
            f"crop_overlap_ratio must be a number in [0, 1) (a fraction of the short side), got {crop_overlap_ratio!r}."
        )
    if not _is_real(min_mask_region_area) or min_mask_region_area < 0:
        raise InputError(f"min_mask_region_area must be a number >= 0 (pixels; 0 disables), got {min_mask_region_area!r}.")
    if output_mode == "coco_rle":
        require_pycocotools()
    if min_mask_region_area > 0:
        require_opencv()


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        decode_batch_size: Optional[int] = None,
        progress: bool = False,
    ) -> None:
        """
        Generate masks for a whole image from a grid of point prompts, then drop low-quality
        and duplicate masks. Same arguments, attributes and results as segment_anything's
        SamAutomaticMaskGenerator; the two keyword-only arguments at the end are additions.

        Arguments:
          model (Sam): the SAM model to prompt.
          points_per_side (int or None): points along each side of the grid (points_per_side**2
            prompts). Exactly one of this and point_grids must be given.
          points_per_batch (int): prompts decoded together (upstream's batch size).
          pred_iou_thresh (float): keep masks whose predicted IoU is above this (0 disables).
          stability_score_thresh (float): keep masks whose stability score is at least this
            (0 disables).
          stability_score_offset (float): logit shift used by the stability score.
          box_nms_thresh (float): box IoU cutoff of the NMS within a crop.
          crop_n_layers (int): if >0, also run on crops; layer i has (2**i)**2 crops.
          crop_nms_thresh (float): box IoU cutoff of the NMS across crops.
          crop_overlap_ratio (float): overlap of first-layer crops, fraction of the short side.
          crop_n_points_downscale_factor (int): layer i uses points_per_side / factor**i points.
          point_grids (list(np.ndarray) or None): explicit Kx2 grids in [0, 1] (x, y), one per
            crop layer.
          min_mask_region_area (int): if >0, fill holes and remove islands smaller than this
            many pixels (needs OpenCV).
          output_mode (str): 'binary_mask', 'uncompressed_rle' or 'coco_rle' (needs pycocotools).
          decode_batch_size (int or None, keyword-only): prompts per mask-decoder call within
            each batch of points_per_batch (so at most points_per_batch); None means
            points_per_batch. Records do not depend on it beyond float rounding.
          progress (bool, keyword-only): show a tqdm progress bar over decoder batches.
        """
        _check_generator_args(
            points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, stability_score_offset,
            box_nms_thresh, crop_n_layers, crop_nms_thresh, crop_overlap_ratio, crop_n_points_downscale_factor,
            point_grids, min_mask_region_area, output_mode,
        )
        if decode_batch_size is not None and (not _is_int(decode_batch_size) or decode_batch_size <= 0):
            raise InputError(f"decode_batch_size must be a positive integer or None, got {decode_batch_size!r}.")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = point_grids

        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.decode_batch_size = decode_batch_size
        self.progress = progress

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """
        Generate masks for an image.

        Arguments:
          image (np.ndarray): HxWx3 uint8 RGB image.

        Returns:
          (list(dict)): one record per mask, with keys
            segmentation (np.ndarray HxW bool, or an RLE dict for the RLE output modes),
            area (int, pixels), bbox (list of 4 numbers, XYWH), predicted_iou (float),
            point_coords (list with one [x, y] in pixels), stability_score (float),
            crop_box (list of 4 numbers, XYWH). bbox and crop_box hold ints, or floats where
            upstream's would (a batch or crop that kept no mask makes its tensors float32).
        """
        image = check_image(image, "RGB")
        mask_data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            mask_data = self.postprocess_small_regions(
                mask_data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return mask_data_to_records(mask_data, self.output_mode)

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        """
        Masks of every crop, duplicates across crops removed (the smaller crop's mask wins).

        Arguments:
          image (np.ndarray): HxWx3 uint8 RGB image.

        Returns:
          (MaskData): numpy columns rles, boxes (XYXY, image frame), iou_preds, points (x, y,
            image frame), stability_score, crop_boxes (XYXY), plus any column a subclass's
            _process_crop or _process_batch adds.
        """
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)

        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))

        # Across crops prefer masks from smaller crops. Upstream crashes here when no crop kept
        # a mask; there is simply nothing to suppress.
        if len(crop_boxes) > 1 and len(data["rles"]) > 0:
            cb = torch.as_tensor(data["crop_boxes"])
            scores = 1 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data.filter(box_nms(data["boxes"], scores, self.crop_nms_thresh))

        data.to_numpy()
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: List[int],
        crop_layer_idx: int,
        orig_size: Tuple[int, ...],
    ) -> MaskData:
        """
        Masks of one crop: its points decoded in batches of points_per_batch by _process_batch,
        then box NMS within the crop, then moved to the image's frame.

        Arguments:
          image (np.ndarray): the whole HxWx3 uint8 RGB image.
          crop_box (list(int)): the crop, XYXY pixels.
          crop_layer_idx (int): its layer (selects the point grid).
          orig_size (tuple(int, int)): (H, W) of the whole image.

        Returns:
          (MaskData): torch columns rles (uncompressed RLE at orig_size), boxes (Nx4 XYXY, image
            frame), iou_preds (N), points (Nx2 float64, image frame), stability_score (N),
            crop_boxes (Nx4 XYXY int64; an empty float32 tensor when nothing is kept, as upstream).
        """
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        cropped_size = cropped.shape[:2]
        self.predictor.set_image(cropped)

        points_scale = np.array(cropped_size)[None, ::-1]
        points_for_image = self.point_grids[crop_layer_idx] * points_scale

        # RLE after NMS (see the module docstring), unless a subclass defines _process_batch.
        deferred = type(self)._process_batch is SamAutomaticMaskGenerator._process_batch
        data = MaskData()
        for (points,) in self._batches(points_for_image):
            if deferred:
                data.cat(self._filtered_batch(points, cropped_size, crop_box, orig_size, encode=False))
            else:
                data.cat(self._process_batch(points, cropped_size, crop_box, orig_size))
        self.predictor.reset_image()

        data.filter(box_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        if deferred:
            data = self._encode_packed(data, crop_box, orig_size)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        # A list of int lists gives int64; no rows gives an empty float32 tensor, which then
        # promotes every crop's boxes to float32 in the concatenation: upstream's record types.
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))])
        return data

    def _batches(self, points: np.ndarray):
        """``batch_iterator`` over points_per_batch points, with a tqdm bar when ``progress`` is set."""
        batches = batch_iterator(self.points_per_batch, points)
        if not self.progress:
            return batches
        from tqdm.auto import tqdm  # tqdm is a dependency; imported only when a bar is asked for

        return tqdm(batches, total=-(-len(points) // self.points_per_batch), desc="decoding prompts", unit="batch")

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: Tuple[int, ...],
        crop_box: List[int],
        orig_size: Tuple[int, ...],
    ) -> MaskData:
        """
        Decode a batch of single-point prompts (3 masks each) and keep the masks upstream keeps:
        predicted IoU above pred_iou_thresh, stability at least stability_score_thresh, box not
        on a crop edge that is not an image edge.

        Arguments:
          points (np.ndarray): Bx2 points (x, y) in pixels of the crop.
          im_size (tuple(int, int)): (h, w) of the crop.
          crop_box (list(int)): the crop, XYXY in the image.
          orig_size (tuple(int, int)): (H, W) of the whole image.

        Returns:
          (MaskData): upstream's columns, in prompt-major order of the kept masks:
            rles (list of uncompressed RLE at orig_size), boxes (Mx4 int64 XYXY, crop frame; an
            empty float32 0x4 when no mask passes the two score filters, as upstream's
            batched_mask_to_box gives), iou_preds (M float32), points (Mx2, the dtype of
            ``points``, crop frame), stability_score (M float32).
        """
        return self._filtered_batch(points, im_size, crop_box, orig_size)

    @torch.no_grad()
    def _filtered_batch(
        self,
        points: np.ndarray,
        im_size: Tuple[int, ...],
        crop_box: List[int],
        orig_size: Tuple[int, ...],
        covered: Optional[List[torch.Tensor]] = None,
        high_score_thresh: float = 0.0,
        encode: bool = True,
    ) -> MaskData:
        """The work of _process_batch, in decoder calls of decode_batch_size prompts.

        When ``covered`` is a list, it ends up holding one HxW bool tensor (crop frame), or-ed
        over calls: the union over stability survivors of their full-resolution logits >
        high_score_thresh (hierarchical mode).

        With ``encode=False`` the masks are not RLE-encoded: the column ``rles`` is replaced by
        ``packed``, an M x ceil(h*w/8) uint8 numpy array of the crop-frame masks, row-major,
        np.packbits' bit order (for :meth:`_encode_packed` after NMS).
        """
        step = self.decode_batch_size or len(points)
        rles: List[Any] = []
        boxes, ious, stabs, rows = [], [], [], []
        n_stable = 0
        masks_per_prompt = 3
        for start in range(0, len(points), step):
            low_res, iou, keep = self._decode_batch(points[start : start + step], im_size)
            masks_per_prompt = keep.shape[1]
            # Row of each IoU survivor among the batch's B x 3 masks (upstream's flattened order).
            kept_rows = keep.flatten().nonzero()[:, 0].cpu() + start * masks_per_prompt
            for c in range(0, low_res.shape[0], _UPSAMPLE_CHUNK):
                chunk_rles, bx, stab, sel, n = self._score_and_encode(
                    low_res[c : c + _UPSAMPLE_CHUNK], crop_box, orig_size, covered, high_score_thresh, encode
                )
                n_stable += n
                if len(chunk_rles) == 0:
                    continue
                if encode:
                    rles.extend(chunk_rles)
                else:
                    rles.append(chunk_rles)
                boxes.append(bx)
                stabs.append(stab)
                ious.append(iou[c : c + _UPSAMPLE_CHUNK][sel.to(iou.device)])
                rows.append(kept_rows[c : c + _UPSAMPLE_CHUNK][sel.cpu()])

        device = self.predictor.device
        if n_stable == 0:
            # Upstream's batched_mask_to_box on no masks: float32 zeros.
            box_t = torch.zeros(0, 4, device=device)
        else:
            box_t = torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.long, device=device)
        row_idx = torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64)
        if encode:
            masks: Dict[str, Any] = {"rles": rles}  # the first column, as upstream's records have it
        else:
            h, w = im_size
            masks = {"packed": np.concatenate(rles) if rles else np.zeros((0, (h * w + 7) // 8), dtype=np.uint8)}
        return MaskData(
            **masks,
            boxes=box_t,
            iou_preds=torch.cat(ious) if ious else torch.zeros(0, device=device),
            points=torch.as_tensor(points.repeat(masks_per_prompt, axis=0)[row_idx]),
            stability_score=torch.cat(stabs) if stabs else torch.zeros(0, device=device),
        )

    def _score_and_encode(
        self,
        low_res: torch.Tensor,
        crop_box: List[int],
        orig_size: Tuple[int, ...],
        covered: Optional[List[torch.Tensor]],
        high_score_thresh: float,
        encode: bool = True,
    ) -> Tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Upsample K low-res logits (Kx256x256), filter by stability and crop edge, encode.

        Returns (rles, boxes Mx4 int64, stability M, indices M of the kept rows, number of
        stability survivors before the edge filter). With ``encode=False``, instead of the RLE
        list an M x ceil(h*w/8) uint8 array of the bit-packed crop-frame masks.
        """
        model = self.predictor.model
        orig_h, orig_w = orig_size
        # The same upsampling as upstream's predict_torch, whose masks come three to a prompt
        # (N x 3 x h x w). Bilinear interpolation computes every plane on its own, but PyTorch's CPU
        # kernel is chosen by shape and thread count: on one thread a 3-channel float input takes
        # another kernel than a 1-channel one, and their values differ in the last bit (on more
        # threads both take the same one). So the kept masks go in three to a slice, padded with
        # empty planes, and every value is upstream's on any thread count.
        k = low_res.shape[0]
        pad = -k % 3
        if pad:
            low_res = torch.cat([low_res, low_res.new_zeros((pad, *low_res.shape[1:]))])
        logits = model.postprocess_masks(
            low_res.view(-1, 3, *low_res.shape[1:]), self.predictor.input_size, self.predictor.original_size
        ).flatten(0, 1)[:k]
        stab = calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset)
        idx = torch.arange(k, device=stab.device)
        if self.stability_score_thresh > 0.0:
            keep = stab >= self.stability_score_thresh
            if not bool(keep.all()):  # indexing copies the full-resolution logits even when all pass
                logits, stab, idx = logits[keep], stab[keep], idx[keep]
        n_stable = logits.shape[0]
        if covered is not None and n_stable > 0:
            hit = (logits > high_score_thresh).any(dim=0)
            if covered:
                covered[0] |= hit
            else:
                covered.append(hit)
        masks = logits > model.mask_threshold
        del logits
        bx = batched_mask_to_box(masks)
        if n_stable > 0:
            near = is_box_near_crop_edge(bx, crop_box, [0, 0, orig_w, orig_h])
            if bool(near.any()):
                masks, bx, stab, idx = masks[~near], bx[~near], stab[~near], idx[~near]
        if masks.shape[0] == 0:
            return [], bx, stab, idx, n_stable
        if not encode:
            return np.packbits(masks.cpu().numpy().reshape(masks.shape[0], -1), axis=1), bx, stab, idx, n_stable
        return mask_to_rle_pytorch(uncrop_masks(masks, crop_box, orig_h, orig_w)), bx, stab, idx, n_stable

    def _encode_packed(self, data: MaskData, crop_box: List[int], orig_size: Tuple[int, ...]) -> MaskData:
        """``data`` from ``_filtered_batch(encode=False)`` with its ``packed`` column replaced by
        ``rles`` (uncompressed RLE at orig_size), the first column as _process_batch has it.

        Unpacked a few masks at a time, so full-size bool masks of at most _UPSAMPLE_CHUNK masks
        exist at once.
        """
        packed = data["packed"]
        x0, y0, x1, y1 = crop_box
        h, w = y1 - y0, x1 - x0
        rles: List[Dict[str, Any]] = []
        for c in range(0, packed.shape[0], _UPSAMPLE_CHUNK):
            part = np.unpackbits(packed[c : c + _UPSAMPLE_CHUNK], axis=1, count=h * w).view(bool)
            masks = torch.from_numpy(part.reshape(-1, h, w)).to(self.predictor.device)
            rles.extend(mask_to_rle_pytorch(uncrop_masks(masks, crop_box, orig_size[0], orig_size[1])))
        return MaskData(rles=rles, **{k: v for k, v in data.items() if k != "packed"})

    def _decode_batch(
        self, points: np.ndarray, im_size: Tuple[int, ...]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode B single-point prompts (3 masks each) and apply the predicted-IoU filter.

        The same model calls as SamPredictor.predict_torch, without its full-resolution
        upsampling. The IoU filter needs no mask, so it comes first, and low-resolution logits
        are computed only for prompts with at least one mask that passes it.

        Returns:
          (torch.Tensor): Kx256x256 low-res logits of the K masks that pass, prompt-major order.
          (torch.Tensor): their K predicted IoUs.
          (torch.Tensor): Bx3 bool, which masks pass.
        """
        predictor = self.predictor
        transformed = predictor.transform.apply_coords(points, im_size)
        in_points = torch.as_tensor(transformed, device=predictor.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
        return predictor.image_decoder().decode_filtered(in_points[:, None, :], in_labels[:, None], self.pred_iou_thresh)

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """
        Fill small holes and remove small islands in every mask, then rerun box NMS, preferring
        masks that needed no change. Edits mask_data in place (and returns it). Needs OpenCV.

        Arguments:
          mask_data (MaskData): with 'rles' (list of uncompressed RLE) and 'boxes' (Nx4 XYXY,
            numpy or torch) and any other per-mask keys.
          min_area (int): regions with fewer pixels than this are removed or filled.
          nms_thresh (float): box IoU cutoff of the NMS.

        Returns:
          (MaskData): the same object, filtered; changed masks get new RLEs and boxes.
        """
        if len(mask_data["rles"]) == 0:
            return mask_data

        masks = []
        unchanged = []
        for rle in mask_data["rles"]:
            mask = rle_to_mask(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
            unchanged.append(not (changed_holes or changed_islands))

        masks_t = torch.stack(masks)
        boxes = batched_mask_to_box(masks_t)
        # Score 1 for untouched masks, 0 for changed ones, so NMS prefers the untouched.
        scores = torch.tensor([float(u) for u in unchanged])
        keep = box_nms(boxes, scores, nms_thresh)

        changed_kept = [int(i) for i in keep if not unchanged[int(i)]]
        if changed_kept:
            new_rles = mask_to_rle_pytorch(masks_t[changed_kept])
            for i, rle in zip(changed_kept, new_rles):
                mask_data["rles"][i] = rle
                mask_data["boxes"][i] = boxes[i] if isinstance(mask_data["boxes"], torch.Tensor) else boxes[i].numpy()
        mask_data.filter(keep)
        return mask_data

