"""Every example script runs (in a subprocess, as a user runs it) on a committed image.

Random weights, small grids: these check that the scripts work and write what they promise,
not mask quality. The migration example also checks that sam_drop_in and MobileSAM's
reference give the same masks from the same checkpoint, which is its point.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam_drop_in import sam_model_registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LOOSE = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def run_example(name, *args):
    res = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert res.returncode == 0, f"{name} failed:\n{res.stdout}\n{res.stderr}"
    return res


def size(path):
    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random vit_t weights as .safetensors and as a .pt state dict (for the references)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in sam_model_registry["vit_t"]().state_dict().items()}
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(sd, str(folder / "vit_t.safetensors"))
    torch.save(sd, folder / "vit_t.pt")
    return folder / "vit_t.safetensors", folder / "vit_t.pt"


def test_migrate_from_segment_anything(checkpoints, tmp_path):
    _, pt = checkpoints
    try:
        import mobile_sam  # noqa: F401

        impls = "sam_drop_in,mobile_sam"
    except ImportError:
        impls = "sam_drop_in"
    run_example("migrate_from_segment_anything.py", "--impl", impls, "--checkpoint", pt, "--points-per-side", "0",
                "--output", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["impls"] == impls.split(",")
    assert size(tmp_path / "sam_drop_in_point_mask.png") == (512, 512)
    if "mobile_sam" in impls:
        agree = summary["agreement"]["sam_drop_in vs mobile_sam"]
        # Same weights, same maths: masks agree up to float rounding at the threshold.
        assert agree["point_mask_iou_min"] > 0.99
        assert agree["box_mask_iou"] > 0.99
        assert agree["point_score_max_abs_diff"] < 1e-3


def test_grounded_sam_boxes(checkpoints, tmp_path):
    st, _ = checkpoints
    res = run_example("grounded_sam_boxes.py", "--checkpoint", st, "--output", tmp_path)
    boxes = json.loads((EXAMPLES / "astronaut_boxes.json").read_text())["boxes"]
    records = json.loads((tmp_path / "masks.json").read_text())
    assert [r["label"] for r in records] == [b["label"] for b in boxes]
    for r in records:
        m = np.asarray(Image.open(tmp_path / r["file"]))
        assert m.shape == (512, 512) and r["area"] == int((m == 255).sum())
    overlay = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    image = np.asarray(Image.open(EXAMPLES / "images" / "astronaut.jpg").convert("RGB"))
    assert overlay.shape == image.shape and np.any(overlay != image)
    assert f"{len(boxes)} boxes" in res.stdout


def test_everything_overlay(checkpoints, tmp_path):
    st, _ = checkpoints
    run_example("everything_overlay.py", "--checkpoint", st, "--points-per-side", "4", *LOOSE, "--output", tmp_path)
    meta = json.loads((tmp_path / "masks.json").read_text())
    assert len(meta) >= 1 and {"area", "bbox", "predicted_iou"} <= set(meta[0])
    assert size(tmp_path / "overlay.png") == (451, 300)


def test_hierarchical_vs_grid(checkpoints, tmp_path):
    st, _ = checkpoints
    run_example("hierarchical_vs_grid.py", "--checkpoint", st, "--points-per-side", "4", *LOOSE, "--output", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grid"]["prompts_decoded"] == 16  # the full 4x4 grid
    assert summary["hierarchical"]["prompts_decoded"] >= 1  # at least the 1x1 sparse grid
    assert 0.0 <= summary["recall_of_grid_masks_at_iou_0.5"] <= 1.0
    w, h = size(tmp_path / "side_by_side.png")
    assert (w, h) == (2 * 600 + 8, 400)
