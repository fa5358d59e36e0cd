"""SamAutomaticMaskGenerator: segment_anything's "everything" mode, same records, less work.

The records are those of ``segment_anything.SamAutomaticMaskGenerator`` for the same model and
image. The work differs only where it cannot change a record:

- The predicted-IoU filter needs no mask, so it runs on the decoder's outputs before anything
  is upsampled; only its survivors are upsampled to full resolution (upstream upsamples all
  three masks of every prompt first).
- Stability is still computed on the full-resolution upsampled logits, exactly as upstream, but
  only for the IoU survivors; boxes, edge tests and RLE only for the stability survivors, each in
  one batched operation instead of a Python loop per mask.
- Nothing is deep-copied when batches and crops are concatenated.
"""

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._errors import InputError
from .utils.amg import (
    MaskData,
    _import_cv2,
    _import_pycocotools,
    area_from_rle,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

if TYPE_CHECKING:  # pragma: no cover
    from .modeling import Sam

_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

# Full-resolution float logits of this many masks exist at once while upsampling survivors
# (each is 4 MB at the 1024x1024 intermediate size): bounded memory, still batched.
_UPSAMPLE_CHUNK = 16


def _make_predictor(model: "Sam") -> Any:
    from .predictor import SamPredictor

    return SamPredictor(model)


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Single-category NMS; the category tensor lives on the boxes' device (fixed upstream bug)."""
    from torchvision.ops.boxes import batched_nms  # type: ignore

    categories = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    return batched_nms(boxes.float(), scores.to(boxes.device), categories, iou_threshold=iou_threshold)


def _check_generator_args(
    points_per_side: Optional[int],
    point_grids: Optional[List[np.ndarray]],
    output_mode: str,
    min_mask_region_area: int,
    points_per_batch: int,
) -> None:
    if (points_per_side is None) == (point_grids is None):
        raise InputError("Exactly one of points_per_side or point_grid must be provided.")
    if output_mode not in _OUTPUT_MODES:
        raise InputError(f"Unknown output_mode {output_mode}.")
    if not isinstance(points_per_batch, (int, np.integer)) or points_per_batch <= 0:
        raise InputError(f"points_per_batch must be a positive integer, got {points_per_batch!r}.")
    if output_mode == "coco_rle":
        _import_pycocotools()
    if min_mask_region_area > 0:
        _import_cv2()


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: "Sam",
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
          decode_batch_size (int or None, keyword-only): prompts per mask-decoder call; None
            means points_per_batch. Records do not depend on it beyond float rounding.
          progress (bool, keyword-only): show a tqdm progress bar over decoder batches.
        """
        _check_generator_args(points_per_side, point_grids, output_mode, min_mask_region_area, points_per_batch)
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = point_grids
        if decode_batch_size is not None and decode_batch_size <= 0:
            raise InputError(f"decode_batch_size must be a positive integer or None, got {decode_batch_size!r}.")

        self.predictor = _make_predictor(model)
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
            area (int, pixels), bbox (list of 4 int, XYWH), predicted_iou (float),
            point_coords (list with one [x, y] in pixels), stability_score (float),
            crop_box (list of 4 int, XYWH).
        """
        image = self._check_image(image)
        mask_data = self._generate_masks(image)
        return self._postprocess_and_encode(mask_data)

    # -- steps -------------------------------------------------------------------------

    @staticmethod
    def _check_image(image: np.ndarray) -> np.ndarray:
        from ._validation import check_image

        return check_image(image, "RGB")

    def _postprocess_and_encode(self, mask_data: MaskData) -> List[Dict[str, Any]]:
        if self.min_mask_region_area > 0 and len(mask_data["rles"]) > 0:
            mask_data = self.postprocess_small_regions(
                mask_data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return _records(mask_data, self.output_mode)

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)

        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))

        # Across crops prefer masks from smaller crops. Upstream crashes here when no crop kept
        # a mask; there is simply nothing to suppress.
        if len(crop_boxes) > 1 and len(data["rles"]) > 0:
            cb = data["crop_boxes"]
            scores = 1 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data.filter(_batched_nms(data["boxes"], scores, self.crop_nms_thresh))

        data.to_numpy()
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: List[int],
        crop_layer_idx: int,
        orig_size: Tuple[int, ...],
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        cropped_size = cropped.shape[:2]
        self.predictor.set_image(cropped)

        points_scale = np.array(cropped_size)[None, ::-1]
        points = self.point_grids[crop_layer_idx] * points_scale
        data = self._decode_points(points, cropped_size, crop_box, orig_size)
        self.predictor.reset_image()

        data.filter(_batched_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor(crop_box, dtype=torch.long).repeat(len(data["rles"]), 1)
        return data

    def _decode_points(
        self,
        points: np.ndarray,
        im_size: Tuple[int, ...],
        crop_box: List[int],
        orig_size: Tuple[int, ...],
        covered: Optional[List[torch.Tensor]] = None,
        high_score_thresh: float = 0.0,
    ) -> MaskData:
        """Decode point prompts (pixels of the current image) and keep what upstream keeps.

        Returns MaskData with rles (uncropped to orig_size), boxes (XYXY, crop frame, int64),
        iou_preds, points (crop frame, float64) and stability_score, in prompt order x 3 masks.
        When ``covered`` is a list, it ends up holding one HxW bool tensor (crop frame): the union over
        stability survivors of their full-resolution logits > high_score_thresh (hierarchical mode).
        """
        device = self.predictor.device
        batch = self.decode_batch_size or self.points_per_batch

        rles: List[Dict[str, Any]] = []
        boxes, ious, stabs, pts_kept = [], [], [], []
        starts = range(0, len(points), batch)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="decoding prompts", unit="batch")
        for start in starts:
            pts = points[start : start + batch]
            low_res, iou, keep = self._decode_batch(pts, im_size)
            pts_rep = np.repeat(pts, keep.shape[1], axis=0)[keep.flatten().cpu().numpy()]
            for c in range(0, low_res.shape[0], _UPSAMPLE_CHUNK):
                out = self._score_and_encode(
                    low_res[c : c + _UPSAMPLE_CHUNK], crop_box, orig_size, covered, high_score_thresh
                )
                if out is None:
                    continue
                chunk_rles, bx, stab, sel = out
                rles.extend(chunk_rles)
                boxes.append(bx)
                stabs.append(stab)
                ious.append(iou[c : c + _UPSAMPLE_CHUNK][sel.to(iou.device)])
                pts_kept.append(pts_rep[c : c + _UPSAMPLE_CHUNK][sel.cpu().numpy()])

        return MaskData(
            rles=rles,
            boxes=torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.long, device=device),
            iou_preds=torch.cat(ious) if ious else torch.zeros(0, device=device),
            points=torch.as_tensor(np.concatenate(pts_kept) if pts_kept else np.zeros((0, 2))),
            stability_score=torch.cat(stabs) if stabs else torch.zeros(0, device=device),
        )

    def _score_and_encode(
        self,
        low_res: torch.Tensor,
        crop_box: List[int],
        orig_size: Tuple[int, ...],
        covered: Optional[List[torch.Tensor]],
        high_score_thresh: float,
    ) -> Optional[Tuple[List[Dict[str, Any]], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Upsample K low-res logits (Kx256x256), filter by stability and crop edge, encode.

        Returns (rles, boxes Mx4 int64, stability M, indices M of the kept rows) or None.
        """
        model = self.predictor.model
        orig_h, orig_w = orig_size
        # The same upsampling as upstream's predict_torch, one mask per channel slice: bilinear
        # interpolation treats every plane independently, so the values are identical.
        logits = model.postprocess_masks(low_res[:, None], self.predictor.input_size, self.predictor.original_size)[:, 0]
        stab = calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset)
        idx = torch.arange(low_res.shape[0], device=stab.device)
        if self.stability_score_thresh > 0.0:
            keep = stab >= self.stability_score_thresh
            logits, stab, idx = logits[keep], stab[keep], idx[keep]
        if covered is not None and logits.shape[0] > 0:
            hit = (logits > high_score_thresh).any(dim=0)
            if covered:
                covered[0] |= hit
            else:
                covered.append(hit)
        masks = logits > model.mask_threshold
        del logits
        bx = batched_mask_to_box(masks)
        near = is_box_near_crop_edge(bx, crop_box, [0, 0, orig_w, orig_h])
        if bool(near.any()):
            masks, bx, stab, idx = masks[~near], bx[~near], stab[~near], idx[~near]
        if masks.shape[0] == 0:
            return None
        return mask_to_rle_pytorch(uncrop_masks(masks, crop_box, orig_h, orig_w)), bx, stab, idx

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
        from .modeling.transformer import PROMPT_CHUNK
        from .predictor import _decoder_takes_image_side

        predictor = self.predictor
        model = predictor.model
        decoder = model.mask_decoder
        transformed = predictor.transform.apply_coords(points, im_size)
        in_points = torch.as_tensor(transformed, device=predictor.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
        sparse, dense = model.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]), boxes=None, masks=None)
        if not _decoder_takes_image_side(decoder):
            low_res, iou = decoder(
                image_embeddings=predictor.features,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            return low_res[keep], iou[keep], keep
        image_pe, image_side = predictor._decoder_image_side()
        # A few prompts at a time, each group's image tokens (4 MB per prompt) upscaled or
        # dropped right away instead of gathering a whole batch's.
        lows, ious, keeps = [], [], []
        for i in range(0, sparse.shape[0], PROMPT_CHUNK):
            tokens, image_tokens, (h, w) = decoder.decode_tokens(
                predictor.features, image_pe, sparse[i : i + PROMPT_CHUNK], dense[i : i + PROMPT_CHUNK],
                image_side=image_side,
            )
            iou = decoder.iou_prediction_head(tokens[:, 0, :])[:, 1:]  # multimask: tokens 1..3
            keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            prompts = keep.any(dim=1)
            if bool(prompts.all()):
                lows.append(decoder.mask_logits(tokens, image_tokens, h, w)[:, 1:][keep])
            elif bool(prompts.any()):
                lows.append(decoder.mask_logits(tokens[prompts], image_tokens[prompts], h, w)[:, 1:][keep[prompts]])
            ious.append(iou[keep])
            keeps.append(keep)
        low_res = torch.cat(lows) if lows else sparse.new_zeros(0, 4 * h, 4 * w)
        return low_res, torch.cat(ious), torch.cat(keeps)

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
        keep = _batched_nms(boxes, scores, nms_thresh)

        changed_kept = [int(i) for i in keep if not unchanged[int(i)]]
        if changed_kept:
            new_rles = mask_to_rle_pytorch(masks_t[changed_kept])
            for i, rle in zip(changed_kept, new_rles):
                mask_data["rles"][i] = rle
                mask_data["boxes"][i] = boxes[i] if isinstance(mask_data["boxes"], torch.Tensor) else boxes[i].numpy()
        mask_data.filter(keep)
        return mask_data


def _records(mask_data: MaskData, output_mode: str, whole_image_box: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """Turn MaskData (numpy, after to_numpy) into upstream's list of records."""
    rles = mask_data["rles"]
    n = len(rles)
    if n == 0:
        return []
    if output_mode == "coco_rle":
        segs = [coco_encode_rle(rle) for rle in rles]
    elif output_mode == "binary_mask":
        segs = [rle_to_mask(rle) for rle in rles]
    else:
        segs = rles

    def xywh(b: Any) -> List[Any]:
        b = np.array(b, copy=True)
        b[:, 2:] -= b[:, :2]
        return b.tolist()

    bboxes = xywh(np.asarray(mask_data["boxes"]))
    ious = np.asarray(mask_data["iou_preds"]).tolist()
    stabs = np.asarray(mask_data["stability_score"]).tolist()
    points = np.asarray(mask_data["points"]).tolist()
    if whole_image_box is not None:
        crop_boxes = [list(whole_image_box) for _ in range(n)]
    else:
        crop_boxes = xywh(np.asarray(mask_data["crop_boxes"]))
    return [
        {
            "segmentation": segs[i],
            "area": area_from_rle(rles[i]),
            "bbox": bboxes[i],
            "predicted_iou": ious[i],
            "point_coords": [points[i]],
            "stability_score": stabs[i],
            "crop_box": crop_boxes[i],
        }
        for i in range(n)
    ]
