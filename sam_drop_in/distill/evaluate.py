"""``distill eval``: agreement of a student with its teacher on held-out images.

The metric of the MobileSAM and TinySAM papers for comparing a distilled model with SAM: the
mean IoU between the student's and the teacher's masks for the same prompts, here random
single points and random boxes; and the MSE between their image embeddings.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..utils.transforms import ResizeLongestSide
from . import _models
from .losses import decode
from .store import EmbeddingStore


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    # Two empty masks agree perfectly.
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def random_prompts(h: int, w: int, n_points: int, n_boxes: int, generator: torch.Generator):
    """Random prompts in original-image pixel coordinates.

    Arguments:
      h, w (int): image size. n_points, n_boxes (int): how many of each. generator: CPU generator.

    Returns:
      (points n_points x 2 float (x, y), boxes n_boxes x 4 float XYXY with sides >= 1/8 of the image).
    """
    pts = torch.rand(n_points, 2, generator=generator) * torch.tensor([w, h], dtype=torch.float32)
    u = torch.rand(n_boxes, 4, generator=generator)
    min_w, min_h = w / 8.0, h / 8.0
    bw = min_w + u[:, 2] * (w - min_w)
    bh = min_h + u[:, 3] * (h - min_h)
    x0 = u[:, 0] * (w - bw)
    y0 = u[:, 1] * (h - bh)
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
    return pts, boxes


@torch.inference_mode()
def evaluate(
    student: nn.Module,
    teacher: nn.Module,
    store: EmbeddingStore,
    n_points: int = 16,
    n_boxes: int = 16,
    seed: int = 0,
    device: str = "cpu",
    limit: Optional[int] = None,
) -> Dict:
    """mIoU between student and teacher masks, and embedding MSE, over the images of a store.

    Each image gets ``n_points`` random single-point prompts and ``n_boxes`` random boxes (the
    same for both models, drawn from ``seed``); each prompt is decoded with one output mask
    (``multimask_output=False``), upscaled to the original image and thresholded at 0.

    Arguments:
      student (Sam): model under test (vit_t at the store's image size).
      teacher (Sam): provides the prompt encoder and mask decoder applied to the stored teacher
        embeddings (its image encoder is not run).
      store (EmbeddingStore): held-out images with teacher embeddings.
      n_points, n_boxes (int): prompts per image. seed (int). device (str).
      limit (int or None): evaluate only the first ``limit`` images.

    Returns:
      dict: {"miou": float, "miou_points": float, "miou_boxes": float, "embedding_mse": float,
      "images": int, "prompts": int}.
    """
    size = store.image_size
    student = student.to(device).eval()
    teacher = teacher.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    transform = ResizeLongestSide(size)
    ious_p, ious_b, mses = [], [], []
    n = len(store) if limit is None else min(limit, len(store))
    for i in range(n):
        image = _models.load_rgb(str(store.image_path(i)))
        h, w = image.shape[:2]
        x, (rh, rw) = _models.preprocess(image, size)
        s_emb = student.image_encoder(x[None].to(device)).float()
        t_emb = store.embedding(i)[None].to(device)
        mses.append(float(torch.mean((s_emb - t_emb) ** 2)))
        pts, boxes = random_prompts(h, w, n_points, n_boxes, gen)
        for kind, prompts in (("points", pts), ("boxes", boxes)):
            if prompts.shape[0] == 0:
                continue
            # The predictor's coordinate mapping, in float64 as SamPredictor.predict does it.
            c = torch.as_tensor(transform.apply_coords(prompts.numpy().reshape(-1, 2), (h, w)), dtype=torch.float32)
            if kind == "points":
                args = dict(coords=c[:, None, :].to(device), labels=torch.ones(len(c), 1, device=device))
            else:
                args = dict(coords=None, labels=None, boxes=c.reshape(-1, 4).to(device))
            masks = []
            for model, emb in ((teacher, t_emb), (student, s_emb)):
                low, _, _ = decode(model, emb, **args)
                up = model.postprocess_masks(low, (rh, rw), (h, w))
                masks.append(up[:, 0] > model.mask_threshold)
            iou = _mask_iou(masks[0], masks[1]).cpu()
            (ious_p if kind == "points" else ious_b).append(iou)
    cat_p = torch.cat(ious_p) if ious_p else torch.zeros(0)
    cat_b = torch.cat(ious_b) if ious_b else torch.zeros(0)
    allv = torch.cat([cat_p, cat_b])
    return {
        "miou": float(allv.mean()) if len(allv) else float("nan"),
        "miou_points": float(cat_p.mean()) if len(cat_p) else float("nan"),
        "miou_boxes": float(cat_b.mean()) if len(cat_b) else float("nan"),
        "embedding_mse": float(np.mean(mses)),
        "images": n,
        "prompts": int(len(allv)),
    }


def evaluate_files(
    student_checkpoint: str,
    embeddings: str,
    teacher_checkpoint: Optional[str] = None,
    image_root: Optional[str] = None,
    n_points: int = 16,
    n_boxes: int = 16,
    seed: int = 0,
    device: Optional[str] = None,
    limit: Optional[int] = None,
) -> Dict:
    """:func:`evaluate` from files: a vit_t checkpoint and a held-out embedding store.

    Arguments:
      student_checkpoint (str): vit_t checkpoint (e.g. a run's student_vit_t.safetensors).
      embeddings (str): store of held-out images made by ``distill embed`` with the teacher.
      teacher_checkpoint (str or None): teacher file for its prompt encoder and mask decoder;
        default the one recorded in the store.
      image_root, n_points, n_boxes, seed, device, limit: see :func:`evaluate`.

    Returns:
      dict: see :func:`evaluate`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    store = EmbeddingStore(embeddings, image_root=image_root)
    size = store.image_size
    student = _models.load_sam("vit_t", student_checkpoint, image_size=size, device=device)
    tmeta = store.meta["teacher"]
    tck = teacher_checkpoint or tmeta.get("checkpoint")
    if tck is None:
        raise ValueError("The store records no teacher checkpoint; pass --teacher-checkpoint.")
    teacher = _models.load_head(_models.build_sam_sized("vit_t", size), _models.read_head_state(tck, tmeta["model_type"]), tck)
    return evaluate(student, teacher, store, n_points, n_boxes, seed, device, limit)
