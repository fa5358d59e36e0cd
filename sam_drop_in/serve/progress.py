"""Everything mode's progress for the page: the fraction of point batches decoded, from the generator.

The generators have no progress callback (only a tqdm bar). Their overridable per-crop and
per-batch methods are part of the structure kept from upstream (a subclass may override them,
as segment_anything users do), so these subclasses count through them without changing what
the generators compute: ``_process_crop`` / ``_process_batch`` for SamAutomaticMaskGenerator;
for SamHierarchicalMaskGenerator, its ``_decode_points`` (one call per pass) is given the
pass's points one batch at a time, in the same order, which gives the same batches.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..automatic_mask_generator import SamAutomaticMaskGenerator
from ..hierarchical_mask_generator import SamHierarchicalMaskGenerator
from ..utils.amg import MaskData, build_point_grid, generate_crop_boxes

# Each sparse point of the hierarchical generator gets at most this many dense points (the
# 15 offsets of TinySAM's second pass); the bound fixes the total before the dense pass starts.
_DENSE_POINTS_PER_SPARSE = 15


class EverythingProgress:
    """Batches decoded out of the total, and what the generator is doing (thread-safe snapshot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.stage = "starting"
        self.started = time.monotonic()

    def set(self, *, total: Optional[int] = None, stage: Optional[str] = None, advance: int = 0) -> None:
        with self._lock:
            if total is not None:
                self.total = total
            if stage is not None:
                self.stage = stage
            self.done += advance

    def snapshot(self) -> Dict[str, Any]:
        """``{"done", "total", "fraction" (0..1), "stage"}``."""
        with self._lock:
            fraction = min(1.0, self.done / self.total) if self.total else 0.0
            return {"done": self.done, "total": self.total, "fraction": round(fraction, 4), "stage": self.stage}


def _batches(points: int, per_batch: int) -> int:
    return -(-points // per_batch)


class CountingAutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """SamAutomaticMaskGenerator that reports each crop and each decoded batch to ``progress``."""

    def __init__(self, *args: Any, progress_state: EverythingProgress, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_state = progress_state
        self._crops: List[Tuple[int, ...]] = []

    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        if isinstance(image, np.ndarray) and image.ndim == 3:
            boxes, layers = generate_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            self._crops = [tuple(b) for b in boxes]
            total = sum(_batches(len(self.point_grids[layer]), self.points_per_batch) for layer in layers)
            self.progress_state.set(total=total)
        return super().generate(image)

    def _process_crop(self, image: np.ndarray, crop_box: List[int], crop_layer_idx: int,
                      orig_size: Tuple[int, ...]) -> MaskData:
        index = self._crops.index(tuple(crop_box)) + 1 if tuple(crop_box) in self._crops else 0
        self.progress_state.set(stage=f"crop {index} of {len(self._crops)}: embedding, then decoding")
        return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)

    def _process_batch(self, points: np.ndarray, im_size: Tuple[int, ...], crop_box: List[int],
                       orig_size: Tuple[int, ...]) -> MaskData:
        out = super()._process_batch(points, im_size, crop_box, orig_size)
        self.progress_state.set(advance=1)
        return out


class CountingHierarchicalMaskGenerator(SamHierarchicalMaskGenerator):
    """SamHierarchicalMaskGenerator that reports each decoded batch of both passes to ``progress``.

    The dense pass's size is known only after the sparse pass; until then the total counts its
    upper bound (15 dense points per sparse point), so the fraction never goes backwards.
    """

    def __init__(self, *args: Any, progress_state: EverythingProgress, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_state = progress_state
        self._passes = 0
        self._sparse_batches = 0

    def hierarchical_generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        self._passes = 0
        sparse = len(build_point_grid(self.points_per_side // 4)) if self.points_per_side >= 4 else 0
        self._sparse_batches = _batches(sparse, self.points_per_batch)
        self.progress_state.set(stage="embedding",
                                total=self._sparse_batches + _batches(_DENSE_POINTS_PER_SPARSE * sparse,
                                                                      self.points_per_batch))
        return super().hierarchical_generate(image)

    def _decode_points(self, points: np.ndarray, whole: List[int], covered: Optional[List[Any]] = None) -> MaskData:
        self._passes += 1
        name = "sparse grid" if self._passes == 1 else "dense grid"
        if self._passes == 2:
            self.progress_state.set(total=self._sparse_batches + _batches(len(points), self.points_per_batch))
        self.progress_state.set(stage=f"{name}: decoding")
        if len(points) == 0:
            return super()._decode_points(points, whole, covered)
        # One batch per call, in order: the same batches (and the same ``covered`` updates) as
        # one call with all the points, so the records are the same.
        data = MaskData()
        for start in range(0, len(points), self.points_per_batch):
            data.cat(super()._decode_points(points[start:start + self.points_per_batch], whole, covered))
            self.progress_state.set(advance=1)
        return data


def counting_generator(hierarchical: bool, model: Any, progress_state: EverythingProgress, **options: Any) -> Any:
    """A counting generator (automatic or hierarchical) over ``model`` with the given options."""
    cls = CountingHierarchicalMaskGenerator if hierarchical else CountingAutomaticMaskGenerator
    return cls(model, progress_state=progress_state, **options)


__all__ = ["EverythingProgress", "CountingAutomaticMaskGenerator", "CountingHierarchicalMaskGenerator",
           "counting_generator"]
