"""``sam-drop-in distill {embed,train,eval,label}``: the distillation tools (docs/distill.md).

``python -m sam_drop_in.distill ...`` runs the same command (it is how ``torchrun
--nproc_per_node N -m sam_drop_in.distill train ...`` starts data-parallel training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .._constants import REGISTRY_KEYS
from .._validation import AMG_OPTIONS
from ._common import CliError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="train your own vit_t: embed, train, eval; label folders with Ray",
        description="Decoupled (MobileSAM) and full-stage (TinySAM) distillation into a vit_t, "
        "evaluation against the teacher, and everything-mode labelling at scale.",
    )
    sub = p.add_subparsers(dest="distill_command", metavar="{embed,train,eval,label}")
    sub.required = True
    for add in (_add_embed, _add_train, _add_eval, _add_label):
        add(sub)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``distill`` subcommand; prints its JSON summary (rank 0 only under torchrun)."""
    try:
        result = args._distill(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise CliError(str(exc)) from None
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, indent=2, default=str))
    return 0


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="compute teacher image embeddings for an image folder (resumable)")
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="embedding store folder")
    p.add_argument("--model-type", default="vit_h", choices=REGISTRY_KEYS, help="teacher model type")
    p.add_argument("--checkpoint", default=None, help="teacher weights: local path or hf://OWNER/REPO/FILE")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input side (default: the published models' 1024; smaller only for experiments)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=256, help="embeddings per safetensors shard")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_distill=_run_embed)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a TinyViT student on stored embeddings (torchrun for DDP)")
    p.add_argument("--embeddings", required=True, help="store folder from `distill embed`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, student_vit_t.safetensors)")
    p.add_argument("--image-root", default=None, help="image folder if it moved since embedding")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="teacher file for prompt encoder/mask decoder (default: the one in the store)")
    p.add_argument("--decoder-from", default=None, help="vit_t checkpoint supplying prompt encoder/mask decoder")
    p.add_argument("--init", default=None, help="vit_t checkpoint to initialise the student encoder")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="images per micro-batch per process")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    # Settings without more to say than TrainConfig's docstring: (flag, type, default).
    for flag, typ, default in (
        ("--epochs", float, 8.0), ("--grad-accum", int, 1), ("--lr", float, 1e-3), ("--min-lr", float, 1e-5),
        ("--weight-decay", float, 0.05), ("--warmup-steps", int, None), ("--clip-grad", float, 0.0),
        ("--checkpoint-every", int, 1000), ("--keep-checkpoints", int, 3), ("--prompts-per-image", int, 16),
        ("--embedding-weight", float, 1.0), ("--token-weight", float, 1.0), ("--mask-weight", float, 1.0),
        ("--num-workers", int, 0), ("--seed", int, 0), ("--log-every", int, 1),
    ):
        p.add_argument(flag, type=typ, default=default)
    p.add_argument("--resume", default="auto", help="auto (latest in OUT/checkpoints), none, or a checkpoint file")
    p.add_argument("--stop-after", type=int, default=None, help="stop with a checkpoint at this step")
    p.add_argument("--full-stage", action="store_true", help="add TinySAM decoder token and mask losses")
    p.add_argument("--hard-rounds", type=int, default=9, help="max hard prompt sampling rounds")
    p.add_argument("--no-hard-mask-weighting", action="store_true")
    p.add_argument("--train-decoder", action="store_true", help="fine-tune the mask decoder (needs --full-stage)")
    p.add_argument("--embed-loss", default="mse", choices=["mse", "l1"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-verify-images", action="store_true", help="skip sha256 checks of images")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_distill=_run_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="student-vs-teacher mIoU (random points and boxes) and embedding MSE")
    p.add_argument("--student", required=True, help="vit_t checkpoint")
    p.add_argument("--embeddings", required=True, help="store of held-out images from `distill embed`")
    p.add_argument("--teacher-checkpoint", default=None)
    p.add_argument("--image-root", default=None)
    p.add_argument("--points", type=int, default=16, help="random point prompts per image")
    p.add_argument("--boxes", type=int, default=16, help="random box prompts per image")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(_distill=_run_eval)


def _add_label(sub) -> None:
    p = sub.add_parser("label", help="everything-mode COCO-RLE JSON lines for a folder, locally or with Ray")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--model-type", default="vit_t", choices=REGISTRY_KEYS)
    p.add_argument("--checkpoint", default=None)
    for name, typ, _, help_text in AMG_OPTIONS:  # unset: the generator's default
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)
    p.add_argument("--ray", action="store_true", help="run through Ray Data (pip install \"sam-drop-in[ray]\")")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_distill=_run_label)


def _run_embed(a) -> dict:
    from ..distill.embed import embed_folder

    size = {} if a.image_size is None else {"image_size": a.image_size}
    return embed_folder(a.images, a.out, a.model_type, a.checkpoint, batch_size=a.batch_size,
                        shard_size=a.shard_size, dtype=a.dtype, device=a.device, progress=not a.no_progress, **size)


def _run_train(a) -> dict:
    from ..distill.losses import FullStageWeights
    from ..distill.train import TrainConfig, train

    # Every flag but the weights and the --no-* ones has the name of its TrainConfig field.
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"weights", "progress", "verify_images"}
    cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in fields},
                      weights=FullStageWeights(a.embedding_weight, a.token_weight, a.mask_weight,
                                               not a.no_hard_mask_weighting),
                      progress=not a.no_progress, verify_images=not a.no_verify_images)
    r = train(cfg)
    return {"final_step": r["final_step"], "last_loss": r["losses"][-1] if r["losses"] else None,
            "export": r["export"], "checkpoint": r["checkpoint"]}


def _run_eval(a) -> dict:
    from ..distill.evaluate import evaluate_files

    return evaluate_files(a.student, a.embeddings, a.teacher_checkpoint, a.image_root, a.points,
                          a.boxes, a.seed, a.device, a.limit)


def _run_label(a) -> dict:
    from ..distill.ray_label import label_folder

    amg = {name: getattr(a, name) for name, *_ in AMG_OPTIONS if getattr(a, name) is not None}
    return label_folder(a.images, a.out, a.model_type, a.checkpoint, amg, use_ray=a.ray,
                        num_actors=a.num_actors, batch_size=a.batch_size,
                        num_gpus_per_actor=a.num_gpus_per_actor, num_threads=a.num_threads,
                        ray_address=a.ray_address, device=a.device, progress=not a.no_progress)
