"""Distillation losses: MobileSAM's decoupled embedding loss and TinySAM's full-stage losses.

Full-stage (TinySAM, Shu et al. 2023): besides the image embedding, the student is matched to
the teacher on the mask decoder's output tokens (the two-way transformer's query outputs) and
on its output mask logits, for prompts sampled on each image. TinySAM uses an L1 distance for
these (MSE values are too small to optimise well) and *hard prompt sampling*: starting from a
point inside the target mask, further points are drawn from where the current prediction and
the target disagree, a random number of rounds (0..9 in the paper), so prompts move towards
hard boundary regions. Here the target is the teacher's mask (no ground truth is needed), and
*hard mask weighting* scales each prompt's output loss by sigmoid(1 / (IoU(student, teacher) + eps) - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between student and teacher image embeddings.

    Arguments:
      student (Tensor): Bx256xExE float.
      teacher (Tensor): Bx256xExE float.
      kind (str): "mse" (MobileSAM) or "l1".

    Returns:
      Tensor: scalar, mean over all elements.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student embedding {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "l1":
        return F.l1_loss(student.float(), teacher.float())
    raise ValueError(f"embedding loss must be 'mse' or 'l1', got {kind!r}")


class _TokenCapture:
    """Captures the two-way transformer's query outputs (the decoder tokens) via a forward hook."""

    def __init__(self, decoder: nn.Module) -> None:
        if not hasattr(decoder, "transformer"):
            raise TypeError("mask decoder has no .transformer submodule; cannot capture its tokens")
        self.tokens: Optional[torch.Tensor] = None
        self._h = decoder.transformer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.tokens = output[0]

    def close(self) -> None:
        self._h.remove()


def decode(
    sam: nn.Module,
    embedding: torch.Tensor,
    coords: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    boxes: Optional[torch.Tensor] = None,
    multimask_output: bool = False,
    want_tokens: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Decode a batch of prompts against one image embedding.

    Arguments:
      sam (Sam): model whose prompt encoder and mask decoder are used.
      embedding (Tensor): 1x256xExE image embedding.
      coords (Tensor or None): BxNx2 float, (x, y) in model input pixels.
      labels (Tensor or None): BxN int/float, 1 foreground, 0 background.
      boxes (Tensor or None): Bx4 float XYXY in model input pixels.
      multimask_output (bool): 3 masks per prompt instead of 1.
      want_tokens (bool): also return the transformer's output tokens.

    Returns:
      (low-res mask logits BxCx4Ex4E, IoU predictions BxC, tokens BxTx256 or None).
    """
    points = None if coords is None else (coords, labels)
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    cap = _TokenCapture(sam.mask_decoder) if want_tokens else None
    try:
        masks, iou = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
    finally:
        if cap is not None:
            cap.close()
    tokens = None
    if cap is not None:
        if cap.tokens is None:
            raise RuntimeError("the mask decoder did not call its transformer; cannot read decoder tokens")
        tokens = cap.tokens
    return masks, iou, tokens


def _sample_in(mask: torch.Tensor, generator: torch.Generator, fallback_size: int) -> torch.Tensor:
    """One (x, y) point per mask in BxHxW ``mask`` (uniform over True pixels; anywhere if empty)."""
    b, h, w = mask.shape
    flat = mask.reshape(b, -1).float()
    empty = flat.sum(1) == 0
    flat[empty] = 1.0
    idx = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    ys = (idx // w).float() + 0.5
    xs = (idx % w).float() + 0.5
    scale = fallback_size / w  # low-res mask pixels -> model input pixels
    return torch.stack([xs * scale, ys * (fallback_size / h)], dim=1)


@torch.no_grad()
def hard_prompt_sampling(
    teacher: nn.Module,
    student: nn.Module,
    teacher_emb: torch.Tensor,
    student_emb: torch.Tensor,
    n_prompts: int,
    valid_hw: Tuple[int, int],
    max_rounds: int,
    generator: torch.Generator,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample point prompts, then add points where student and teacher disagree.

    Round 0: one random point inside the valid (unpadded) image area per prompt. Each later
    round decodes the current prompts with teacher and student, and adds one point from the
    region where their masks differ, labelled foreground where the teacher's mask is on. The
    number of rounds is drawn uniformly from 0..max_rounds per call, as TinySAM does.

    Arguments:
      teacher, student (Sam): models; only prompt encoder and mask decoder are used.
      teacher_emb, student_emb (Tensor): 1x256xExE embeddings of the same image.
      n_prompts (int): prompts to sample.
      valid_hw (tuple): (h, w) of the resized image inside the padded input, in input pixels.
      max_rounds (int): largest number of refinement rounds.
      generator (torch.Generator): CPU generator; makes the sampling reproducible.

    Returns:
      (coords n_prompts x K x 2 float32 in input pixels, labels n_prompts x K float32).
    """
    size = teacher.prompt_encoder.input_image_size[0]
    device = teacher_emb.device
    h, w = valid_hw
    xy = torch.rand(n_prompts, 2, generator=generator)
    xy[:, 0] *= w
    xy[:, 1] *= h
    coords = xy.unsqueeze(1)
    labels = torch.ones(n_prompts, 1)
    rounds = int(torch.randint(0, max_rounds + 1, (1,), generator=generator))
    for _ in range(rounds):
        c, l = coords.to(device), labels.to(device)
        t_masks, _, _ = decode(teacher, teacher_emb, c, l)
        s_masks, _, _ = decode(student, student_emb, c, l)
        t_on = (t_masks[:, 0] > 0).cpu()
        err = t_on ^ (s_masks[:, 0] > 0).cpu()
        new = _sample_in(err, generator, size)
        lh, lw = t_on.shape[-2:]
        px = (new[:, 0] * lw / size).long().clamp(0, lw - 1)
        py = (new[:, 1] * lh / size).long().clamp(0, lh - 1)
        new_label = t_on[torch.arange(n_prompts), py, px].float()
        coords = torch.cat([coords, new.unsqueeze(1)], dim=1)
        labels = torch.cat([labels, new_label.unsqueeze(1)], dim=1)
    return coords.float(), labels.float()


@dataclass
class FullStageWeights:
    """Weights of TinySAM's loss terms (alpha: embedding, beta: tokens, gamma: output masks)."""

    embedding: float = 1.0
    tokens: float = 1.0
    masks: float = 1.0
    hard_mask_weighting: bool = True


def full_stage_loss(
    teacher: nn.Module,
    student: nn.Module,
    teacher_emb: torch.Tensor,
    student_emb: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Token and output-mask distillation losses for one image and a batch of point prompts.

    Arguments:
      teacher (Sam): frozen teacher (prompt encoder + mask decoder used).
      student (Sam): student; its decoder may be frozen or trained.
      teacher_emb (Tensor): 1x256xExE stored teacher embedding.
      student_emb (Tensor): 1x256xExE student embedding (requires grad).
      coords (Tensor): PxKx2 float input-pixel (x, y). labels (Tensor): PxK float.

    Returns:
      dict: "tokens" (scalar L1), "masks" (scalar, per-prompt L1 of the 3 multimask logits,
      weighted by hardness when requested later), "mask_per_prompt" (P), "iou" (P, no grad).
    """
    with torch.no_grad():
        t_masks, _, t_tokens = decode(teacher, teacher_emb, coords, labels, multimask_output=True,
                                      want_tokens=True)
    s_masks, _, s_tokens = decode(student, student_emb, coords, labels, multimask_output=True,
                                  want_tokens=True)
    tokens = F.l1_loss(s_tokens.float(), t_tokens.float())
    per_prompt = (s_masks.float() - t_masks.float()).abs().flatten(1).mean(1)
    with torch.no_grad():
        t_on = t_masks > 0
        s_on = s_masks > 0
        inter = (t_on & s_on).flatten(1).sum(1).float()
        union = (t_on | s_on).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {"tokens": tokens, "mask_per_prompt": per_prompt, "iou": iou}


def hard_mask_weights(iou: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """TinySAM's hardness weight with the teacher as target: sigmoid(1 / (IoU + eps) - 1)."""
    return torch.sigmoid(1.0 / (iou + eps) - 1.0)
