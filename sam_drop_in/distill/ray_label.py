"""``distill label``: everything-mode labelling of an image collection, locally or with Ray Data.

One record per image, written as a JSON line::

    {"path": "sub/img.jpg", "height": H, "width": W,
     "annotations": [{"segmentation": {"size": [H, W], "counts": "..."},  # COCO RLE
                      "area": int, "bbox": [x, y, w, h], "predicted_iou": float,
                      "point_coords": [[x, y]], "stability_score": float,
                      "crop_box": [x, y, w, h]}, ...]}

The same :class:`Labeler` does the work in both modes: called in a loop in this process, or
as the callable class of ``ray.data.Dataset.map_batches`` with a pool of actors (one model per
actor), which spreads the work over every node of a Ray cluster. Ray is optional
(``pip install "sam-drop-in[ray]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from .._fileio import atomic_write, json_default
from ..automatic_mask_generator import SamAutomaticMaskGenerator
from . import _models


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "Labelling with Ray needs Ray Data: pip install \"sam-drop-in[ray]\" (or pip install \"ray[data]\"). "
            "Without --ray the same labelling runs in this process."
        ) from exc
    return ray


class Labeler:
    """Loads a model once and labels images with the automatic mask generator (COCO RLE output).

    Arguments:
      image_root (str): folder the relative paths are resolved against.
      model_type (str): registry model type. checkpoint (str or None): local or hf:// weights.
      amg_kwargs (dict or None): SamAutomaticMaskGenerator keyword arguments (output_mode is
        forced to coco_rle).
      device (str or None): torch device; default cuda when available.
      num_threads (int or None): torch CPU threads in this process (Ray workers default to 1).
    """

    def __init__(
        self,
        image_root: str,
        model_type: str = "vit_t",
        checkpoint: Optional[str] = None,
        amg_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[str] = None,
        num_threads: Optional[int] = None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.image_root = Path(image_root)
        sam = _models.load_sam(model_type, checkpoint, device=device)
        kwargs = dict(amg_kwargs or {})
        kwargs["output_mode"] = "coco_rle"
        self.generator = SamAutomaticMaskGenerator(sam, **kwargs)

    def label(self, rel_path: str) -> str:
        """Label one image; returns the JSON line (no newline) described in the module docstring."""
        image = _models.load_rgb(str(self.image_root / rel_path))
        anns = self.generator.generate(image)
        return json.dumps({
            "path": rel_path,
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "annotations": anns,
        }, default=json_default)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        # Records travel as JSON strings: nested, ragged annotation lists do not fit Arrow columns.
        paths = [str(p) for p in batch["path"]]
        return {"path": paths, "record": [self.label(p) for p in paths]}


def label_folder(
    images: str,
    out: str,
    model_type: str = "vit_t",
    checkpoint: Optional[str] = None,
    amg_kwargs: Optional[Dict[str, Any]] = None,
    use_ray: bool = False,
    num_actors: int = 1,
    batch_size: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_threads: Optional[int] = None,
    ray_address: Optional[str] = None,
    device: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Label every image below ``images`` with everything mode; write COCO-RLE JSON lines to ``out``.

    Lines are written in sorted path order in both modes, so the two produce the same file.

    Arguments:
      images (str): image folder (recursive).
      out (str): output .jsonl file (written to a temporary name, then renamed).
      model_type (str), checkpoint (str or None): the model, as for ``sam_model_registry``.
      amg_kwargs (dict or None): SamAutomaticMaskGenerator arguments (points_per_side, ...).
      use_ray (bool): run through Ray Data ``map_batches`` with an actor pool; connects to
        ``ray_address`` (or RAY_ADDRESS, or starts a local Ray).
      num_actors (int): actor pool size (models loaded at once).
      batch_size (int): images per map_batches call.
      num_gpus_per_actor (float): GPUs reserved per actor (0 on CPU).
      num_threads (int or None): torch threads per labeller.
      ray_address (str or None): Ray cluster address.
      device (str or None): torch device for the labeller(s).
      progress (bool): progress bar.

    Returns:
      dict: {"images": int, "masks": int, "out": str}.
    """
    from tqdm import tqdm

    root = str(Path(images).resolve())
    paths = _models.list_images(root)
    if not paths:
        raise ValueError(f"No images found in {images}.")
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    ctor = dict(image_root=root, model_type=model_type, checkpoint=checkpoint, amg_kwargs=amg_kwargs,
                device=device, num_threads=num_threads)
    n_masks = [0]

    def write(tmp: str) -> None:
        if use_ray:
            records: Iterable[str] = _ray_records(paths, ctor, num_actors, batch_size, num_gpus_per_actor, ray_address)
        else:
            labeler = Labeler(**ctor)
            records = (labeler.label(p) for p in paths)
        with open(tmp, "w") as f:
            for line in tqdm(records, total=len(paths), disable=not progress, desc="label", unit="img"):
                n_masks[0] += len(json.loads(line)["annotations"])
                f.write(line + "\n")

    atomic_write(out_p, write)
    return {"images": len(paths), "masks": n_masks[0], "out": str(out_p)}


def _ray_records(paths, ctor, num_actors, batch_size, num_gpus_per_actor, ray_address) -> Iterable[str]:
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(
        Labeler,
        fn_constructor_kwargs=ctor,
        batch_size=batch_size,
        concurrency=num_actors,
        num_gpus=num_gpus_per_actor,
        batch_format="numpy",
    )
    # preserve_order keeps rows in input order, so records stream to disk as they arrive.
    for expected, row in zip(paths, ds.iter_rows()):
        if str(row["path"]) != expected:
            raise RuntimeError(f"Ray returned {row['path']} where {expected} was expected")
        yield str(row["record"])
