"""One safe loader for every checkpoint source (local file, ``hf://`` address), format
(safetensors, pickle) and layout (segment_anything, MobileSAM/TinySAM, transformers).

Safety: pickles are read only with ``torch.load(weights_only=True)``, with no fallback: a pickle
that would construct anything but tensors and containers is refused before any of its code
runs (:class:`UnsafeCheckpointError` names what it asked for). Every failure raises
:class:`CheckpointError` or a subclass (``_errors.py``); :func:`load_state_dict` says which.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from . import _hub, _layouts
from ._constants import MODEL_TYPES, normalize_model_type
from ._errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from ._fileio import atomic_write, read_json_object, sha256_file
from ._layouts import SEGMENT_ANYTHING
from ._quantized_header import describe_quantized
from ._manifest import MANIFEST, MODEL_CARD_TEMPLATE, default_checkpoint, entries, find
from ._version import __version__

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

# NaN/inf weights are refused unless the caller (allow_non_finite=True) or this variable allows them.
ALLOW_NON_FINITE_ENV = "SAM_DROP_IN_ALLOW_NON_FINITE"
# The files convert() writes into its output folder, config.json (the commit marker) last.
_CONVERTED_FILES = ("model.safetensors", "README.md", "config.json")


def resolve(source: Source, *, download_timeout: float | None = None) -> tuple[str, dict]:
    """Turn a checkpoint source into a local file path.

    Arguments:
      source (str | os.PathLike): local path or ``hf://`` address.
      download_timeout (float | None): seconds allowed for the whole Hub fetch; None: the
        ``SAM_DROP_IN_DOWNLOAD_TIMEOUT`` environment variable, else 1800.

    Returns:
      (tuple[str, dict]): the local path (inside the huggingface_hub cache for Hub
      sources), and the sam-drop-in ``config.json`` of a Hub repo or converted folder
      (empty dict otherwise). When that config records ``weights_sha256``, the file has
      been checked against it.

    Raises:
      CheckpointNotFoundError: the file, repo or revision does not exist.
      CheckpointError: a malformed address; the Hub could not be reached in time and the file
        is not cached; the download failed or was corrupt; the weights do not match the
        ``weights_sha256`` of their ``config.json``.
    """
    if isinstance(source, (bytes, bytearray)):
        source = os.fsdecode(source)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint must be a path (str or os.PathLike) or an 'hf://OWNER/REPO[@REVISION]/FILE' address, "
            f"got {type(source).__name__}"
        )
    if _hub.is_hf_uri(source):
        path, config = _hub.fetch(str(source), download_timeout)
        _verify_weights(path, config, f"Hub checkpoint {str(source)!r}")
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
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path!r} is a directory without model.safetensors; pass the weights file itself")
        config = read_json_object(os.path.join(path, "config.json"))
        _verify_weights(weights, config, f"converted folder {path!r}")
        return weights, config
    return path, {}


# (real path, size, mtime_ns) -> sha256: a file is hashed once per process, not on every load.
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if re.fullmatch(r"[0-9a-f]{64}", name) and os.sep + "blobs" + os.sep in real:
        # A huggingface_hub cache blob is named by its sha256, and _hub.download checked that
        # name against the content when it fetched the file.
        return name
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(real)
    return _SHA_MEMO[key]


def _verify_weights(path: str, config: Mapping[str, Any], origin: str) -> None:
    """Check the weights against the ``weights_sha256`` that ``convert`` recorded beside them."""
    expected = config.get("weights_sha256")
    named = config.get("weights")
    # "weights" is a path in the folder or Hub repo ("w/vit_t.safetensors"); check only that file.
    if not isinstance(expected, str) or (isinstance(named, str) and os.path.basename(named) != os.path.basename(path)):
        return
    actual = _file_sha256(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"{origin}: {os.path.basename(path)} does not match its config.json (sha256 {actual[:12]}..., "
            f"config.json records {expected[:12]}...); the folder mixes files of two conversions (one was "
            "interrupted) or the weights were changed. Convert the source again (sam-drop-in convert), or pass "
            "the weights file itself to skip this check"
        )


def _torch_reason(exc: BaseException) -> str:
    """torch's own words for a load failure, without its advice to retry with the unsafe unpickler
    (the weights-only unpickler wraps its finding, the exception's context, in that advice)."""
    inner = exc.__context__ if isinstance(exc, pickle.UnpicklingError) and exc.__context__ is not None else exc
    text = str(inner) or type(inner).__name__
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text)
    kept = [s.strip() for s in sentences if s.strip() and "weights_only" not in s and "trusted source" not in s
            and "torch.load" not in s and "file an issue" not in s]
    return (" ".join(kept) or type(inner).__name__)[:300]


# Globals torch's weights-only unpickler accepts by default: torch's own rebuild functions,
# storages, dtypes and sizes, and a few containers. Anything else in a pickle is refused.
_SAFE_GLOBAL_MODULES = ("torch", "torch.")
_SAFE_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                 "builtins.complex", "_codecs.encode", "builtins.slice", "builtins.range"}


def _pickle_streams(path: str) -> list[bytes]:
    """The pickle programs of a torch checkpoint: ``data.pkl`` of a zip file, else the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    with open(path, "rb") as f:
        return [f.read(1 << 26)]  # a pickle that names globals does so near its start


def _refused_globals(path: str) -> list[str]:
    """Globals outside the weights-only set named by the complete pickles in a file (the first
    five: legacy torch files hold several back to back), from the opcodes alone (pickletools).
    A stream that does not parse to its end is corrupt, its "globals" maybe noise: not counted.
    """
    found: list[str] = []
    try:
        streams = _pickle_streams(path)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return found
    for data in streams:
        pos = 0
        for _ in range(5):
            if pos >= len(data):
                break
            names, strings, memo = [], [], {}
            try:
                for op, arg, at in pickletools.genops(data[pos:]):
                    if op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                                     "SHORT_BINSTRING", "BINSTRING", "STRING"):
                        strings.append(str(arg))
                    elif op.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                        memo[arg] = strings[-1]
                    elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                        strings.append(memo[arg])
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    if op.name == "STOP":
                        pos += at + 1
                        break
                else:
                    break  # ran out of bytes without STOP: truncated
            except ValueError:  # an opcode pickle does not have, or an argument cut short
                break
            found += [n for n in names if not n.startswith(_SAFE_GLOBAL_MODULES) and n not in _SAFE_GLOBALS]
    return found


def _unpickling_error(path: str, exc: BaseException) -> CheckpointError:
    """Tell a pickle that names a refused global (unsafe) from a file that is not a checkpoint."""
    reason = _torch_reason(exc)
    named = re.search(r"GLOBAL ([\w.]+)", reason)
    refused = [named.group(1)] if named else _refused_globals(path)
    if refused:
        return UnsafeCheckpointError(
            f"refused to load {path!r}: the pickle asks to create {refused[0]}, which is not a tensor or a plain "
            "container. Nothing from it was executed. Pickles can run arbitrary code, so sam-drop-in only reads "
            "plain state dicts. If you trust the file, load it with the code that wrote it, save the state dict "
            "with safetensors.torch.save_file(), and pass that file."
        )
    return _corrupt(path, reason)


def _corrupt(path: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path!r} is not a valid checkpoint: it cannot be read as a PyTorch (.pt/.pth) or safetensors file "
        f"(maybe truncated or corrupt: {reason}); download or convert it again"
    )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a local checkpoint file into a raw state dict (layout untouched).

    Arguments:
      path (str | os.PathLike): a safetensors file or a pickled torch checkpoint.

    Returns:
      (tuple[dict[str, torch.Tensor], str]): CPU tensors (containers unwrapped, ``module.``
      / ``_orig_mod.`` prefixes stripped) and the format, "safetensors" or "pickle".

    Raises:
      UnsafeCheckpointError: a well-formed pickle that names an object other than tensors and
        containers (the message names it); nothing from it is executed.
      CheckpointError: truncated, corrupt, not a checkpoint at all, or not a state dict.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from exc
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then a JSON object
        from safetensors.torch import load_file

        _refuse_quantized(path)
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
            raise _unpickling_error(path, exc) from None
        except Exception as exc:  # zip/EOF/format errors: the file is cut short or not a checkpoint
            reason = _torch_reason(exc)
            if os.path.getsize(path) == 0:
                reason = "the file is empty"
            elif reason != type(exc).__name__:
                reason = f"{type(exc).__name__}: {reason}"
            raise _corrupt(path, reason) from exc
        fmt = "pickle"
    try:
        sd = _layouts.unwrap_container(obj)
    except ValueError as exc:
        raise CheckpointError(f"{path!r}: {exc}") from None
    return _layouts.strip_prefixes(sd), fmt


def _refuse_quantized(path: str) -> None:
    """A quantised file holds integer codes, not float weights: say what loads it instead."""
    q = describe_quantized(path)
    if q is None:
        return
    mt = q["model_type"] or "vit_t"
    how = (f"sam_model_registry['{mt}'](checkpoint={path!r})" if q["contents"] == "model"
           else f"quantization.load_quantized({path!r}) as a model's image_encoder")
    raise CheckpointError(
        f"{path!r} is a quantised {q['model_type'] or 'SAM'} {q['contents']} ({q['recipe']}, written by "
        "sam_drop_in.quantization): it holds int8 codes and scales, not float weights, so it cannot be loaded into "
        f"a float model or converted. Load it with {how}; for float weights use the checkpoint it was quantised from"
    )


def _convert(sd: dict[str, torch.Tensor], origin: str) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Layout-convert and identify; raises CheckpointError for what cannot be a SAM checkpoint."""
    layout = _layouts.detect_layout(sd)
    bare = _layouts.looks_like_bare_encoder(sd)
    if bare is not None and layout is None:
        raise CheckpointError(
            f"{origin} holds only an image encoder ({'TinyViT' if bare == 'tiny_vit' else 'ViT'}, keys like "
            f"{sorted(sd)[0]!r}), not a full SAM model: the prompt encoder and mask decoder are missing. "
            "Combine it with a full checkpoint's prompt_encoder.* and mask_decoder.* weights, prefixing the "
            "encoder's keys with 'image_encoder.'"
        )
    if layout is None:
        sample = ", ".join(sorted(sd)[:5])
        raise CheckpointError(
            f"{origin} is not a Segment Anything checkpoint in any layout sam-drop-in knows "
            f"(segment_anything/MobileSAM/TinySAM or transformers SamModel); its first keys are: {sample}"
        )
    try:
        out = _layouts.transformers_to_segment_anything(sd) if layout == _layouts.TRANSFORMERS else dict(sd)
    except ValueError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None
    info = _layouts.describe_encoder(out)
    return out, layout, info["model_type"]


def _model_type(model_type: str | None) -> str | None:
    """Resolve the "default" alias; CheckpointError for a name that is no model type."""
    found = normalize_model_type(model_type)
    if found is not None and found not in MODEL_TYPES:
        raise CheckpointError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)} or 'default'")
    return found


def _allow_non_finite(flag: bool | None) -> bool:
    """The caller's flag, else SAM_DROP_IN_ALLOW_NON_FINITE (1/true/yes/on or 0/false/no/off)."""
    if flag is not None:
        return bool(flag)
    raw = os.environ.get(ALLOW_NON_FINITE_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise CheckpointError(f"{ALLOW_NON_FINITE_ENV}={raw!r} is not a yes/no value; use 1 or 0")


def load_state_dict(
    source: Source,
    model_type: str | None = None,
    *,
    allow_non_finite: bool | None = None,
    download_timeout: float | None = None,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint from any supported source and layout, in segment_anything's key layout.

    This is what every builder calls with its ``checkpoint=`` argument.

    Arguments:
      source (str | os.PathLike): local path, ``hf://OWNER/REPO[@REV]/PATH`` or ``hf://OWNER/REPO[@REV]``.
      model_type (str | None): "vit_h", "vit_l", "vit_b" or "vit_t" ("default" = vit_h); when
        given, the file must hold that model type.
      allow_non_finite (bool | None): accept NaN/inf weights (for research on broken runs);
        None: the ``SAM_DROP_IN_ALLOW_NON_FINITE`` environment variable, else refuse them.
      download_timeout (float | None): seconds allowed for a Hub fetch; None: the
        ``SAM_DROP_IN_DOWNLOAD_TIMEOUT`` environment variable, else 1800.

    Returns:
      (dict[str, torch.Tensor]): CPU tensors keyed as segment_anything's ``Sam`` (for vit_t,
      MobileSAM's keys: 439 entries with TinyViT keys under ``image_encoder.``), dtypes as stored.

    Raises:
      CheckpointNotFoundError: the file, Hub repo, revision or Hub file does not exist.
      UnsafeCheckpointError: a pickle that would run code; nothing was executed.
      CheckpointError: unreadable, corrupt, unknown layout, or a different model type
        ("this is a vit_b checkpoint; use sam_model_registry['vit_b']"); a weight that is not a
        float tensor, or (unless allowed) holds NaN/inf, named by its key.
    """
    model_type = _model_type(model_type)
    allow = _allow_non_finite(allow_non_finite)
    path, _config = resolve(source, download_timeout=download_timeout)
    sd, _fmt = read_state_dict(path)
    return _checked(sd, f"checkpoint {os.fspath(source)!r}", model_type, allow)


def _checked(sd: dict[str, torch.Tensor], origin: str, model_type: str | None,
             allow_non_finite: bool) -> dict[str, torch.Tensor]:
    """Convert to segment_anything keys and check model type and values; CheckpointError otherwise."""
    out, layout, found = _convert(sd, origin)
    if found is None:
        info = _layouts.describe_encoder(out)
        holds = {"vit": f"a ViT image encoder of width {info['width']} and depth {info['depth']} ({layout} layout)",
                 "tiny_vit": f"a TinyViT image encoder with {info['depth']} stages ending at width {info['width']}"}
        raise CheckpointError(
            f"{origin} holds {holds.get(info['kind'], 'no recognisable image encoder')}, which is not one of the "
            "standard SAM models (vit_b 768x12, vit_l 1024x24, vit_h 1280x32, vit_t TinyViT); "
            "sam_model_registry cannot build it"
        )
    if model_type is not None and found != model_type:
        raise CheckpointError(
            f"{origin}: this is a {found} checkpoint, but a {model_type} model was requested; "
            f"use sam_model_registry['{found}'](checkpoint=...)"
        )
    missing = [p for p in ("image_encoder.", "prompt_encoder.", "mask_decoder.") if not any(k.startswith(p) for k in out)]
    if missing:
        raise CheckpointError(
            f"{origin} is a {found} checkpoint without any {', '.join(m + '*' for m in missing)} weights; "
            "a full SAM checkpoint is needed"
        )
    _check_values(out, origin, allow_non_finite)
    return out


def _check_values(sd: Mapping[str, torch.Tensor], origin: str, allow_non_finite: bool) -> None:
    """Refuse weights that a float model would take in silently but wrongly.

    ``load_state_dict`` casts integer, bool and complex tensors into float parameters without a
    word (complex loses its imaginary part), and NaN/inf weights make every output NaN. BatchNorm's
    ``num_batches_tracked`` counters (TinyViT) are the one integer entry of a SAM state dict.
    """
    wrong = [k for k, v in sd.items()
             if not (v.is_floating_point() or (k.endswith("num_batches_tracked") and not v.is_complex()
                                              and v.dtype != torch.bool))]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{origin}: {len(wrong)} weight tensor(s) are not floating point, e.g. {k} is {sd[k].dtype}; "
            "SAM's weights are float32 (or float16/bfloat16). The file was not saved from a SAM model, or was "
            "quantized/altered; use the original float checkpoint"
        )
    if allow_non_finite:
        return
    bad = [k for k, v in sd.items() if v.is_floating_point() and not _all_finite(v)]
    if bad:
        k = bad[0]
        count = int((~torch.isfinite(sd[k])).sum())
        raise CheckpointError(
            f"{origin}: {len(bad)} weight tensor(s) hold NaN or infinite values, e.g. {k} ({count} of "
            f"{sd[k].numel()} values); such a model outputs NaN. Use a checkpoint from before training diverged, "
            f"or pass allow_non_finite=True (or set {ALLOW_NON_FINITE_ENV}=1) to load it anyway"
        )


def _all_finite(v: torch.Tensor) -> bool:
    """True when no value of a float tensor is NaN or infinite. A finite sum proves it, ten times
    faster than an element-wise isfinite (vit_h has 636M values); only a sum that is not finite (a
    bad value, or an overflow) needs the exact check."""
    try:
        total = v.sum(dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)
        if bool(torch.isfinite(total)):
            return True
    except RuntimeError:  # a dtype without a sum kernel (float8): the exact check alone
        pass
    return bool(torch.isfinite(v).all())


def load_into(
    model: torch.nn.Module,
    source: Source | Mapping[str, torch.Tensor],
    model_type: str | None = None,
    *,
    allow_non_finite: bool | None = None,
    download_timeout: float | None = None,
) -> None:
    """Load a checkpoint into a SAM model strictly, with an error that names the keys.

    Arguments:
      model (torch.nn.Module): a segment_anything-layout ``Sam`` (ours, segment_anything's or mobile_sam's).
      source (str | os.PathLike | Mapping[str, Tensor]): anything :func:`load_state_dict` takes,
        or a state dict already in segment_anything's layout.
      model_type (str | None): checked against the file when given.
      allow_non_finite (bool | None): as :func:`load_state_dict`.
      download_timeout (float | None): as :func:`load_state_dict`.

    Raises:
      CheckpointError: as :func:`load_state_dict`, or the keys or shapes do not match the model
        (the message lists a few missing and unexpected keys).
    """
    if isinstance(source, Mapping):
        sd = dict(source)
        _check_values(sd, "state dict", _allow_non_finite(allow_non_finite))
    else:
        sd = load_state_dict(source, model_type=model_type, allow_non_finite=allow_non_finite,
                             download_timeout=download_timeout)
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


def _num_params(sd: Mapping[str, torch.Tensor]) -> int:
    # BatchNorm statistics and the prompt encoder's random Fourier matrix are buffers, not
    # parameters; leave them out so the count matches sum(p.numel() for p in model.parameters()).
    skip = ("running_mean", "running_var", "num_batches_tracked", "positional_encoding_gaussian_matrix")
    return int(sum(v.numel() for k, v in sd.items() if not k.endswith(skip)))


def inspect_checkpoint(source: Source, *, download_timeout: float | None = None) -> dict[str, Any]:
    """Describe a checkpoint without building a model (for ``sam-drop-in info``).

    Arguments:
      source (str | os.PathLike): local path or ``hf://`` address.
      download_timeout (float | None): as :func:`load_state_dict`.

    Returns:
      (dict): ``model_type`` (str | None), ``layout`` ("segment_anything" | "transformers"),
      ``format`` ("safetensors" | "pickle"), ``num_params`` (int), ``num_tensors`` (int,
      after conversion to segment_anything keys), ``dtype`` (str, e.g. "torch.float32"),
      ``sha256`` (str, of the file), ``path`` (str, local file), ``size_bytes`` (int). A
      quantised file (``quantization.save_quantized``) adds ``quantized`` (str, the recipe);
      its ``layout`` is "sam_drop_in quantized model" (or "... image encoder") and
      ``num_params`` counts integer codes and float weights, not scales and zero points.

    Raises:
      CheckpointError: as :func:`load_state_dict` (the weights' values are not checked).
    """
    path, _ = resolve(source, download_timeout=download_timeout)
    file = {"sha256": _file_sha256(path), "path": path, "size_bytes": os.path.getsize(path)}
    quantized = describe_quantized(path)
    if quantized is not None:
        return {**_inspect_quantized(path, quantized), **file}
    sd, fmt = read_state_dict(path)
    out, layout, found = _convert(sd, f"checkpoint {os.fspath(source)!r}")
    dtypes = sorted({str(v.dtype) for v in out.values() if v.is_floating_point()})
    return {"model_type": found, "layout": layout, "format": fmt, "num_params": _num_params(out),
            "num_tensors": len(out), "dtype": ",".join(dtypes), **file}


_ST_DTYPES = {"F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16", "I32": "torch.int32",
              "I8": "torch.int8", "U8": "torch.uint8", "I64": "torch.int64"}


def _inspect_quantized(path: str, q: dict) -> dict[str, Any]:
    """inspect_checkpoint's description of a quantised file, less the file's own facts."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = sorted({_ST_DTYPES.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype()) for k in f.keys()})
    # Weights: integer codes and float tensors, not the quantisers' scales and zero points.
    quant = (".weight_scale", ".scale", ".fine_scale", ".zero_point")
    count = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if not k.endswith(quant))
    return {
        "model_type": q["model_type"],
        "layout": "sam_drop_in quantized " + q["contents"],
        "format": "safetensors",
        "quantized": f"{q['recipe']} (weights {q['weight_bits']} bits, activations {q['act_bits']} bits)",
        "num_params": count,
        "num_tensors": len(shapes),
        "dtype": ",".join(dtypes),
    }


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


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> None:
    """safetensors.torch.save_file, then the header's ``__metadata__`` sorted in place (the writer
    emits it in hash-map order, so two conversions of one file would differ in sha256)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), path, metadata=dict(metadata))
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":")).encode()
        if len(text) > size:  # cannot happen for a re-ordering; never write past the header
            raise RuntimeError(f"re-serialised safetensors header is longer ({len(text)} > {size} bytes)")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def convert(
    src: Source,
    dst: str | os.PathLike,
    model_type: str | None = None,
    *,
    push_to_hub: str | None = None,
    private: bool | None = None,
    allow_non_finite: bool | None = None,
    download_timeout: float | None = None,
) -> Path:
    """Convert any supported checkpoint to a segment_anything-layout safetensors folder.

    Writes ``dst/model.safetensors`` (segment_anything keys), ``dst/README.md`` (a model card)
    and ``dst/config.json`` (``weights_sha256``, ``source``, ...), each atomically and
    byte-identical for the same input. ``config.json`` is the commit marker: an interrupted run
    never leaves new weights beside an old config (loading checks ``weights_sha256``). Do not run
    two conversions into one folder at the same time.

    Arguments:
      src (str | os.PathLike): local path or ``hf://`` address of the source checkpoint.
      dst (str | os.PathLike): output folder (created if missing).
      model_type (str | None): when given, the source must hold this model type.
      push_to_hub (str | None): a Hub repo id ("OWNER/REPO") to upload the folder to.
      private (bool | None): visibility of a repo created by ``push_to_hub``.
      allow_non_finite (bool | None): as :func:`load_state_dict`.
      download_timeout (float | None): as :func:`load_state_dict`.

    Returns:
      (pathlib.Path): path of the written ``model.safetensors``.

    Raises:
      CheckpointError: as :func:`load_state_dict`; also when ``dst`` is an existing file.
    """
    dst = Path(os.fspath(dst))
    if dst.suffix == ".safetensors" or (dst.exists() and not dst.is_dir()):
        raise CheckpointError(
            f"convert writes a folder (model.safetensors, config.json, README.md); {str(dst)!r} is a file name. "
            "Pass a folder path"
        )
    model_type = _model_type(model_type)
    allow = _allow_non_finite(allow_non_finite)
    path, _ = resolve(src, download_timeout=download_timeout)
    source_sha = _file_sha256(path)
    raw, _fmt = read_state_dict(path)
    raw_layout = _layouts.detect_layout(raw)
    sd = _checked(raw, f"checkpoint {os.fspath(src)!r}", model_type, allow)
    del raw
    found = _layouts.detect_model_type(sd)
    tensors = _unshare(sd)
    num_params = _num_params(tensors)
    converter = f"sam-drop-in {__version__}"

    entry = None
    if _hub.is_hf_uri(src):
        loc = _hub.parse_hf_uri(str(src))
        entry = find(loc.repo_id, loc.path)
    known = entry or next((e for e in MANIFEST if e["model_type"] == found), {})
    card = MODEL_CARD_TEMPLATE.format(
        license=(known.get("license") or "other").lower(),
        model_type=found,
        title=f"Segment Anything {found} (segment_anything layout, safetensors)",
        source=os.fspath(src),
        source_sha256=source_sha,
        source_layout=raw_layout,
        num_params=num_params,
        paper=known.get("paper") or "-",
        repo_id=push_to_hub or "OWNER/REPO",
        version=converter,
    )

    dst.mkdir(parents=True, exist_ok=True)
    for name in _CONVERTED_FILES:  # a killed conversion's temporary files (atomic_write's names)
        for stale in dst.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
    for name in ("config.json", "README.md"):  # see the docstring: config.json is the commit marker
        (dst / name).unlink(missing_ok=True)
    weights = dst / "model.safetensors"
    meta = {"format": "pt", "model_type": str(found), "layout": SEGMENT_ANYTHING, "converter": converter}
    atomic_write(weights, lambda tmp: _save_safetensors(tensors, tmp, meta))
    weights_sha = sha256_file(weights)
    atomic_write(dst / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    config = {
        "model_type": found,
        "layout": SEGMENT_ANYTHING,
        "format": "safetensors",
        "weights": weights.name,
        "weights_sha256": weights_sha,
        "num_params": num_params,
        "source": os.fspath(src),
        "source_sha256": source_sha,
        "source_layout": raw_layout,
        "converter": converter,
    }
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(dst / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if push_to_hub:
        try:
            _hub.push_folder(dst, push_to_hub, private=private)
        except Exception as exc:
            raise CheckpointError(_hub.push_error_message(exc, dst, push_to_hub)) from exc
    return weights

