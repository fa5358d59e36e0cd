"""The manifest of known checkpoints: one literal table, the single source of truth.

It lives inside the package (not in ``weights/``) so that an installed, non-editable
sam-drop-in can read it without packaging data files; ``weights/README.md`` is rendered
from it by ``render_markdown()`` and a test checks the two agree.

Fields of each entry:
  name         short identifier used in docs and by ``default_checkpoint``
  model_type   vit_h | vit_l | vit_b | vit_t (None: not loadable by a standard builder)
  repo         Hub repo id ("OWNER/REPO")
  file         path of the weights inside the repo
  revision     branch, tag or commit to pin ("main" where no commit has been checked)
  layout       "segment_anything" or "transformers" (key names; see sam_drop_in/_layouts.py)
  format       "safetensors" or "pickle" (pickles load with torch.load(weights_only=True))
  license      SPDX id, or None where not checked
  paper        arXiv URL
  sha256       sha256 of the file, or None where not checked offline
  status       "exists" (published by its authors), "unconfirmed" (reported, not checked),
               "planned" (a segment_anything-layout safetensors repo this project publishes)
  default      True for the file ``default_checkpoint(model_type)`` returns
"""

from __future__ import annotations

from typing import Any

from ._constants import REGISTRY_KEYS, normalize_model_type

_SAM_PAPER = "https://arxiv.org/abs/2304.02643"
_MOBILESAM_PAPER = "https://arxiv.org/abs/2306.14289"
_TINYSAM_PAPER = "https://arxiv.org/abs/2312.13789"
_SLIMSAM_PAPER = "https://arxiv.org/abs/2312.05284"


def _entry(name: str, model_type: str | None, repo: str, file: str, layout: str, format: str,
           license: str | None, paper: str, status: str = "exists", default: bool = False) -> dict[str, Any]:
    return {"name": name, "model_type": model_type, "repo": repo, "file": file, "revision": "main",
            "layout": layout, "format": format, "license": license, "paper": paper, "sha256": None,
            "status": status, "default": default}


MANIFEST: tuple[dict[str, Any], ...] = (
    # _entry(name, model_type, repo, file, layout, format, license, paper, status, default); every
    # revision is "main" and no sha256 has been checked offline yet (see the field list above).
    # Meta's SAM, as published by Hugging Face in transformers' layout (safetensors: the safe default).
    _entry("sam-vit-base", "vit_b", "facebook/sam-vit-base", "model.safetensors",
           "transformers", "safetensors", "Apache-2.0", _SAM_PAPER, default=True),
    _entry("sam-vit-large", "vit_l", "facebook/sam-vit-large", "model.safetensors",
           "transformers", "safetensors", "Apache-2.0", _SAM_PAPER, default=True),
    _entry("sam-vit-huge", "vit_h", "facebook/sam-vit-huge", "model.safetensors",
           "transformers", "safetensors", "Apache-2.0", _SAM_PAPER, default=True),
    # Meta's original .pth files, mirrored.
    _entry("sam_vit_b_01ec64", "vit_b", "ybelkada/segment-anything", "checkpoints/sam_vit_b_01ec64.pth",
           "segment_anything", "pickle", "Apache-2.0", _SAM_PAPER),
    _entry("sam_vit_l_0b3195", "vit_l", "ybelkada/segment-anything", "checkpoints/sam_vit_l_0b3195.pth",
           "segment_anything", "pickle", "Apache-2.0", _SAM_PAPER),
    _entry("sam_vit_h_4b8939", "vit_h", "ybelkada/segment-anything", "checkpoints/sam_vit_h_4b8939.pth",
           "segment_anything", "pickle", "Apache-2.0", _SAM_PAPER),
    # MobileSAM (vit_t).
    _entry("mobile_sam", "vit_t", "dhkim2810/MobileSAM", "mobile_sam.pt",
           "segment_anything", "pickle", "Apache-2.0", _MOBILESAM_PAPER, default=True),
    _entry("mobile_sam-mirror", "vit_t", "ybelkada/segment-anything", "checkpoints/mobile_sam.pth",
           "segment_anything", "pickle", "Apache-2.0", _MOBILESAM_PAPER),
    # TinySAM (vit_t, same layout as MobileSAM).
    _entry("tinysam", "vit_t", "merve/tinysam", "tinysam.pth",
           "segment_anything", "pickle", "Apache-2.0", _TINYSAM_PAPER, "unconfirmed"),
    # SlimSAM: pruned ViT widths, not one of the standard builders' shapes.
    _entry("slimsam-50", None, "Zigeng/SlimSAM-uniform-50", "model.safetensors",
           "transformers", "safetensors", None, _SLIMSAM_PAPER),
    _entry("slimsam-77", None, "Zigeng/SlimSAM-uniform-77", "model.safetensors",
           "transformers", "safetensors", None, _SLIMSAM_PAPER),
    # Published by this project with `sam-drop-in convert --push-to-hub`: segment_anything layout, safetensors.
    _entry("mobile_sam-safetensors", "vit_t", "sam-drop-in/mobile-sam", "model.safetensors",
           "segment_anything", "safetensors", "Apache-2.0", _MOBILESAM_PAPER, "planned"),
    _entry("tinysam-safetensors", "vit_t", "sam-drop-in/tinysam", "model.safetensors",
           "segment_anything", "safetensors", "Apache-2.0", _TINYSAM_PAPER, "planned"),
)

MODEL_CARD_TEMPLATE = """---
license: {license}
library_name: sam-drop-in
tags:
- segment-anything
- image-segmentation
- {model_type}
---

# {title}

Segment Anything weights (`{model_type}`) in segment_anything's key layout, stored as
safetensors: loading them never unpickles anything.

- Converted from: `{source}`
- Source sha256: `{source_sha256}`
- Source layout: `{source_layout}`
- Parameters: {num_params:,}
- Paper: {paper}

## Use

```python
from sam_drop_in import sam_model_registry, SamPredictor

sam = sam_model_registry["{model_type}"](checkpoint="hf://{repo_id}")
predictor = SamPredictor(sam)
```

The file also loads with the original package: `segment_anything` / `mobile_sam`
`model.load_state_dict(safetensors.torch.load_file("model.safetensors"))`.

Written by `sam-drop-in convert` ({version}). The licence is the source checkpoint's.
"""


def entries(model_type: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries, optionally only those of one model type.

    Arguments:
      model_type (str | None): "vit_h", "vit_l", "vit_b", "vit_t", or None for all.

    Returns:
      (list[dict]): copies of the entries (safe to modify).
    """
    return [dict(e) for e in MANIFEST if model_type is None or e["model_type"] == model_type]


def default_checkpoint(model_type: str) -> str:
    """The ``hf://`` address of the recommended published checkpoint for a model type.

    Arguments:
      model_type (str): "vit_h", "vit_l", "vit_b", "vit_t" or "default" (= vit_h).

    Returns:
      (str): ``hf://OWNER/REPO@REVISION/FILE``, accepted as ``checkpoint=`` by every builder.

    Raises:
      ValueError: unknown model type.
    """
    mt = normalize_model_type(model_type)
    for e in MANIFEST:
        if e["model_type"] == mt and e["default"]:
            rev = "" if e["revision"] in (None, "main") else f"@{e['revision']}"
            return f"hf://{e['repo']}{rev}/{e['file']}"
    raise ValueError(f"unknown model type {model_type!r}; expected one of {', '.join(REGISTRY_KEYS)}")


def find(repo_id: str, filename: str | None = None) -> dict[str, Any] | None:
    """The manifest entry for a Hub file, if it is a known one (used for model cards)."""
    for e in MANIFEST:
        if e["repo"] == repo_id and (filename is None or e["file"] == filename):
            return dict(e)
    return None


def render_markdown() -> str:
    """The manifest as the markdown table kept in ``weights/README.md``."""
    lines = [
        "| name | model type | repo | file | layout | format | licence | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in MANIFEST:
        lines.append(
            f"| {e['name']}{' (default)' if e['default'] else ''} | {e['model_type'] or '-'} | "
            f"[{e['repo']}](https://huggingface.co/{e['repo']}) | `{e['file']}` | {e['layout']} | "
            f"{e['format']} | {e['license'] or 'unchecked'} | {e['status']} |"
        )
    return "\n".join(lines) + "\n"
