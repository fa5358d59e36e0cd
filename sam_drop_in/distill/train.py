"""``distill train``: train a TinyViT student on stored teacher embeddings.

Decoupled distillation (MobileSAM): the student image encoder regresses the teacher's image
embeddings with an MSE loss; the prompt encoder and mask decoder are the teacher's, unchanged.
Optionally TinySAM's full-stage losses (decoder tokens and output masks for sampled prompts,
hard prompt sampling, hard mask weighting) and mask decoder fine-tuning.

Determinism and exact resume: the data order is a pure function of (seed, step) -- epoch ``e``
is ``randperm(N)`` drawn from a generator seeded with ``seed + e`` -- and prompt sampling uses
a generator seeded from (seed, step, micro-batch). A checkpoint holds the model, the optimizer,
the LR schedule, the gradient scaler, the global torch RNG states and the step, so a resumed run
computes the same losses as an uninterrupted one.

Data parallel: under ``torchrun`` every global batch of ``batch_size * grad_accum * world_size``
images is cut into ``grad_accum * world_size`` micro-batches; rank ``r`` at accumulation step
``a`` takes chunk ``r * grad_accum + a``. A single process with ``grad_accum = k * world_size``
therefore sees exactly the same micro-batches (and BatchNorm statistics) as ``world_size``
processes with ``grad_accum = k``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .._fileio import atomic_write, sha256_file
from ..checkpoint import load_state_dict
from . import _models
from .losses import (
    FullStageWeights,
    embedding_loss,
    full_stage_loss,
    hard_mask_weights,
    hard_prompt_sampling,
)
from .store import EmbeddingStore

CKPT_FORMAT = "sam-drop-in-distill-train/1"
CKPT_DIR = "checkpoints"
EXPORT_NAME = "student_vit_t.safetensors"
LOG_NAME = "log.jsonl"


@dataclass
class TrainConfig:
    """Settings of a distillation run (the ``distill train`` flags, one to one).

    Attributes:
      embeddings (str): store folder written by ``distill embed``.
      out (str): run folder: checkpoints/, log.jsonl, student_vit_t.safetensors.
      image_root (str or None): image folder, if it moved since ``embed``.
      teacher_checkpoint (str or None): where the prompt encoder and mask decoder are taken from;
        default: the teacher checkpoint recorded in the store.
      decoder_from (str or None): a vit_t checkpoint whose prompt encoder and mask decoder to use
        instead (e.g. mobile_sam.pt).
      init (str or None): vit_t checkpoint to initialise the student encoder from (fine-tuning);
        default random initialisation from ``seed``.
      epochs (float): passes over the data; ignored when ``steps`` is set.
      steps (int or None): optimizer steps in total.
      batch_size (int): images per micro-batch per process.
      grad_accum (int): micro-batches per optimizer step per process.
      lr, min_lr, weight_decay, betas: AdamW and cosine schedule settings.
      warmup_steps (int or None): linear warm-up; default 5% of steps, at most 1000.
      clip_grad (float): gradient-norm clipping; 0 disables.
      amp (str): "auto" (bf16 on CUDA when supported, else off), "none", "bf16" (CPU or CUDA), "fp16" (CUDA).
      checkpoint_every (int): steps between checkpoints. keep_checkpoints (int): newest kept.
      resume (str): "auto" (latest checkpoint in out/checkpoints if any), "none", or a file.
      stop_after (int or None): stop (with a checkpoint) once this step is reached, e.g. for
        time-sliced jobs; the schedule still follows ``steps``.
      full_stage (bool): add TinySAM's decoder token and mask losses.
      prompts_per_image (int), hard_rounds (int), weights (FullStageWeights): full-stage settings.
      train_decoder (bool): fine-tune the student's mask decoder too (full-stage only).
      embed_loss (str): "mse" or "l1".
      num_workers (int): DataLoader worker processes.
      seed (int), device (str or None), log_every (int), progress (bool), verify_images (bool).
    """

    embeddings: str
    out: str
    image_root: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    decoder_from: Optional[str] = None
    init: Optional[str] = None
    epochs: float = 8.0
    steps: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_steps: Optional[int] = None
    clip_grad: float = 0.0
    amp: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = "auto"
    stop_after: Optional[int] = None
    full_stage: bool = False
    prompts_per_image: int = 16
    hard_rounds: int = 9
    weights: FullStageWeights = field(default_factory=FullStageWeights)
    train_decoder: bool = False
    embed_loss: str = "mse"
    num_workers: int = 0
    seed: int = 0
    device: Optional[str] = None
    log_every: int = 1
    progress: bool = True
    verify_images: bool = True


# ----------------------------------------------------------------------------- data


class _ImageEmbeddingDataset(torch.utils.data.Dataset):
    def __init__(self, store: EmbeddingStore, verify: bool) -> None:
        self.store = store
        self.verify = verify

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        rec = self.store.records[i]
        path = self.store.image_path(i)
        if not path.is_file():
            raise FileNotFoundError(
                f"Image {path} listed in the embedding store is missing; pass --image-root if the "
                "images moved."
            )
        if self.verify and sha256_file(str(path)) != rec["sha256"]:
            raise ValueError(
                f"Image {path} changed since its embedding was computed (sha256 mismatch); rerun "
                "`distill embed` into a new store."
            )
        image = _models.load_rgb(str(path))
        x, hw = _models.preprocess(image, self.store.image_size)
        return x, self.store.embedding(i), torch.tensor(hw), i


def _collate(items):
    xs, embs, hws, idx = zip(*items)
    return torch.stack(xs), torch.stack(embs), torch.stack(hws), list(idx)


class BatchPlan:
    """Which dataset indices each (step, rank, accumulation step) uses. Pure function of its inputs.

    Arguments:
      n (int): dataset size. batch_size, grad_accum, world_size (int). seed (int).
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, world_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.global_batch = batch_size * grad_accum * world_size
        if n < self.global_batch:
            raise ValueError(
                f"The store holds {n} images but one global batch needs {self.global_batch} "
                f"(batch_size {batch_size} x grad_accum {grad_accum} x {world_size} processes). "
                "Lower --batch-size/--grad-accum or embed more images."
            )
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch = -1
        self._perm: Optional[torch.Tensor] = None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, rank: int, accum: int) -> List[int]:
        epoch, b = divmod(step, self.steps_per_epoch)
        gb = self._perm_for(epoch)[b * self.global_batch : (b + 1) * self.global_batch]
        chunk = rank * self.grad_accum + accum
        return gb[chunk * self.batch_size : (chunk + 1) * self.batch_size].tolist()


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan, start: int, end: int, rank: int) -> None:
        self.plan, self.start, self.end, self.rank = plan, start, end, rank

    def __iter__(self):
        for step in range(self.start, self.end):
            for a in range(self.plan.grad_accum):
                yield self.plan.indices(step, self.rank, a)

    def __len__(self) -> int:
        return (self.end - self.start) * self.plan.grad_accum


# ----------------------------------------------------------------------------- models


def build_student(
    image_size: int,
    head_state: Dict[str, torch.Tensor],
    init: Optional[str] = None,
    seed: int = 0,
) -> nn.Module:
    """A vit_t SAM whose encoder is to be trained and whose prompt encoder / decoder come from ``head_state``.

    Arguments:
      image_size (int): input side.
      head_state (dict): prompt_encoder.* and mask_decoder.* tensors.
      init (str or None): vit_t checkpoint for the encoder; None: random init seeded by ``seed``.
      seed (int): seed of the random initialisation.

    Returns:
      Sam: vit_t model (eval mode).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _models.build_sam_sized("vit_t", image_size)
    if init is not None:
        sd = load_state_dict(init, "vit_t")
        enc = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
        sam.image_encoder.load_state_dict(enc, strict=True)
    return _models.load_head(sam, head_state, "head_state")


class DistillModule(nn.Module):
    """Student (trainable) and frozen teacher head; ``forward`` returns the losses of a micro-batch."""

    def __init__(self, student: nn.Module, teacher_head: Optional[nn.Module], cfg: TrainConfig) -> None:
        super().__init__()
        self.student = student
        self.teacher_head = teacher_head
        self.cfg = cfg
        # The classification head of TinyViT is unused by SAM; freezing it keeps DDP from waiting
        # for gradients that never come.
        for name, p in student.named_parameters():
            trainable = name.startswith("image_encoder.") and not name.startswith(
                ("image_encoder.head.", "image_encoder.norm_head.")
            )
            if cfg.full_stage and cfg.train_decoder and name.startswith("mask_decoder."):
                trainable = True
            p.requires_grad_(trainable)
        if teacher_head is not None:
            teacher_head.requires_grad_(False)

    def forward(self, x, teacher_emb, hws, generator: Optional[torch.Generator] = None):
        cfg = self.cfg
        student_emb = self.student.image_encoder(x)
        emb_loss = embedding_loss(student_emb, teacher_emb, cfg.embed_loss)
        out = {"embedding": emb_loss}
        if not cfg.full_stage:
            out["loss"] = emb_loss
            return out
        tok_terms, mask_terms = [], []
        for i in range(x.shape[0]):
            t_e = teacher_emb[i : i + 1].float()
            s_e = student_emb[i : i + 1]
            coords, labels = hard_prompt_sampling(
                self.teacher_head, self.student, t_e, s_e.detach().float(), cfg.prompts_per_image,
                (int(hws[i, 0]), int(hws[i, 1])), cfg.hard_rounds, generator,
            )
            fs = full_stage_loss(self.teacher_head, self.student, t_e, s_e.float(),
                                 coords.to(x.device), labels.to(x.device))
            per = fs["mask_per_prompt"]
            if cfg.weights.hard_mask_weighting:
                w = hard_mask_weights(fs["iou"])
                mask_terms.append((w * per).sum() / w.sum())
            else:
                mask_terms.append(per.mean())
            tok_terms.append(fs["tokens"])
        out["tokens"] = torch.stack(tok_terms).mean()
        out["masks"] = torch.stack(mask_terms).mean()
        w = cfg.weights
        out["loss"] = w.embedding * emb_loss + w.tokens * out["tokens"] + w.masks * out["masks"]
        return out


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, step: int, model: nn.Module, optimizer, scheduler, scaler, cfg: TrainConfig) -> None:
    """Write model, optimizer, schedule, scaler, RNG and step to one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors["model." + k] = v.detach().cpu().contiguous()
    osd = optimizer.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            tensors[f"optim.{pid}.{name}"] = v.detach().cpu().contiguous()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s.cpu() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {
        "format": CKPT_FORMAT,
        "step": str(step),
        "param_groups": json.dumps(osd["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}),
        "config": json.dumps(dataclasses.asdict(cfg), default=str),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CKPT_FORMAT:
            raise ValueError(f"{path} is not a distillation training checkpoint ({CKPT_FORMAT}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    sc = json.loads(meta.get("scaler", "{}"))
    if scaler is not None and scaler.is_enabled() and sc:
        scaler.load_state_dict(sc)
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return int(meta["step"])


def export_student(sam: nn.Module, path: str) -> None:
    """Save a vit_t SAM as a plain segment_anything-layout safetensors file (loads with the registry)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    meta = {"format": "pt", "model_type": "vit_t", "producer": "sam-drop-in distill"}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


# ----------------------------------------------------------------------------- training


def _amp_settings(amp: str, device: torch.device):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    # Only fp16 scales the loss; a disabled scaler passes loss, backward and step through.
    disabled = torch.amp.GradScaler(device.type, enabled=False)
    if amp == "none":
        return contextlib.nullcontext, disabled
    if amp == "bf16":
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), disabled
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device; use bf16 or none on CPU.")
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    raise ValueError(f"amp must be auto, none, bf16 or fp16, got {amp!r}")


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def train(cfg: TrainConfig) -> Dict:
    """Run (or resume) a distillation run. Works as a single process or under ``torchrun``.

    Arguments:
      cfg (TrainConfig): settings.

    Returns:
      dict: {"losses": list[float] of the global-batch loss at each step run in this call,
      "steps": list[int], "final_step": int, "export": str or None (path of the vit_t file,
      written when the run reaches its last step), "checkpoint": str or None}.
    """
    # torchrun's environment; a plain process is rank 0 of 1.
    env = os.environ
    world, rank, local = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    own_pg = False
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        own_pg = True
    try:
        return _train(cfg, world, rank, local)
    finally:
        if own_pg:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, world: int, rank: int, local: int) -> Dict:
    from tqdm import tqdm

    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.train_decoder and not cfg.full_stage:
        raise ValueError("--train-decoder needs --full-stage (the decoder gets no gradient from the embedding loss).")
    out = Path(cfg.out)
    if rank == 0:
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)

    store = EmbeddingStore(cfg.embeddings, image_root=cfg.image_root)
    image_size = store.image_size
    teacher_meta = store.meta["teacher"]
    head_src = cfg.decoder_from or cfg.teacher_checkpoint or teacher_meta.get("checkpoint")
    head_type = "vit_t" if cfg.decoder_from else teacher_meta["model_type"]
    if head_src is None:
        raise ValueError(
            "The store's teacher had random weights and no checkpoint; pass --teacher-checkpoint or "
            "--decoder-from so the student gets a prompt encoder and mask decoder."
        )
    head = _models.read_head_state(head_src, head_type)
    student = build_student(image_size, head, init=cfg.init, seed=cfg.seed)
    teacher_head = None
    if cfg.full_stage:
        teacher_src = cfg.teacher_checkpoint or teacher_meta.get("checkpoint") or head_src
        teacher_head = _models.load_head(_models.build_sam_sized("vit_t", image_size),
                                         _models.read_head_state(teacher_src, teacher_meta["model_type"]), teacher_src)
    module = DistillModule(student, teacher_head, cfg).to(device)
    student.train()
    student.mask_decoder.train(cfg.train_decoder)
    if teacher_head is not None:
        teacher_head.eval()

    ddp_model: nn.Module = module
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    plan = BatchPlan(len(store), cfg.batch_size, cfg.grad_accum, world, cfg.seed)
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, max(1, total // 20))

    decay, no_decay = [], []
    for name, p in module.student.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "attention_biases" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, cfg.min_lr / cfg.lr))
    autocast, scaler = _amp_settings(cfg.amp, device)

    start = 0
    resume_path: Optional[Path] = None
    if cfg.resume == "auto":
        resume_path = max((out / CKPT_DIR).glob("step-*.safetensors"), default=None)  # zero-padded step names
    elif cfg.resume not in ("none", "", None):
        resume_path = Path(cfg.resume)
        if not resume_path.is_file():
            raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint file.")
    if resume_path is not None:
        start = load_checkpoint(resume_path, module.student, optimizer, scheduler, scaler)
    end = total if cfg.stop_after is None else min(total, cfg.stop_after)

    loader = torch.utils.data.DataLoader(
        _ImageEmbeddingDataset(store, cfg.verify_images),
        batch_sampler=_PlanSampler(plan, start, end, rank),
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    it = iter(loader)
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and rank == 0), desc="train", unit="step")
    log = open(out / LOG_NAME, "a") if rank == 0 else None
    losses: List[float] = []
    steps: List[int] = []
    last_ckpt: Optional[str] = None
    t0 = time.time()
    try:
        for step in range(start, end):
            optimizer.zero_grad(set_to_none=True)
            parts: Dict[str, float] = {}
            for a in range(cfg.grad_accum):
                x, emb, hws, _ = next(it)
                x, emb = x.to(device, non_blocking=True), emb.to(device, non_blocking=True)
                gen = torch.Generator().manual_seed(
                    (cfg.seed * 1_000_003 + step * 1_009 + rank * cfg.grad_accum + a) % (2**63)
                )
                sync = contextlib.nullcontext()
                if world > 1 and a < cfg.grad_accum - 1:
                    sync = ddp_model.no_sync()
                with sync:
                    with autocast():
                        res = ddp_model(x, emb, hws, gen)
                    scaler.scale(res["loss"] / cfg.grad_accum).backward()
                for k, v in res.items():
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if world > 1:
                keys = sorted(parts)
                t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(t)
                parts = {k: float(v) / world for k, v in zip(keys, t.tolist())}
            losses.append(parts["loss"])
            steps.append(step)
            done = step + 1
            if log is not None and (done % cfg.log_every == 0 or done == end):
                rec = {"step": done, "lr": lr, "time_s": round(time.time() - t0, 3), **parts}
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4g}")
            if done % cfg.checkpoint_every == 0 or done == end:
                if rank == 0:
                    path = out / CKPT_DIR / f"step-{done:08d}.safetensors"
                    save_checkpoint(path, done, module.student, optimizer, scheduler, scaler, cfg)
                    last_ckpt = str(path)
                    olds = sorted((out / CKPT_DIR).glob("step-*.safetensors"))
                    for old in olds[: max(0, len(olds) - cfg.keep_checkpoints)]:
                        old.unlink()
                if world > 1:
                    torch.distributed.barrier()
    finally:
        bar.close()
        if log is not None:
            log.close()
    export = None
    if end == total and rank == 0:
        export = str(out / EXPORT_NAME)
        module.student.eval()
        export_student(module.student, export)
    return {"losses": losses, "steps": steps, "final_step": end, "export": export, "checkpoint": last_ckpt}
