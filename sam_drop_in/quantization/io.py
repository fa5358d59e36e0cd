"""Saving and loading a quantised encoder as safetensors (integer codes, scales, recipe)."""

import json
from pathlib import Path


from .._errors import CheckpointError
from .._fileio import atomic_write
from .fake_quant import ActQuant
from .recipe import QuantRecipe
from .tinyvit import QuantizedTinyViT, arch_json, build_from_arch

FORMAT = "sam_drop_in.quantized_encoder"
FORMAT_VERSION = "1"


def save_quantized(qenc: QuantizedTinyViT, path) -> None:
    """Write ``qenc`` to ``path`` (safetensors): int8 weight codes, float32 per-channel weight
    scales, activation scales and int32 zero points, float32 biases and norms; metadata holds
    the recipe and the encoder architecture as JSON. Written atomically.

    Arguments:
      qenc (QuantizedTinyViT): a calibrated encoder (from ``calibrate`` or ``load_quantized``).
      path (str or Path): destination file.
    """
    from safetensors.torch import save_file

    if not isinstance(qenc, QuantizedTinyViT):
        raise TypeError(f"save_quantized takes a QuantizedTinyViT, got {type(qenc).__name__}")
    if any(m.float_weight is not None for m in qenc.quant_modules() if hasattr(m, "float_weight")):
        raise ValueError("the encoder is not calibrated; run quantization.calibrate first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in qenc.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": qenc.recipe.to_json(),
                "architecture": arch_json(qenc.arch)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_quantized(path, device="cpu") -> QuantizedTinyViT:
    """Read a file written by ``save_quantized``; returns the calibrated QuantizedTinyViT, whose
    outputs are bit-identical to the one saved (same codes and scales, same arithmetic).

    Arguments:
      path (str or Path): the safetensors file.
      device (str or torch.device): where to put the encoder.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"quantised encoder file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a quantised encoder written by sam_drop_in.quantization.save_quantized "
                              f"(metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has quantised format version {meta.get('format_version')!r}; "
                              f"this sam_drop_in reads version {FORMAT_VERSION}")
    recipe = QuantRecipe.from_json(meta["recipe"])
    qenc = build_from_arch(json.loads(meta["architecture"]), recipe)
    state = load_file(str(path))
    missing, unexpected = qenc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not match its recorded architecture: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for m in qenc.quant_modules():
        m.finalize()
    for m in qenc.modules():
        if isinstance(m, ActQuant):
            m.calibrated = True
    return qenc.to(device)
