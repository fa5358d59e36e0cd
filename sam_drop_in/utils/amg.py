"""Helpers for automatic mask generation, with segment_anything's names and results.

Every function here returns what ``segment_anything.utils.amg`` returns for the same input
(same values, dtypes and container types), so code that imports these helpers directly keeps
working. Where upstream loops in Python over masks or RLE counts, these versions work on whole
batches at once, and :meth:`MaskData.cat` no longer deep-copies what it concatenates.

Additions (not in upstream's module), used by both mask generators: :func:`box_nms`,
:func:`mask_data_to_records`, :func:`require_opencv`, :func:`require_pycocotools`.
"""

import math
from itertools import product
from typing import Any, Dict, Generator, ItemsView, List, Sequence, Tuple, Union

import numpy as np
import torch

from .._errors import InputError

_SUPPORTED = (list, np.ndarray, torch.Tensor)


def _check_supported(key: str, value: Any) -> None:
    if not isinstance(value, _SUPPORTED):
        raise InputError(
            "MaskData only supports list, numpy arrays, and torch tensors. "
            f"Key {key!r} has type {type(value).__name__}."
        )


class MaskData:
    """A column store for masks and their per-mask data, filtered and concatenated together.

    Every value is a list, a numpy array or a torch tensor whose first dimension indexes masks.

    Unlike upstream, :meth:`cat` does not deep-copy: it concatenates tensors and arrays (which
    makes new storage anyway) and makes a shallow copy of lists. The RLE dicts in a list are
    therefore shared with the MaskData they came from; nothing in this package mutates an RLE
    dict in place, it only replaces list entries.
    """

    def __init__(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            _check_supported(k, v)
        self._stats: Dict[str, Any] = dict(**kwargs)

    def __setitem__(self, key: str, item: Any) -> None:
        _check_supported(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: Union[torch.Tensor, np.ndarray, Sequence]) -> None:
        """Keep only the masks selected by ``keep``, in place.

        Arguments:
          keep (torch.Tensor, np.ndarray or sequence): a boolean mask of length N, or integer
            indices (kept in the order given, as upstream does).
        """
        keep_t = torch.as_tensor(keep)
        keep_np = keep_t.detach().cpu().numpy()
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                self._stats[k] = v[keep_t.to(v.device)]
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[keep_np]
            elif isinstance(v, list):
                if keep_np.dtype == np.bool_:
                    self._stats[k] = [a for a, flag in zip(v, keep_np.tolist()) if flag]
                else:
                    self._stats[k] = [v[i] for i in keep_np.tolist()]
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}.")

    def cat(self, new_stats: "MaskData") -> None:
        """Append the masks of ``new_stats`` after this object's masks, in place."""
        for k, v in new_stats.items():
            if k not in self._stats or self._stats[k] is None:
                # A shallow list copy keeps later appends from reaching into new_stats.
                self._stats[k] = list(v) if isinstance(v, list) else v
            elif isinstance(v, torch.Tensor):
                self._stats[k] = torch.cat([self._stats[k], v], dim=0)
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([self._stats[k], v], axis=0)
            elif isinstance(v, list):
                self._stats[k] = self._stats[k] + v
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}.")

    def to_numpy(self) -> None:
        """Convert every torch tensor to a numpy array on the CPU, in place."""
        for k, v in self._stats.items():
            if isinstance(v, torch.Tensor):
                self._stats[k] = v.detach().cpu().numpy()


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0
) -> torch.Tensor:
    """Flag boxes that touch a crop's edge where that edge is not also the image's edge.

    Arguments:
      boxes (torch.Tensor): Nx4 boxes in XYXY, in the crop's frame.
      crop_box (list(int)): the crop, XYXY in the original image's pixels.
      orig_box (list(int)): the whole image, XYXY (0, 0, W, H).
      atol (float): how close, in pixels, counts as touching.

    Returns:
      (torch.Tensor): N bool, True where the box should be dropped.
    """
    crop_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = (boxes - crop_t[None, :]).abs() <= atol
    near_image = (boxes - orig_t[None, :]).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def box_xyxy_to_xywh(box_xyxy: torch.Tensor) -> torch.Tensor:
    """Convert one box from XYXY to XYWH.

    Arguments:
      box_xyxy (torch.Tensor, np.ndarray or list): shape 4, XYXY.

    Returns:
      (same type): a new shape-4 box in XYWH; the input is not modified.
    """
    if isinstance(box_xyxy, torch.Tensor):
        box_xywh = box_xyxy.clone()
    elif isinstance(box_xyxy, np.ndarray):
        box_xywh = box_xyxy.copy()
    else:
        box_xywh = list(box_xyxy)
    box_xywh[2] = box_xywh[2] - box_xywh[0]
    box_xywh[3] = box_xywh[3] - box_xywh[1]
    return box_xywh


def batch_iterator(batch_size: int, *args: Any) -> Generator[List[Any], None, None]:
    """Yield aligned slices of ``batch_size`` items from each argument.

    Arguments:
      batch_size (int): items per batch (the last batch may be shorter).
      *args: sequences of equal length (lists, arrays, tensors).

    Returns:
      generator of lists, one slice per argument.
    """
    if len(args) == 0 or any(len(a) != len(args[0]) for a in args):
        raise InputError("Batched iteration must have inputs of all the same size.")
    if batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer, got {batch_size}.")
    n = len(args[0])
    for start in range(0, n, batch_size):
        yield [arg[start : start + batch_size] for arg in args]


def _rle_counts_batched(tensor: torch.Tensor) -> List[List[int]]:
    """Run lengths of N binary masks, each read in column-major (Fortran) order.

    One nonzero() over the whole batch and one tolist(), instead of a Python loop of tensor ops
    per mask.
    """
    n, h, w = tensor.shape
    flat = tensor.permute(0, 2, 1).reshape(n, h * w)
    if n == 0:
        return []
    # Position (1-based) of each change between consecutive pixels, row-major over masks.
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero()
    rows = change[:, 0]
    per_mask = torch.bincount(rows, minlength=n)
    # Every mask's run boundaries: 0, changes + 1, h*w. Laid end to end so one diff gives every
    # run length; the diffs across a mask boundary are simply skipped below.
    starts = torch.zeros(n + 1, dtype=torch.long, device=tensor.device)
    starts[1:] = torch.cumsum(per_mask + 2, 0)
    bounds = torch.empty(int(starts[-1]), dtype=torch.long, device=tensor.device)
    bounds[starts[:-1]] = 0
    bounds[starts[1:] - 1] = h * w
    # Index of each change inside the flat bounds array: its mask's start + 1 + rank in mask.
    rank = torch.arange(rows.numel(), device=tensor.device) - (starts[rows] - 2 * rows)
    bounds[starts[rows] + 1 + rank] = change[:, 1] + 1
    lengths = (bounds[1:] - bounds[:-1]).cpu().tolist()
    starts_l = starts.cpu().tolist()
    first_on = flat[:, 0].cpu().tolist()
    out = []
    for i in range(n):
        counts = lengths[starts_l[i] : starts_l[i + 1] - 1]
        out.append([0] + counts if first_on[i] else counts)
    return out


def mask_to_rle_pytorch(tensor: torch.Tensor) -> List[Dict[str, Any]]:
    """Encode binary masks as uncompressed RLE (pycocotools' format, column-major counts).

    Arguments:
      tensor (torch.Tensor): NxHxW bool masks.

    Returns:
      (list(dict)): N dicts {"size": [H, W], "counts": list(int)}; counts alternate runs of
        0 and 1 starting with 0 (a leading 0 count when the first pixel is set).
    """
    _, h, w = tensor.shape
    return [{"size": [h, w], "counts": counts} for counts in _rle_counts_batched(tensor)]


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE.

    Arguments:
      rle (dict): {"size": [H, W], "counts": list(int)} as made by :func:`mask_to_rle_pytorch`.

    Returns:
      (np.ndarray): HxW bool mask (a transposed view of a column-major buffer, like upstream).
    """
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = (np.arange(counts.size) % 2).astype(bool)
    mask = np.repeat(values, counts)
    if mask.size != h * w:
        raise InputError(f"RLE counts sum to {mask.size} but size {h}x{w} needs {h * w} pixels.")
    return mask.reshape(w, h).transpose()


def area_from_rle(rle: Dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE.

    Arguments:
      rle (dict): {"size": [H, W], "counts": list(int)}.

    Returns:
      (int): the area in pixels.
    """
    return sum(rle["counts"][1::2])


def calculate_stability_score(
    masks: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU between a mask's logits binarised at threshold + offset and at threshold - offset.

    Arguments:
      masks (torch.Tensor): ...xHxW float mask logits.
      mask_threshold (float): the logit threshold for a binary mask (0.0 for SAM).
      threshold_offset (float): the shift applied both ways.

    Returns:
      (torch.Tensor): ... float32 scores (NaN where both masks are empty, as upstream).
    """
    # The high-threshold mask lies inside the low-threshold one, so intersection and union are
    # just the two areas.
    intersections = _count_true(masks > (mask_threshold + threshold_offset))
    unions = _count_true(masks > (mask_threshold - threshold_offset))
    return intersections / unions


# Words summed together by _count_true: each byte lane then holds at most 127, so no lane carries
# into the next and the top lane never reaches the int64 sign bit.
_SWAR_GROUP = 127


def _count_true(b: torch.Tensor) -> torch.Tensor:
    """... x H x W bool -> ... int32: the number of True pixels in each mask (exact).

    On the CPU, masks whose H*W is a multiple of 8 are counted eight pixels at a time: the
    bytes (0 or 1) are read as int64 words and summed in groups of _SWAR_GROUP words, which adds
    the eight byte lanes side by side without carries; the lanes' bytes are then summed. About
    7x faster than a bool reduction on a 1024x768 mask, and the same integers. Elsewhere: per-row
    int16 sums then int32 (rows are at most 32767 pixels wide), no int64 copy of the masks.
    """
    lead, (h, w) = b.shape[:-2], b.shape[-2:]
    n = h * w
    flat = b.reshape(-1, n)
    if (b.device.type != "cpu" or n % 8 or n // 8 < _SWAR_GROUP or not flat.is_contiguous()
            or flat.storage_offset() % 8 or flat.shape[0] == 0):
        if w <= 32767:
            return b.sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
        return b.sum((-2, -1), dtype=torch.int32)
    words = flat.view(torch.uint8).view(torch.int64)  # R x n/8, eight 0/1 bytes per word
    m = words.shape[1]
    full = m - m % _SWAR_GROUP
    lanes = [words[:, :full].reshape(-1, full // _SWAR_GROUP, _SWAR_GROUP).sum(-1)]
    if full < m:
        lanes.append(words[:, full:].sum(-1, keepdim=True))
    return torch.cat(lanes, dim=1).view(torch.uint8).sum(-1, dtype=torch.int32).reshape(lead)


def build_point_grid(n_per_side: int) -> np.ndarray:
    """An evenly spaced grid of points in [0, 1]x[0, 1], cell centres.

    Arguments:
      n_per_side (int): points along each side.

    Returns:
      (np.ndarray): (n_per_side**2)x2 float64 (x, y), x varying fastest.
    """
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """Point grids for the whole image and each crop layer.

    Arguments:
      n_per_side (int): points per side on the whole image.
      n_layers (int): number of crop layers.
      scale_per_layer (int): layer i uses int(n_per_side / scale_per_layer**i) points per side.

    Returns:
      (list(np.ndarray)): n_layers + 1 grids, each Kx2 float64 in [0, 1].
    """
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """Crop boxes: the whole image, then (2**(i+1))**2 overlapping crops for layer i.

    Arguments:
      im_size (tuple(int, int)): (H, W) of the image.
      n_layers (int): number of crop layers.
      overlap_ratio (float): overlap of neighbouring crops in the first layer, as a fraction of
        the image's short side (scaled down in later layers).

    Returns:
      (list(list(int)), list(int)): crop boxes in XYXY pixels, and the layer of each.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes: List[List[int]] = [[0, 0, im_w, im_h]]
    layer_idxs: List[int] = [0]

    for i_layer in range(n_layers):
        n_crops = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = int(math.ceil((overlap * (n_crops - 1) + im_w) / n_crops))
        crop_h = int(math.ceil((overlap * (n_crops - 1) + im_h) / n_crops))
        xs = [int((crop_w - overlap) * i) for i in range(n_crops)]
        ys = [int((crop_h - overlap) * i) for i in range(n_crops)]
        # x-major order, as upstream (itertools.product over x then y).
        for x0, y0 in product(xs, ys):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    """Move XYXY boxes from a crop's frame to the original image's frame.

    Arguments:
      boxes (torch.Tensor): Nx4 or BxNx4 XYXY boxes.
      crop_box (list(int)): the crop, XYXY.

    Returns:
      (torch.Tensor): the shifted boxes (dtype promoted with int64 as upstream).
    """
    x0, y0 = crop_box[0], crop_box[1]
    offset = torch.tensor([x0, y0, x0, y0], device=boxes.device)
    return boxes + offset


def uncrop_points(points: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    """Move (x, y) points from a crop's frame to the original image's frame.

    Arguments:
      points (torch.Tensor): Nx2 or BxNx2 points.
      crop_box (list(int)): the crop, XYXY.

    Returns:
      (torch.Tensor): the shifted points.
    """
    offset = torch.tensor([crop_box[0], crop_box[1]], device=points.device)
    return points + offset


def uncrop_masks(masks: torch.Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Pad masks of a crop with zeros to the original image's size.

    Arguments:
      masks (torch.Tensor): ...xhxw masks of the crop.
      crop_box (list(int)): the crop, XYXY.
      orig_h, orig_w (int): the original image's size.

    Returns:
      (torch.Tensor): ...x orig_h x orig_w (the input itself when the crop is the whole image).
    """
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad = (x0, orig_w - x1, y0, orig_h - y1)
    return torch.nn.functional.pad(masks, pad, value=0)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill small holes or remove small islands of a binary mask (needs OpenCV).

    Arguments:
      mask (np.ndarray): HxW bool.
      area_thresh (float): regions with fewer pixels than this are small.
      mode (str): 'holes' fills small holes; 'islands' removes small connected regions (the
        largest is kept if every region is small).

    Returns:
      (np.ndarray, bool): the HxW bool mask and whether it changed.
    """
    if mode not in ("holes", "islands"):
        raise InputError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    cv2 = require_opencv()
    fill_holes = mode == "holes"
    working = (fill_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[1:, -1]  # label 0 is the background
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    # Lookup table over labels: one gather instead of np.isin.
    lut = np.zeros(n_labels, dtype=bool)
    if fill_holes:
        lut[0] = True
        lut[small] = True
    else:
        lut[1:] = True
        lut[small] = False
        if not lut.any():
            lut[int(np.argmax(sizes)) + 1] = True
    return lut[regions], True


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Compress an uncompressed RLE with pycocotools (needs pycocotools).

    Arguments:
      uncompressed_rle (dict): {"size": [H, W], "counts": list(int)}.

    Returns:
      (dict): {"size": [H, W], "counts": str}, JSON-serialisable.
    """
    mask_utils = require_pycocotools()
    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive pixel indices) around binary masks; [0, 0, 0, 0] for empty masks.

    Arguments:
      masks (torch.Tensor): ...xHxW bool.

    Returns:
      (torch.Tensor): ...x4 int64 XYXY (float32 zeros when the input has no elements, as upstream).
    """
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device)
    lead_shape = masks.shape[:-2]
    h, w = masks.shape[-2:]
    m = masks.reshape(-1, h, w)
    if m.dtype == torch.bool:
        # The maximum of 0/1 bytes is the same as any(), and PyTorch's CPU amax over uint8 is
        # vectorised where any() over bool is not (about 20x faster on a 1024x768 mask).
        m = m.view(torch.uint8)
        rows, cols = m.amax(dim=-1), m.amax(dim=-2)  # N x H, N x W; 0 or 1
    else:
        rows, cols = m.any(dim=-1).byte(), m.any(dim=-2).byte()
    # argmax returns the first maximum: first set row/column; flip for the last one.
    top = rows.argmax(dim=-1)
    bottom = h - 1 - rows.flip(-1).argmax(dim=-1)
    left = cols.argmax(dim=-1)
    right = w - 1 - cols.flip(-1).argmax(dim=-1)
    out = torch.stack([left, top, right, bottom], dim=-1)
    out = out * rows.amax(dim=-1, keepdim=True)
    return out.reshape(*lead_shape, 4)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Non-maximum suppression of boxes, all in one category, as the mask generators run it.

    The category tensor is made on the boxes' device (segment_anything 1.0 made it on the CPU,
    which fails for CUDA boxes; fixed upstream later).

    Arguments:
      boxes (torch.Tensor): Nx4 XYXY boxes, any numeric dtype (compared as float32).
      scores (torch.Tensor): N scores; higher wins.
      iou_threshold (float): boxes overlapping a kept box with IoU above this are dropped.

    Returns:
      (torch.Tensor): int64 indices of the kept boxes, by decreasing score.
    """
    from torchvision.ops.boxes import batched_nms  # type: ignore

    categories = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    return batched_nms(boxes.float(), scores.to(boxes.device), categories, iou_threshold=iou_threshold)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _xyxy_to_xywh_lists(boxes: np.ndarray) -> List[List[Any]]:
    out = np.array(boxes, copy=True)
    out[:, 2:] -= out[:, :2]
    return out.tolist()


def mask_data_to_records(mask_data: MaskData, output_mode: str) -> List[Dict[str, Any]]:
    """The records ``SamAutomaticMaskGenerator.generate`` returns, from its final MaskData.

    Python types follow the stored dtypes exactly as segment_anything's per-record ``tolist()`` /
    ``item()`` do: int64 boxes give int coordinates, float32 boxes (upstream's dtype after a
    batch or crop kept no mask) give float coordinates.

    Arguments:
      mask_data (MaskData): with 'rles' (list of uncompressed RLE), 'boxes' (Nx4 XYXY),
        'iou_preds' (N), 'points' (Nx2, x y pixels), 'stability_score' (N) and 'crop_boxes'
        (Nx4 XYXY); numpy arrays or torch tensors.
      output_mode (str): 'binary_mask' (HxW bool arrays), 'uncompressed_rle' (the RLE dicts
        themselves) or 'coco_rle' (pycocotools' compressed RLE, needs pycocotools).

    Returns:
      (list(dict)): one dict per mask with segmentation, area (int), bbox (XYWH list),
        predicted_iou (float), point_coords ([[x, y]]), stability_score (float), crop_box
        (XYWH list).
    """
    rles = mask_data["rles"]
    n = len(rles)
    if n == 0:
        return []
    if output_mode == "coco_rle":
        segmentations = [coco_encode_rle(rle) for rle in rles]
    elif output_mode == "binary_mask":
        segmentations = [rle_to_mask(rle) for rle in rles]
    else:
        segmentations = rles
    # One tolist() per column instead of one per record: the same Python types, far fewer calls.
    bboxes = _xyxy_to_xywh_lists(_as_numpy(mask_data["boxes"]))
    crop_boxes = _xyxy_to_xywh_lists(_as_numpy(mask_data["crop_boxes"]))
    ious = _as_numpy(mask_data["iou_preds"]).tolist()
    stabilities = _as_numpy(mask_data["stability_score"]).tolist()
    points = _as_numpy(mask_data["points"]).tolist()
    return [
        {
            "segmentation": segmentations[i],
            "area": area_from_rle(rles[i]),
            "bbox": bboxes[i],
            "predicted_iou": ious[i],
            "point_coords": [points[i]],
            "stability_score": stabilities[i],
            "crop_box": crop_boxes[i],
        }
        for i in range(n)
    ]


def require_opencv() -> Any:
    """Import OpenCV (needed by remove_small_regions), or say how to install it.

    Returns:
      (module): cv2.
    """
    try:
        import cv2  # type: ignore
    except ImportError as e:
        raise ImportError(
            "min_mask_region_area > 0 (removing small regions) needs OpenCV: "
            "pip install 'sam-drop-in[amg]' (or opencv-python-headless)."
        ) from e
    return cv2


def require_pycocotools() -> Any:
    """Import pycocotools' mask module (needed by coco_encode_rle), or say how to install it.

    Returns:
      (module): pycocotools.mask.
    """
    try:
        from pycocotools import mask as mask_utils  # type: ignore
    except ImportError as e:
        raise ImportError(
            "output_mode='coco_rle' needs pycocotools: pip install 'sam-drop-in[amg]' (or pycocotools)."
        ) from e
    return mask_utils
