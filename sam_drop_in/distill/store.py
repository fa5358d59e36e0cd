"""On-disk store of teacher image embeddings: safetensors shards plus a JSON-lines manifest.

Layout of a store folder::

    meta.json            teacher, image size, embedding shape and dtype, image root
    manifest.jsonl       one line per image: index, path (relative to the image root), height,
                         width, sha256, shard, key
    shards/embeddings-000000.safetensors   tensors named by the manifest's ``key``

A shard is written to a temporary name and renamed into place before its manifest lines are
appended, so an interrupted run leaves either a complete shard with its lines or nothing that
the manifest refers to; a rerun carries on after the last complete shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

FORMAT = "sam-drop-in-embeddings/1"
META = "meta.json"
MANIFEST = "manifest.jsonl"
SHARD_DIR = "shards"


def shard_name(shard: int) -> str:
    return f"{SHARD_DIR}/embeddings-{shard:06d}.safetensors"


class EmbeddingStore:
    """Read access to a store folder written by :func:`sam_drop_in.distill.embed.embed_folder`.

    Arguments:
      root (str): the store folder.
      image_root (str or None): where the images are; defaults to the one recorded in meta.json.

    Attributes:
      meta (dict): contents of meta.json.
      records (list[dict]): manifest lines in index order.
    """

    def __init__(self, root: str, image_root: Optional[str] = None) -> None:
        self.root = Path(root)
        meta_path = self.root / META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{root} is not an embedding store (no {META}). Create one with "
                f"`sam-drop-in distill embed --images DIR --out {root} ...`."
            )
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}.")
        self.image_root = Path(image_root if image_root is not None else self.meta["image_root"])
        self.records: List[Dict] = read_manifest(self.root)
        if not self.records:
            raise ValueError(f"Embedding store {root} holds no embeddings yet; run `distill embed` first.")
        self._handles: Dict[str, object] = {}

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        return self.image_root / self.records[i]["path"]

    def embedding(self, i: int) -> torch.Tensor:
        """Embedding of record ``i`` as a 256xE xE float32 tensor."""
        from safetensors import safe_open

        rec = self.records[i]
        shard = rec["shard"]
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.root / shard), framework="pt")
            self._handles[shard] = handle
        return handle.get_tensor(rec["key"]).float()

    def __getstate__(self):
        # safetensors handles cannot be pickled (DataLoader workers, Ray); reopen lazily.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def read_manifest(root: Path) -> List[Dict]:
    """Manifest lines of a store, skipping a torn last line left by a crash."""
    path = Path(root) / MANIFEST
    out: List[Dict] = []
    if not path.is_file():
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if (Path(root) / rec["shard"]).is_file():
                out.append(rec)
    out.sort(key=lambda r: r["index"])
    return out


def iter_batches(items: List, n: int) -> Iterator[List]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
