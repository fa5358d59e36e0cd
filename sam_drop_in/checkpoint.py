"""One safe loader for every checkpoint source, format and layout.

``checkpoint=`` in every builder accepts:

- a local path (str or ``os.PathLike``) to a ``.safetensors`` file or a pickled
  ``.pt`` / ``.pth`` / ``.bin`` state dict;
- ``hf://OWNER/REPO[@REVISION]/PATH/IN/REPO`` (huggingface_hub's HfFileSystem convention);
- ``hf://OWNER/REPO[@REVISION]``: the repo's weights (its sam-drop-in ``config.json``
  names the file; else ``model.safetensors``; else the only weights file).

Safety: safetensors files are read directly; pickles only with
``torch.load(weights_only=True)``. There is no fallback to an unrestricted unpickler: a
pickle that would construct anything but tensors and containers is refused before any of
its code runs, with :class:`UnsafeCheckpointError`.

Errors: every failure raises :class:`CheckpointError`. It subclasses ``ValueError`` (the
file's content is wrong for the request) and ``RuntimeError`` (what ``torch``'s strict
``load_state_dict`` raised in segment_anything, so existing ``except RuntimeError``
handlers keep working). :class:`CheckpointNotFoundError` (missing local file, Hub repo,
revision or file) is also a ``FileNotFoundError``, as ``open(checkpoint)`` was upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from . import _hub, _layouts
from ._errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from ._layouts import MODEL_TYPES, SEGMENT_ANYTHING
from ._manifest import MANIFEST, MODEL_CARD_TEMPLATE, default_checkpoint, entries

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "load_state_dict",
    "load_into",
    "read_state_dict",
    "resolve",
    "inspect_checkpoint",
    "convert",
    "default_checkpoint",
    "entries",
    "MANIFEST",
]

Source = Union[str, "os.PathLike[str]"]



def _registry_hint(model_type: str) -> str:
    return f"sam_model_registry['{model_type}']"


def resolve(source: Source) -> tuple[str, dict]:
    """Turn a checkpoint source into a local file path.

    Arguments:
      source (str | os.PathLike): local path or ``hf://`` address.

    Returns:
      (tuple[str, dict]): the local path (inside the huggingface_hub cache for Hub
      sources), and the sam-drop-in ``config.json`` of a Hub repo (empty dict otherwise).

    Raises:
      CheckpointNotFoundError: the file, repo or revision does not exist.
      CheckpointError: the Hub could not be reached and the file is not cached, or the
        download failed or was corrupt.
    """
    if isinstance(source, (bytes, bytearray)):
        source = os.fsdecode(source)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint must be a path (str or os.PathLike) or an 'hf://OWNER/REPO[@REVISION]/FILE' address, "
            f"got {type(source).__name__}"
        )
    if _hub.is_hf_uri(source):
        path, config, _ = _hub.fetch(str(source), CheckpointError, CheckpointNotFoundError)
        return path, config
    path = os.fspath(source)
    if path.startswith(("http://", "https://")):
        raise CheckpointError(
            f"{path!r} is a web URL; download it first, or use an hf://OWNER/REPO[@REVISION]/FILE address "
            "for files on the Hugging Face Hub"
        )
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"checkpoint file not found: {path!r} (for the Hugging Face Hub use "
            f"hf://OWNER/REPO[@REVISION]/FILE, e.g. {default_checkpoint('vit_t')!r})"
        )
    if os.path.isdir(path):
        for name in ("model.safetensors",):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name), _read_local_config(path)
        raise CheckpointError(f"{path!r} is a directory without model.safetensors; pass the weights file itself")
    return path, {}


def _read_local_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        return raw if isinstance(raw, dict) else {}
    except (OSError, ValueError):
        return {}


def _is_safetensors(path: str) -> bool:
    # A safetensors file is an 8-byte little-endian header length followed by a JSON object.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a local checkpoint file into a raw state dict (layout untouched).

    Arguments:
      path (str | os.PathLike): a safetensors file or a pickled torch checkpoint.

    Returns:
      (tuple[dict[str, torch.Tensor], str]): CPU tensors (containers unwrapped, ``module.``
      / ``_orig_mod.`` prefixes stripped) and the format, "safetensors" or "pickle".

    Raises:
      UnsafeCheckpointError: a pickle that needs more than tensors and containers.
      CheckpointError: truncated, corrupt or not a state dict.
    """
    path = os.fspath(path)
    try:
        is_st = _is_safetensors(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from exc
    if is_st:
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except Exception as exc:  # SafetensorError for bad headers, truncation, bad offsets
            raise CheckpointError(
                f"{path!r} is not a valid safetensors file (truncated or corrupt: {exc}); "
                "download or convert it again"
            ) from exc
        fmt = "safetensors"
    else:
        try:
            # weights_only=True: only tensors and plain containers may be reconstructed; a
            # pickle that names any other callable is rejected before it is called.
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refused to load {path!r}: the pickle asks to create objects other than tensors "
                f"({str(exc).splitlines()[0][:300]}). Nothing from it was executed. Pickles can run arbitrary "
                "code, so sam-drop-in only reads plain state dicts. If you trust the file, load it with the code "
                "that wrote it, save the state dict with safetensors.torch.save_file(), and pass that file."
            ) from None
        except Exception as exc:  # zip/EOF/format errors: the file is cut short or not a checkpoint
            raise CheckpointError(
                f"cannot read {path!r} as a PyTorch checkpoint (truncated, corrupt, or not a checkpoint: "
                f"{type(exc).__name__}: {str(exc)[:300]}); download or convert it again"
            ) from exc
        fmt = "pickle"
    try:
        sd = _layouts.unwrap_container(obj)
    except ValueError as exc:
        raise CheckpointError(f"{path!r}: {exc}") from None
    return _layouts.strip_prefixes(sd), fmt


def _describe(info: dict, layout: str | None) -> str:
    if info["kind"] == "vit":
        return f"a ViT image encoder of width {info['width']} and depth {info['depth']} ({layout} layout)"
    if info["kind"] == "tiny_vit":
        return f"a TinyViT image encoder with {info['depth']} stages ending at width {info['width']}"
    return "no recognisable image encoder"


def _convert(sd: dict[str, torch.Tensor], origin: str) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Layout-convert and identify; raises CheckpointError for what cannot be a SAM checkpoint."""
    bare = _layouts.looks_like_bare_encoder(sd)
    if bare is not None and _layouts.detect_layout(sd) is None:
        raise CheckpointError(
            f"{origin} holds only an image encoder ({'TinyViT' if bare == 'tiny_vit' else 'ViT'}, keys like "
            f"{sorted(sd)[0]!r}), not a full SAM model: the prompt encoder and mask decoder are missing. "
            "Combine it with a full checkpoint's prompt_encoder.* and mask_decoder.* weights, prefixing the "
            "encoder's keys with 'image_encoder.'"
        )
    try:
        out, layout = _layouts.to_segment_anything(sd)
    except ValueError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None
    if layout is None:
        sample = ", ".join(sorted(sd)[:5])
        raise CheckpointError(
            f"{origin} is not a Segment Anything checkpoint in any layout sam-drop-in knows "
            f"(segment_anything/MobileSAM/TinySAM or transformers SamModel); its first keys are: {sample}"
        )
    info = _layouts.describe_encoder(out)
    return out, layout, info["model_type"]


def load_state_dict(source: Source, model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint from any supported source and layout, in segment_anything's key layout.

    This is what every builder calls with its ``checkpoint=`` argument.

    Arguments:
      source (str | os.PathLike): local path, ``hf://OWNER/REPO[@REV]/PATH`` or ``hf://OWNER/REPO[@REV]``.
      model_type (str | None): "vit_h", "vit_l", "vit_b" or "vit_t" ("default" = vit_h); when
        given, the file must hold that model type.

    Returns:
      (dict[str, torch.Tensor]): CPU tensors keyed as segment_anything's ``Sam`` (for vit_t,
      MobileSAM's keys: 439 entries with TinyViT keys under ``image_encoder.``), dtypes as stored.

    Raises:
      CheckpointNotFoundError: the file, Hub repo, revision or Hub file does not exist.
      UnsafeCheckpointError: a pickle that would run code; nothing was executed.
      CheckpointError: unreadable, corrupt, unknown layout, or a different model type
        ("this is a vit_b checkpoint; use sam_model_registry['vit_b']").
    """
    if model_type == "default":
        model_type = "vit_h"
    if model_type is not None and model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    path, _config = resolve(source)
    sd, _fmt = read_state_dict(path)
    return _checked(sd, f"checkpoint {os.fspath(source)!r}", model_type)


def _checked(sd: dict[str, torch.Tensor], origin: str, model_type: str | None) -> dict[str, torch.Tensor]:
    """Convert to segment_anything keys and check the model type; CheckpointError otherwise."""
    out, layout, found = _convert(sd, origin)
    if found is None:
        info = _layouts.describe_encoder(out)
        raise CheckpointError(
            f"{origin} holds {_describe(info, layout)}, which is not one of the standard SAM models "
            f"(vit_b 768x12, vit_l 1024x24, vit_h 1280x32, vit_t TinyViT); sam_model_registry cannot build it"
        )
    if model_type is not None and found != model_type:
        raise CheckpointError(
            f"{origin}: this is a {found} checkpoint, but a {model_type} model was requested; "
            f"use {_registry_hint(found)}(checkpoint=...)"
        )
    missing = [p for p in ("image_encoder.", "prompt_encoder.", "mask_decoder.") if not any(k.startswith(p) for k in out)]
    if missing:
        raise CheckpointError(
            f"{origin} is a {found} checkpoint without any {', '.join(m + '*' for m in missing)} weights; "
            "a full SAM checkpoint is needed"
        )
    return out


def load_into(model: torch.nn.Module, source: Source | Mapping[str, torch.Tensor], model_type: str | None = None) -> None:
    """Load a checkpoint into a SAM model strictly, with an error that names the keys.

    Arguments:
      model (torch.nn.Module): a segment_anything-layout ``Sam`` (ours, segment_anything's or mobile_sam's).
      source (str | os.PathLike | Mapping[str, Tensor]): anything :func:`load_state_dict` takes,
        or a state dict already in segment_anything's layout.
      model_type (str | None): checked against the file when given.

    Raises:
      CheckpointError: as :func:`load_state_dict`, or the keys or shapes do not match the model
        (the message lists a few missing and unexpected keys).
    """
    sd = dict(source) if isinstance(source, Mapping) else load_state_dict(source, model_type=model_type)
    expected = model.state_dict()
    missing, unexpected, summary = _layouts.key_diff(sd, expected)
    if missing or unexpected:
        found = _layouts.detect_model_type(sd)
        looks = f"the file looks like a {found} checkpoint" if found else "the file is not a standard SAM model"
        raise CheckpointError(f"checkpoint does not match the model: {summary}; {looks}")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"checkpoint does not match the model: {len(bad)} tensors have other shapes, e.g. {k} is "
            f"{tuple(sd[k].shape)} in the file and {tuple(expected[k].shape)} in the model"
        )
    model.load_state_dict(sd, strict=True)


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _num_params(sd: Mapping[str, torch.Tensor]) -> int:
    # BatchNorm statistics and the prompt encoder's random Fourier matrix are buffers, not
    # parameters; leave them out so the count matches sum(p.numel() for p in model.parameters()).
    skip = ("running_mean", "running_var", "num_batches_tracked", "positional_encoding_gaussian_matrix")
    return int(sum(v.numel() for k, v in sd.items() if not k.endswith(skip)))


def inspect_checkpoint(source: Source) -> dict[str, Any]:
    """Describe a checkpoint without building a model (for ``sam-drop-in info``).

    Arguments:
      source (str | os.PathLike): local path or ``hf://`` address.

    Returns:
      (dict): ``model_type`` (str | None), ``layout`` ("segment_anything" | "transformers"),
      ``format`` ("safetensors" | "pickle"), ``num_params`` (int), ``num_tensors`` (int,
      after conversion to segment_anything keys), ``dtype`` (str, e.g. "torch.float32"),
      ``sha256`` (str, of the file), ``path`` (str, local file), ``size_bytes`` (int).

    Raises:
      CheckpointError: as :func:`load_state_dict`.
    """
    path, _ = resolve(source)
    sd, fmt = read_state_dict(path)
    out, layout, found = _convert(sd, f"checkpoint {os.fspath(source)!r}")
    dtypes = sorted({str(v.dtype) for v in out.values() if v.is_floating_point()})
    return {
        "model_type": found,
        "layout": layout,
        "format": fmt,
        "num_params": _num_params(out),
        "num_tensors": len(out),
        "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
        "sha256": _sha256_file(path),
        "path": path,
        "size_bytes": os.path.getsize(path),
    }


def _atomic_write(dst: Path, write) -> None:
    """Write via a temporary file in the same folder and os.replace, so dst is never partial."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _unshare(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory and non-contiguous ones.
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    return out


def convert(
    src: Source,
    dst: str | os.PathLike,
    model_type: str | None = None,
    *,
    push_to_hub: str | None = None,
    private: bool | None = None,
) -> Path:
    """Convert any supported checkpoint to a segment_anything-layout safetensors folder.

    Writes ``dst/model.safetensors`` (segment_anything keys), ``dst/config.json``
    (``model_type``, ``layout``, ``weights``, ``source``, ``source_sha256``, ...) and
    ``dst/README.md`` (a model card). Each file goes through a temporary file and
    ``os.replace``, so an interrupted conversion leaves no partial file; ``config.json``,
    which records the weights' sha256, is written last.

    Arguments:
      src (str | os.PathLike): local path or ``hf://`` address of the source checkpoint.
      dst (str | os.PathLike): output folder (created if missing).
      model_type (str | None): when given, the source must hold this model type.
      push_to_hub (str | None): a Hub repo id ("OWNER/REPO") to upload the folder to.
      private (bool | None): visibility of a repo created by ``push_to_hub``.

    Returns:
      (pathlib.Path): path of the written ``model.safetensors``.

    Raises:
      CheckpointError: as :func:`load_state_dict`; also when ``dst`` is an existing file.
    """
    from safetensors.torch import save_file

    from . import __version__

    dst = Path(os.fspath(dst))
    if dst.suffix == ".safetensors" or (dst.exists() and not dst.is_dir()):
        raise CheckpointError(
            f"convert writes a folder (model.safetensors, config.json, README.md); {str(dst)!r} is a file name. "
            "Pass a folder path"
        )
    if model_type == "default":
        model_type = "vit_h"
    path, _ = resolve(src)
    source_sha = _sha256_file(path)
    raw, _fmt = read_state_dict(path)
    raw_layout = _layouts.detect_layout(raw)
    sd = _checked(raw, f"checkpoint {os.fspath(src)!r}", model_type)
    del raw
    found = _layouts.detect_model_type(sd)
    dst.mkdir(parents=True, exist_ok=True)
    weights = dst / "model.safetensors"
    tensors = _unshare(sd)
    meta = {"format": "pt", "model_type": str(found), "layout": SEGMENT_ANYTHING, "converter": f"sam-drop-in {__version__}"}
    _atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=meta))
    weights_sha = _sha256_file(str(weights))

    entry = None
    if _hub.is_hf_uri(src):
        loc = _hub.parse_hf_uri(str(src))
        from ._manifest import find

        entry = find(loc.repo_id, loc.path)
    known = entry or next((e for e in MANIFEST if e["model_type"] == found), {})
    card = MODEL_CARD_TEMPLATE.format(
        license=(known.get("license") or "other").lower(),
        model_type=found,
        title=f"Segment Anything {found} (segment_anything layout, safetensors)",
        source=os.fspath(src),
        source_sha256=source_sha,
        source_layout=raw_layout,
        num_params=_num_params(tensors),
        paper=known.get("paper") or "-",
        repo_id=push_to_hub or "OWNER/REPO",
        version=f"sam-drop-in {__version__}",
    )
    _atomic_write(dst / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    config = {
        "model_type": found,
        "layout": SEGMENT_ANYTHING,
        "format": "safetensors",
        "weights": weights.name,
        "weights_sha256": weights_sha,
        "num_params": _num_params(tensors),
        "source": os.fspath(src),
        "source_sha256": source_sha,
        "source_layout": raw_layout,
        "converter": f"sam-drop-in {__version__}",
    }
    _atomic_write(dst / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    if push_to_hub:
        try:
            _hub.push_folder(dst, push_to_hub, private=private)
        except Exception as exc:
            raise CheckpointError(_hub.push_error_message(exc, dst, push_to_hub)) from exc
    return weights

