"""``distill embed``: run a teacher image encoder over a folder and store its embeddings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from .._constants import registry_model_type
from .._fileio import atomic_write, sha256_file
from . import _models
from .store import FORMAT, MANIFEST, META, SHARD_DIR, iter_batches, read_manifest, shard_name

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def embed_folder(
    images: str,
    out: str,
    model_type: str = "vit_h",
    checkpoint: Optional[str] = None,
    image_size: int = _models.DEFAULT_IMAGE_SIZE,
    batch_size: int = 1,
    shard_size: int = 256,
    dtype: str = "float32",
    device: Optional[str] = None,
    progress: bool = True,
) -> Dict:
    """Compute teacher image embeddings for every image below ``images`` and store them in ``out``.

    Resumable: images already in the manifest (same relative path) are skipped, so rerunning
    the same command after an interruption finishes the job. A store made with another
    teacher, image size or dtype is refused rather than mixed.

    Arguments:
      images (str): folder of images (searched recursively; jpg, png, bmp, tif, webp).
      out (str): store folder (created if missing).
      model_type (str): teacher registry type: default, vit_h, vit_l, vit_b or vit_t.
      checkpoint (str or None): teacher weights, local path or ``hf://OWNER/REPO/FILE``.
        None means random weights (only useful for tests).
      image_size (int): model input side; 1024 for the published models.
      batch_size (int): images per teacher forward pass.
      shard_size (int): embeddings per safetensors shard.
      dtype (str): stored dtype: float32, float16 or bfloat16 (float16 halves disk use:
        4 MiB -> 2 MiB per image at 1024 pixels).
      device (str or None): torch device; default cuda when available, else cpu.
      progress (bool): show a tqdm progress bar.

    Returns:
      dict: {"total": int, "computed": int, "skipped": int, "out": str}.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be at least 1.")
    model_type = registry_model_type(model_type)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_p = Path(out)
    (out_p / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    image_root = Path(images).resolve()
    paths = _models.list_images(str(image_root))
    if not paths:
        raise ValueError(f"No images (extensions {', '.join(_models.IMAGE_EXTENSIONS)}) found in {images}.")

    grid = image_size // _models.PATCH_SIZE
    meta = {
        "format": FORMAT,
        "teacher": {"model_type": model_type, "checkpoint": None if checkpoint is None else str(checkpoint)},
        "image_size": image_size,
        "embedding_shape": [_models.PROMPT_EMBED_DIM, grid, grid],
        "dtype": dtype,
        "image_root": str(image_root),
    }
    meta_path = out_p / META
    if meta_path.is_file():
        with open(meta_path) as f:
            old = json.load(f)
        for key in ("format", "teacher", "image_size", "embedding_shape", "dtype"):
            if old.get(key) != meta[key]:
                raise ValueError(
                    f"{out} already holds embeddings with {key}={old.get(key)!r}, not {meta[key]!r}. "
                    "Use another --out folder, or the same settings to resume."
                )
    else:
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)))

    done = read_manifest(out_p)
    # Rewrite the manifest with only its complete, valid lines, so that lines appended below
    # never join a line torn by an earlier crash.
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in done)
    atomic_write(out_p / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    done_paths = {r["path"] for r in done}
    next_index = max((r["index"] for r in done), default=-1) + 1
    next_shard = max((int(r["shard"][-18:-12]) for r in done), default=-1) + 1
    todo = [p for p in paths if p not in done_paths]

    teacher = _models.load_sam(model_type, checkpoint, image_size=image_size, device=device)
    encoder = teacher.image_encoder
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), disable=not progress,
               desc="embed", unit="img")
    manifest = open(out_p / MANIFEST, "a")
    computed = 0
    try:
        for shard_items in iter_batches(todo, shard_size):
            tensors: Dict[str, torch.Tensor] = {}
            lines = []
            for batch in iter_batches(shard_items, batch_size):
                xs = []
                for rel in batch:
                    full = image_root / rel
                    image = _models.load_rgb(str(full))
                    x, _ = _models.preprocess(image, image_size)
                    xs.append(x)
                    lines.append({
                        "index": next_index,
                        "path": rel,
                        "height": int(image.shape[0]),
                        "width": int(image.shape[1]),
                        "sha256": sha256_file(str(full)),
                        "shard": shard_name(next_shard),
                        "key": f"{next_index:09d}",
                    })
                    next_index += 1
                with torch.inference_mode():
                    emb = encoder(torch.stack(xs).to(device))
                for line, e in zip(lines[len(lines) - len(batch):], emb):
                    tensors[line["key"]] = e.to(_DTYPES[dtype]).cpu().contiguous()
                bar.update(len(batch))
                computed += len(batch)
            shard = out_p / shard_name(next_shard)
            atomic_write(shard, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
            for line in lines:
                manifest.write(json.dumps(line, sort_keys=True) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            next_shard += 1
    finally:
        manifest.close()
        bar.close()
    return {"total": len(paths), "computed": computed, "skipped": len(paths) - len(todo), "out": str(out_p)}
