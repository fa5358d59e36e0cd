"""SamHierarchicalMaskGenerator: TinySAM's two-pass "segment everything".

Pass 1 decodes a sparse grid (points_per_side // 4 per side) and keeps masks as the standard
generator does. Every pixel whose logit exceeds ``high_score_thresh`` in a kept mask counts as
covered. Pass 2 decodes the points of the dense grid around each sparse point (offsets -1, 0, 1,
2 strides in x and y, stride = image side // points_per_side, so each sparse point stands for a
4x4 block of the dense grid) that fall on uncovered pixels. Both passes are merged (pass 2
first) and one box NMS at ``box_nms_thresh`` removes duplicates. Where the sparse pass already
explains the image, most of the dense grid is never decoded.
"""

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ._errors import InputError
from ._validation import check_image
from .modeling import Sam
from .automatic_mask_generator import SamAutomaticMaskGenerator
from .utils.amg import MaskData, box_nms, build_point_grid, mask_data_to_records

# Dense-grid offsets (dx, dy), in strides, around each sparse point, in TinySAM's order: the
# 3x3 neighbourhood without its centre (dx outer), then the column at dx=+2, the row at dy=+2
# and the corner (+2, +2).
_OFFSETS = (
    [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    + [(2, dy) for dy in (-1, 0, 1)]
    + [(dx, 2) for dx in (-1, 0, 1)]
    + [(2, 2)]
)


class SamHierarchicalMaskGenerator(SamAutomaticMaskGenerator):
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        high_score_thresh: float = 8.5,
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
        TinySAM's hierarchical everything mode, with TinySAM's arguments (the standard generator's
        plus high_score_thresh, in TinySAM's order).

        Arguments:
          model (Sam): the SAM model to prompt.
          points_per_side (int): side of the dense grid; the sparse pass uses
            points_per_side // 4 (so at least 4). Required: the two grids derive from it.
          points_per_batch (int): prompts decoded together.
          pred_iou_thresh (float): keep masks whose predicted IoU is above this (0 disables).
          high_score_thresh (float): logit above which a kept sparse-pass mask marks a pixel as
            covered; dense points on covered pixels are not decoded.
          stability_score_thresh, stability_score_offset, box_nms_thresh, min_mask_region_area,
          output_mode: as for SamAutomaticMaskGenerator.
          crop_n_layers (int): must be 0 (the hierarchical mode works on the whole image).
          crop_nms_thresh (float): used only as in upstream's small-region post-processing.
          crop_overlap_ratio, crop_n_points_downscale_factor: accepted for compatibility, unused.
          point_grids: must be None.
          decode_batch_size (int or None, keyword-only): prompts per decoder call.
          progress (bool, keyword-only): show tqdm progress bars.
        """
        if points_per_side is None or point_grids is not None:
            raise InputError(
                "SamHierarchicalMaskGenerator needs points_per_side (its sparse and dense grids derive "
                "from it) and no point_grids; use SamAutomaticMaskGenerator for explicit point grids."
            )
        if points_per_side < 4:
            raise InputError(f"points_per_side must be at least 4 (the sparse grid is points_per_side // 4), got {points_per_side}.")
        if crop_n_layers != 0:
            raise InputError(
                "SamHierarchicalMaskGenerator works on the whole image: crop_n_layers must be 0. "
                "Use SamAutomaticMaskGenerator for crops."
            )
        super().__init__(
            model, points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, stability_score_offset,
            box_nms_thresh, 0, crop_nms_thresh, crop_overlap_ratio, crop_n_points_downscale_factor, None,
            min_mask_region_area, output_mode, decode_batch_size=decode_batch_size, progress=progress,
        )
        self.points_per_side = points_per_side
        self.high_score_thresh = high_score_thresh

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Same as :meth:`hierarchical_generate`, so this class can stand in for the standard one."""
        return self.hierarchical_generate(image)

    @torch.no_grad()
    def hierarchical_generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """
        Generate masks for an image with the two-pass hierarchical strategy.

        Arguments:
          image (np.ndarray): HxWx3 uint8 RGB image.

        Returns:
          (list(dict)): records as SamAutomaticMaskGenerator.generate returns them (segmentation,
            area, bbox XYWH, predicted_iou, point_coords [[x, y]], stability_score), with
            crop_box = [0, 0, W, H], the whole image.
        """
        image = check_image(image, "RGB")
        ih, iw = image.shape[:2]
        whole = [0, 0, iw, ih]
        self.predictor.set_image(image)
        try:
            sparse_points = build_point_grid(self.points_per_side // 4) * np.array([[iw, ih]])
            covered: List[torch.Tensor] = []  # holds at most one HxW mask, or-ed into by each batch
            sparse = self._decode_points(sparse_points, whole, covered)
            covered_np = covered[0].cpu().numpy() if covered else np.zeros((ih, iw), dtype=bool)
            data = self._decode_points(self._dense_points(sparse_points, covered_np, iw, ih), whole)
        finally:
            self.predictor.reset_image()

        data.cat(sparse)
        if len(data["packed"]) > 0:
            data.filter(box_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        # Only NMS survivors are RLE-encoded (as in the standard generator's _process_crop).
        data = self._encode_packed(data, whole, (ih, iw))
        data["crop_boxes"] = torch.tensor([whole for _ in range(len(data["rles"]))])
        data.to_numpy()
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return mask_data_to_records(data, self.output_mode)

    def _decode_points(
        self, points: np.ndarray, whole: List[int], covered: Optional[List[torch.Tensor]] = None
    ) -> MaskData:
        """Decode and filter points (pixels) of the set whole image in batches of points_per_batch,
        as the standard generator's _process_batch does; ``covered`` as for _filtered_batch. The
        masks come bit-packed (column ``packed``, ``_filtered_batch(encode=False)``), not encoded."""
        size = (whole[3], whole[2])
        if len(points) == 0:
            device = self.predictor.device
            return MaskData(
                packed=np.zeros((0, (size[0] * size[1] + 7) // 8), dtype=np.uint8), boxes=torch.zeros(0, 4, dtype=torch.long, device=device), iou_preds=torch.zeros(0, device=device),
                points=torch.zeros(0, 2, dtype=torch.float64), stability_score=torch.zeros(0, device=device),
            )
        data = MaskData()
        for (batch,) in self._batches(points):
            data.cat(self._filtered_batch(batch, size, whole, size, covered, self.high_score_thresh, encode=False))
        return data

    def _dense_points(self, sparse_points: np.ndarray, covered: np.ndarray, iw: int, ih: int) -> np.ndarray:
        """Dense-grid points (pixels, float64, Kx2) around the sparse points on uncovered pixels.

        Order: sparse point by sparse point, offsets in _OFFSETS order (TinySAM's order).
        """
        wstride = iw // self.points_per_side
        hstride = ih // self.points_per_side
        offsets = np.array(_OFFSETS, dtype=np.float64)  # 15 x 2
        px = sparse_points[:, :1] + wstride * offsets[None, :, 0]  # S x 15
        py = sparse_points[:, 1:] + hstride * offsets[None, :, 1]
        # The +2 column/row is used only where it stays inside the image (the -1/+1 ones always do
        # for a grid built from points_per_side // 4).
        valid = np.ones_like(px, dtype=bool)
        valid &= (offsets[None, :, 0] != 2) | (sparse_points[:, :1] + wstride * 2 < iw)
        valid &= (offsets[None, :, 1] != 2) | (sparse_points[:, 1:] + hstride * 2 < ih)
        xi = np.clip(px.astype(np.int64), 0, iw - 1)
        yi = np.clip(py.astype(np.int64), 0, ih - 1)
        valid &= ~covered[yi, xi]
        pts = np.stack([px[valid], py[valid]], axis=-1)
        # TinySAM stores the points normalised and scales them back; do the same round trip so the
        # prompts (and point_coords) are the same floats.
        return (pts / np.array([[iw, ih]])) * np.array([[iw, ih]])

