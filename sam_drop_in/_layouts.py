"""Pure functions (state dict in, state dict or description out; no file, no network) that
recognise and convert checkpoint layouts: ``"segment_anything"`` (Meta's key names, which
MobileSAM's and TinySAM's ``vit_t`` files share, TinyViT keys under ``image_encoder.``) and
``"transformers"`` (Hugging Face ``SamModel``: ``vision_encoder.*``, ...).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

SEGMENT_ANYTHING = "segment_anything"
TRANSFORMERS = "transformers"

# ViT variants of the image encoder: embed dim -> (model type, number of blocks).
_VIT_BY_WIDTH = {768: ("vit_b", 12), 1024: ("vit_l", 24), 1280: ("vit_h", 32)}

# Wrappers that training code puts around a state dict: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts nest the state dict itself.
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module")

_TOP_LEVEL = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_container(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state dict inside what ``torch.load`` returned.

    Training scripts save ``{"model": sd, "optimizer": ..., "epoch": ...}`` or
    ``{"state_dict": sd}``; plain files are the state dict itself. Non-tensor entries
    at the top level (an epoch counter, say) are dropped only when a nested
    container holds the tensors.

    Arguments:
      obj (Any): the object read from a checkpoint file.

    Returns:
      (dict[str, torch.Tensor]): the state dict.

    Raises:
      ValueError: no mapping of names to tensors was found.
    """
    seen = 0
    while isinstance(obj, Mapping) and not _is_state_dict(obj) and seen < 4:
        seen += 1
        for key in _CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            # A mostly-tensor dict with a few scalars mixed in (some exporters add
            # "epoch" next to the weights): keep only the tensors.
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors and len(tensors) >= 0.9 * len(obj):
                return tensors
            break
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else []
        raise ValueError(
            f"the file holds a {kind}" + (f" with keys {keys}" if keys else "")
            + ", not a state dict (a mapping of parameter names to tensors)"
        )
    return dict(obj)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes.

    A prefix is removed only when every key carries it, so a model that really has a
    submodule called ``module`` is left alone.

    Arguments:
      state_dict (Mapping[str, torch.Tensor]): parameter name -> tensor.

    Returns:
      (dict[str, torch.Tensor]): the same tensors (not copied) under the stripped names.
    """
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Tell which key layout a state dict uses.

    Arguments:
      state_dict (Mapping[str, torch.Tensor]): parameter name -> tensor, prefixes stripped.

    Returns:
      (str | None): ``"segment_anything"``, ``"transformers"``, or None when neither fits.
    """
    keys = list(state_dict)
    if any(k.startswith("vision_encoder.") or k.startswith("shared_image_embedding.") for k in keys):
        return TRANSFORMERS
    if any(k.startswith(_TOP_LEVEL) for k in keys):
        return SEGMENT_ANYTHING
    return None


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Tell which model type a state dict's image encoder is (see :func:`describe_encoder`).

    Arguments:
      state_dict (Mapping[str, torch.Tensor]): parameter name -> tensor, prefixes stripped.

    Returns:
      (str | None): one of ``"vit_h"``, ``"vit_l"``, ``"vit_b"``, ``"vit_t"``, or None when
      the encoder is missing or not a standard variant (SlimSAM's pruned widths, say).
    """
    return describe_encoder(state_dict)["model_type"]


def describe_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Describe the image encoder found in a state dict (either layout), by its key names
    (TinyViT or ViT) and its width and depth.

    Arguments:
      state_dict (Mapping[str, torch.Tensor]): parameter name -> tensor, prefixes stripped.

    Returns:
      (dict): ``model_type`` (str | None), ``kind`` ("vit", "tiny_vit" or None),
      ``width`` (int | None), ``depth`` (int | None).
    """
    layout = detect_layout(state_dict)
    enc = "vision_encoder." if layout == TRANSFORMERS else "image_encoder."
    blocks = "layers." if layout == TRANSFORMERS else "blocks."
    proj = "patch_embed.projection.weight" if layout == TRANSFORMERS else "patch_embed.proj.weight"
    out: dict[str, Any] = {"model_type": None, "kind": None, "width": None, "depth": None}
    if f"{enc}patch_embed.seq.0.c.weight" in state_dict:
        out["kind"] = "tiny_vit"
        last = [k for k in state_dict if k.startswith(f"{enc}layers.")]
        depth = 1 + max((int(k.split(".")[2]) for k in last), default=-1)
        neck = state_dict.get(f"{enc}neck.0.weight")
        out["width"] = int(neck.shape[1]) if neck is not None and neck.dim() == 4 else None
        out["depth"] = depth
        # MobileSAM/TinySAM: 4 stages ending at width 320. Other TinyViT sizes are not vit_t.
        if depth == 4 and out["width"] == 320:
            out["model_type"] = "vit_t"
        return out
    w = state_dict.get(f"{enc}{proj}")
    if w is None or w.dim() != 4:
        return out
    out["kind"] = "vit"
    width = int(w.shape[0])
    pattern = re.compile(re.escape(f"{enc}{blocks}") + r"(\d+)\.")
    idx = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    depth = 1 + max(idx, default=-1)
    out["width"], out["depth"] = width, depth
    known = _VIT_BY_WIDTH.get(width)
    if known is not None and known[1] == depth:
        out["model_type"] = known[0]
    return out


# transformers SamModel -> segment_anything. Applied to the key with the layout's
# prefix already swapped; each rule is (compiled pattern, replacement).
_HF_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^vision_encoder\."), "image_encoder."),
    (re.compile(r"^image_encoder\.patch_embed\.projection\."), "image_encoder.patch_embed.proj."),
    (re.compile(r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\."), r"image_encoder.blocks.\1.norm\2."),
    (re.compile(r"^image_encoder\.layers\."), "image_encoder.blocks."),
    (re.compile(r"^image_encoder\.neck\.conv1\."), "image_encoder.neck.0."),
    (re.compile(r"^image_encoder\.neck\.layer_norm1\."), "image_encoder.neck.1."),
    (re.compile(r"^image_encoder\.neck\.conv2\."), "image_encoder.neck.2."),
    (re.compile(r"^image_encoder\.neck\.layer_norm2\."), "image_encoder.neck.3."),
    (re.compile(r"^prompt_encoder\.point_embed\."), "prompt_encoder.point_embeddings."),
    (re.compile(r"^prompt_encoder\.mask_embed\.conv1\."), "prompt_encoder.mask_downscaling.0."),
    (re.compile(r"^prompt_encoder\.mask_embed\.layer_norm1\."), "prompt_encoder.mask_downscaling.1."),
    (re.compile(r"^prompt_encoder\.mask_embed\.conv2\."), "prompt_encoder.mask_downscaling.3."),
    (re.compile(r"^prompt_encoder\.mask_embed\.layer_norm2\."), "prompt_encoder.mask_downscaling.4."),
    (re.compile(r"^prompt_encoder\.mask_embed\.conv3\."), "prompt_encoder.mask_downscaling.6."),
    (re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\."), r"mask_decoder.transformer.layers.\1.norm\2."),
    (re.compile(r"^mask_decoder\.transformer\.layer_norm_final_attn\."), "mask_decoder.transformer.norm_final_attn."),
    (re.compile(r"^mask_decoder\.upscale_conv1\."), "mask_decoder.output_upscaling.0."),
    (re.compile(r"^mask_decoder\.upscale_layer_norm\."), "mask_decoder.output_upscaling.1."),
    (re.compile(r"^mask_decoder\.upscale_conv2\."), "mask_decoder.output_upscaling.3."),
]
_PE_SA = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_PE_HF = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
# transformers' SamFeedForward splits segment_anything's MLP.layers list into
# proj_in, layers.*, proj_out; these prefixes hold such MLPs.
_HF_MLP = re.compile(
    r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.(proj_in|proj_out|layers\.(\d+))\.(.*)$"
)


def transformers_to_segment_anything(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``SamModel`` state dict to segment_anything's names.

    No tensor is reshaped or copied: the two layouts differ only in names. The
    positional-embedding matrix that transformers stores twice (tied) may appear
    under either name or both; both copies must then be equal.

    Arguments:
      state_dict (Mapping[str, torch.Tensor]): transformers ``SamModel`` keys.

    Returns:
      (dict[str, torch.Tensor]): segment_anything keys, the same tensor objects.

    Raises:
      ValueError: the two tied copies of the positional embedding differ.
    """
    # Hidden-layer count of each MLP, to know which index proj_out becomes.
    n_hidden: dict[str, int] = {}
    for k in state_dict:
        m = _HF_MLP.match(k)
        if m and m.group(3) is not None:
            n_hidden[m.group(1)] = max(n_hidden.get(m.group(1), 0), int(m.group(3)) + 1)

    out: dict[str, torch.Tensor] = {}
    pe = [state_dict[k] for k in _PE_HF if k in state_dict]
    if len(pe) == 2 and not torch.equal(pe[0], pe[1]):
        raise ValueError(
            f"the file's two copies of the positional embedding ({_PE_HF[0]} and {_PE_HF[1]}) differ; "
            "transformers ties them, so the file is inconsistent"
        )
    if pe:
        out[_PE_SA] = pe[0]
    for key, value in state_dict.items():
        if key in _PE_HF:
            continue
        m = _HF_MLP.match(key)
        if m:
            base, part, idx, rest = m.groups()
            i = 0 if part == "proj_in" else n_hidden.get(base, 0) + 1 if part == "proj_out" else int(idx) + 1
            out[f"{base}.layers.{i}.{rest}"] = value
            continue
        new = key
        for pattern, repl in _HF_RULES:
            new = pattern.sub(repl, new)
        out[new] = value
    return out


def looks_like_bare_encoder(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Recognise an image encoder saved on its own (no prompt encoder or mask decoder).

    Distillation scripts often save only the student encoder; telling the user so
    beats a list of 137 missing keys.

    Arguments:
      state_dict (Mapping[str, torch.Tensor]): prefixes stripped.

    Returns:
      (str | None): "tiny_vit" or "vit" when the keys are a bare encoder, else None.
    """
    if "patch_embed.seq.0.c.weight" in state_dict and any(k.startswith("layers.") for k in state_dict):
        return "tiny_vit"
    if "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict):
        return "vit"
    return None


def key_diff(
    state_dict: Mapping[str, Any], expected: Mapping[str, Any] | set[str], limit: int = 5
) -> tuple[list[str], list[str], str]:
    """Compare key sets and render a short description of the difference.

    Arguments:
      state_dict (Mapping[str, Any]): the keys found.
      expected (Mapping[str, Any] | set[str]): the keys the model has.
      limit (int): how many names of each kind to show.

    Returns:
      (tuple[list[str], list[str], str]): sorted missing keys, sorted unexpected keys,
      and a one-paragraph summary naming at most ``limit`` of each.
    """
    have, want = set(state_dict), set(expected)
    missing, unexpected = sorted(want - have), sorted(have - want)
    parts = [f"{len(keys)} {kind} keys ({', '.join(keys[:limit])}"
             + (f" and {len(keys) - limit} more)" if len(keys) > limit else ")")
             for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return missing, unexpected, "; ".join(parts)
