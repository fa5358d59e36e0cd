"""Saving and loading quantised models as safetensors (integer codes, scales, recipe).

Two kinds of file, told apart by the ``format`` entry of the safetensors metadata:

- ``sam_drop_in.quantized`` (a whole model, written by ``save_quantized(sam, path)``): the
  quantised image encoder under ``image_encoder.*`` (int8 weight codes, float32 per-channel
  scales, activation scales and int32 zero points, float32 biases and norms) and the float
  prompt encoder and mask decoder under ``prompt_encoder.*`` / ``mask_decoder.*``.
  ``sam_model_registry[model_type](checkpoint=path)`` and ``load_quantized_sam`` build the
  ``Sam`` back.
- ``sam_drop_in.quantized_encoder`` (the encoder alone, ``save_quantized(encoder, path)``; the
  only kind the first version wrote): read by ``load_quantized``.

Metadata of both: ``format_version`` ("1"), ``recipe`` (JSON of the QuantRecipe),
``architecture`` (JSON; ``"kind"`` is "tiny_vit" or "vit", missing means "tiny_vit");
whole-model files add ``model_type`` and ``image_size``.
"""

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .._errors import CheckpointError
from .._fileio import atomic_write
from .fake_quant import ActQuant
from .recipe import QuantRecipe

# The header-only readers live in a leaf module so that the loaders (checkpoint, build_sam, the
# CLI) can recognise a quantised file without importing this package; re-exported here.
from .._quantized_header import (  # noqa: F401
    ENCODER_FORMAT,
    FORMAT,
    FORMAT_VERSION,
    FORMATS,
    describe_quantized,
    encoder_kind as _kind,
    model_type_of as _model_type,
    quantized_format,
    read_metadata,
)

# SAM's prompt encoder and mask decoder are the same for every model type (see build_sam).
_PROMPT_EMBED_DIM = 256
_PATCH = 16

def _encoder_module(kind: str):
    """The module that builds quantised encoders of an architecture kind."""
    if kind == "tiny_vit":
        from . import tinyvit

        return tinyvit
    if kind == "vit":
        # Imported here so that this file works with or without ViT support installed.
        try:
            from . import vit
        except ImportError as exc:
            raise CheckpointError(
                "this file holds a quantised ViT (vit_b/vit_l/vit_h) encoder, which this version of sam_drop_in "
                f"cannot build ({exc}); quantise a vit_t model, or upgrade sam_drop_in"
            ) from None
        return vit
    raise CheckpointError(f"unknown quantised encoder kind {kind!r} in the file's architecture; "
                          "this file was written by a newer sam_drop_in: upgrade it")


def _architecture(qenc: nn.Module) -> Dict:
    """The encoder's architecture with its ``kind`` (QuantizedTinyViT's arch predates the key)."""
    arch = dict(getattr(qenc, "arch", None) or {})
    if not arch:
        raise TypeError(f"{type(qenc).__name__} is not a quantised encoder (no .arch); "
                        "use quantization.calibrate to make one")
    from .tinyvit import QuantizedTinyViT

    if isinstance(qenc, QuantizedTinyViT):
        arch.setdefault("kind", "tiny_vit")
    return arch


def _is_quantized_encoder(module: nn.Module) -> bool:
    return hasattr(module, "recipe") and hasattr(module, "arch") and hasattr(module, "quant_modules")


def _check_calibrated(qenc: nn.Module) -> None:
    if any(getattr(m, "float_weight", None) is not None for m in qenc.quant_modules()):
        raise ValueError("the encoder is not calibrated; run quantization.calibrate first")


def _tensors(module: nn.Module, prefix: str = "") -> Dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_quantized(model: nn.Module, path, extra_metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a quantised model or encoder to ``path`` (safetensors), atomically: the file is
    the old one or the whole new one, never partial.

    Arguments:
      model (Sam or quantised encoder): a ``Sam`` whose ``image_encoder`` is a calibrated
        quantised encoder (from ``calibrate``) -> a whole-model file (``FORMAT``: the encoder's
        int8 codes, scales and zero points plus the float prompt encoder and mask decoder), which
        ``sam_model_registry[...](checkpoint=path)`` loads; or the quantised encoder itself -> an
        encoder-only file (``ENCODER_FORMAT``), which ``load_quantized`` reads.
      path (str or Path): destination file.
      extra_metadata (dict(str, str) or None): more metadata entries (provenance, say); they may
        not replace the ones this function writes.
    """
    from safetensors.torch import save_file

    encoder = getattr(model, "image_encoder", None)
    if _is_quantized_encoder(model):
        qenc, sam = model, None
    elif encoder is not None and _is_quantized_encoder(encoder):
        qenc, sam = encoder, model
    else:
        raise TypeError(f"save_quantized takes a Sam with a quantised image_encoder, or a quantised encoder "
                        f"(from quantization.calibrate); got {type(model).__name__}")
    _check_calibrated(qenc)
    arch = _architecture(qenc)
    metadata = {"format_version": FORMAT_VERSION, "recipe": qenc.recipe.to_json(),
                "architecture": json.dumps(arch, sort_keys=True)}
    if sam is None:
        metadata["format"] = ENCODER_FORMAT
        tensors = _tensors(qenc)
    else:
        model_type = _model_type(arch)
        if model_type is None:
            raise ValueError(f"cannot tell the model type of this {_kind(arch)} encoder (architecture {arch})")
        metadata.update(format=FORMAT, model_type=model_type, image_size=str(int(qenc.img_size)))
        tensors = _tensors(qenc, "image_encoder.")
        tensors.update(_tensors(sam.prompt_encoder, "prompt_encoder."))
        tensors.update(_tensors(sam.mask_decoder, "mask_decoder."))
    for key, value in (extra_metadata or {}).items():
        if key in metadata or key in ("format", "model_type", "image_size"):
            raise ValueError(f"extra_metadata may not set {key!r}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("extra_metadata must map str to str")
        metadata[key] = value
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _open(path, expected=FORMATS):
    """(metadata, recipe, architecture) of a quantised file; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"quantised model file {str(path)!r} does not exist")
    meta = read_metadata(path)
    if meta is None:
        raise CheckpointError(f"{str(path)!r} is not a safetensors file (truncated or corrupt?); "
                              "quantise the model again (sam-drop-in quantize)")
    fmt = meta.get("format")
    if fmt not in expected:
        raise CheckpointError(f"{str(path)!r} is not a quantised encoder or model written by sam_drop_in.quantization "
                              f"(metadata format {fmt!r}, expected one of {list(expected)})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has quantised format version {meta.get('format_version')!r}; "
                              f"this sam_drop_in reads version {FORMAT_VERSION}: upgrade sam_drop_in")
    try:
        recipe = QuantRecipe.from_json(meta["recipe"])
        arch = json.loads(meta["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: its recipe or architecture metadata is unreadable ({exc}); "
                              "quantise the model again") from None
    return meta, recipe, arch


def _load_tensors(path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError: bad offsets, cut short
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file (truncated or corrupt: {exc}); "
                              "quantise the model again") from None


def _load_strict(module: nn.Module, state: Dict[str, torch.Tensor], path, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: the {what} does not match the architecture recorded in the file: "
                              f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}; the file is "
                              "damaged or was edited; quantise the model again")


def _build_encoder(arch: Dict, recipe: QuantRecipe, state: Dict[str, torch.Tensor], path) -> nn.Module:
    module = _encoder_module(_kind(arch))
    body_arch = {k: v for k, v in arch.items() if k != "kind"} if _kind(arch) == "tiny_vit" else arch
    try:
        qenc = module.build_from_arch(body_arch, recipe)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{str(path)!r}: cannot build the recorded architecture {arch} ({exc!r}); the file "
                              "is damaged or was written by another version of sam_drop_in") from None
    _load_strict(qenc, state, path, "quantised image encoder")
    # The codes and scales are loaded: no float weight, every quantiser calibrated.
    for m in qenc.quant_modules():
        m.finalize()
    for m in qenc.modules():
        if isinstance(m, ActQuant):
            m.calibrated = True
    return qenc


def load_quantized(path, device="cpu") -> nn.Module:
    """The quantised image encoder of a file written by ``save_quantized`` (a whole-model or an
    encoder-only file); outputs are bit-identical to the encoder saved (same codes and scales,
    same arithmetic).

    Arguments:
      path (str or Path): the safetensors file.
      device (str or torch.device): where to put the encoder.

    Returns:
      (nn.Module): a ``QuantizedTinyViT`` (or ``QuantizedViT``), eval mode.
    """
    meta, recipe, arch = _open(path)
    state = _load_tensors(path)
    if meta["format"] == FORMAT:
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    return _build_encoder(arch, recipe, state, path).eval().to(device)


def load_quantized_sam(path, model_type: Optional[str] = None, device="cpu") -> nn.Module:
    """A ``Sam`` from a whole-model quantised file: the quantised image encoder, and the float
    prompt encoder and mask decoder stored beside it. What ``sam_model_registry[model_type]
    (checkpoint=path)`` returns for such a file.

    Arguments:
      path (str or Path): a file written by ``save_quantized(sam, path)``.
      model_type (str or None): when given ("vit_t", "vit_b", ...), the file must hold this type.
      device (str or torch.device): where to put the model.

    Returns:
      (Sam): eval mode; ``image_encoder`` is the quantised encoder (float32 in and out).

    Raises:
      CheckpointError: not such a file, an encoder-only file, another model type, or a damaged file.
    """
    from .._constants import normalize_model_type
    from ..modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    meta, recipe, arch = _open(path)
    found = meta.get("model_type")
    if meta["format"] == ENCODER_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} holds a quantised image encoder only (no prompt encoder or mask decoder). Load it with "
            "sam = sam_model_registry[...](checkpoint=FLOAT_CHECKPOINT); sam.image_encoder = "
            "quantization.load_quantized(path), or save the whole model with quantization.save_quantized(sam, path)"
        )
    wanted = normalize_model_type(model_type)
    if wanted is not None and found != wanted:
        raise CheckpointError(f"{str(path)!r} is a quantised {found} model, but a {wanted} model was requested; "
                              f"use sam_model_registry['{found}'](checkpoint=...)")
    try:
        size = int(meta["image_size"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{str(path)!r}: its image_size metadata is missing or unreadable; "
                              "quantise the model again") from None
    state = _load_tensors(path)
    parts = {p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
             for p in ("image_encoder", "prompt_encoder", "mask_decoder")}
    qenc = _build_encoder(arch, recipe, parts["image_encoder"], path)
    side = size // _PATCH
    prompt_encoder = PromptEncoder(embed_dim=_PROMPT_EMBED_DIM, image_embedding_size=(side, side),
                                   input_image_size=(size, size), mask_in_chans=16)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=_PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=_PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    _load_strict(prompt_encoder, parts["prompt_encoder"], path, "prompt encoder")
    _load_strict(mask_decoder, parts["mask_decoder"], path, "mask decoder")
    return Sam(image_encoder=qenc, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder).eval().to(device)
