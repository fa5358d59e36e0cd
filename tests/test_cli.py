"""The ``sam-drop-in`` command end to end, on the committed example images.

A few runs go through a real subprocess (``python -m sam_drop_in``), the way users call it;
the error cases call ``cli.main`` in this process, which gives the same exit statuses and
messages without paying for another torch import each. The model has random weights (a
checkpoint file written once per module), so the masks are meaningless but deterministic;
thresholds are set to 0 so that the random model keeps masks at all.
"""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam_drop_in import cli, sam_model_registry
from sam_drop_in.cli.everything import METADATA_HEADER

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"
# Thresholds that a random-weight model passes (upstream: 0 disables the IoU and stability
# filters); NMS at 1.0 keeps the near-duplicates such a model produces, so there are many masks.
LOOSE = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
         "--box-nms-thresh", "1.0"]


def run_cli(*args, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("SAM_DROP_IN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sam_drop_in", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_t_random.safetensors"
    save_file({k: v.contiguous() for k, v in sam_model_registry["vit_t"]().state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# segment


@pytest.fixture(scope="module")
def segment_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    # One image here: several images per run are covered by the folder run and the in-process test.
    images = [IMAGES / "coffee.jpg"]
    res = run_cli("segment", *images, "--point", "220,150", "--point", "20,20,0", "--box", "60,40,300,260",
                  "--box", "10,10,200,120", "--multimask", "--checkpoint", ckpt, "--output", out)
    return res, out, images


def test_segment_writes_masks_scores_and_overlay(segment_run):
    res, out, images = segment_run
    assert res.returncode == 0, res.stderr
    # Not a terminal: no progress bar.
    assert "%|" not in res.stderr and "it/s" not in res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("segment: 1 image, 6 masks, ")
    for image_path in images:
        image = rgb(image_path)
        h, w = image.shape[:2]
        folder = out / image_path.stem
        meta = json.loads((folder / "scores.json").read_text())
        assert (meta["width"], meta["height"]) == (w, h)
        assert meta["multimask"] is True and len(meta["prompts"]) == 2  # one prompt per box
        assert meta["prompts"][0]["points"] == [[220.0, 150.0], [20.0, 20.0]]
        assert meta["prompts"][0]["labels"] == [1, 0]
        assert len(meta["masks"]) == 6  # 2 prompts x 3 candidates
        best = []
        for rec in meta["masks"]:
            m = png(folder / rec["file"])
            assert m.shape == (h, w) and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 255}
            assert rec["area"] == int((m == 255).sum())
            assert np.isfinite(rec["score"])
            if rec["best"]:
                best.append(m == 255)
        assert len(best) == 2  # one best mask per prompt
        assert sorted(int(p) for p in {r["prompt"] for r in meta["masks"]}) == [0, 1]

        overlay = rgb(folder / "overlay.png")
        assert overlay.shape == image.shape
        # Prompt markers are drawn last: green foreground click, red background click.
        assert tuple(overlay[150, 220]) == (40, 220, 60)
        assert np.all(overlay[14:27, 14:27] == (235, 40, 40), axis=-1).sum() > 20
        union = np.logical_or(*best)
        if union.any():
            changed = np.any(overlay != image, axis=-1)
            assert changed[union].mean() > 0.9  # tinted where the masks are
            if (~union).any():
                # Elsewhere only prompt markers, box outlines and score labels are drawn.
                assert changed[~union].mean() < 0.5


def test_segment_single_prompt_and_unreadable_image(ckpt, tmp_path, capsys):
    """In process: one point -> one prompt, one mask (the predict() path); a truncated image in
    the same run is named, skipped, and makes the status 1 while the good image is finished."""
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes((IMAGES / "chelsea.jpg").read_bytes()[:300])
    out = tmp_path / "o"
    code = cli.main(["segment", str(IMAGES / "chelsea.jpg"), str(bad), "--point", "225,150",
                     "--checkpoint", str(ckpt), "--output", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"cannot read '{bad}' as an image" in err[0]
    assert "segment: 2 images (1 failed), 1 mask," in captured.out
    assert not (out / "truncated").exists()

    folder = out / "chelsea"
    meta = json.loads((folder / "scores.json").read_text())
    assert [r["file"] for r in meta["masks"]] == ["mask_0.png"] and meta["masks"][0]["best"]
    assert meta["prompts"] == [{"points": [[225.0, 150.0]], "labels": [1], "box": None}]
    mask = png(folder / "mask_0.png") == 255
    image = rgb(IMAGES / "chelsea.jpg")
    overlay = rgb(folder / "overlay.png")
    if mask.any():
        assert np.any(overlay != image, axis=-1)[mask].mean() > 0.9
    # The click is drawn last, in green (foreground), centred on the point.
    assert tuple(overlay[150, 225]) == (40, 220, 60)


# ---------------------------------------------------------------------------------------------
# everything


@pytest.fixture(scope="module")
def everything_run(ckpt, tmp_path_factory):
    src = tmp_path_factory.mktemp("imgs")
    (src / "chelsea.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    (src / "broken.jpg").write_bytes(b"this is not a jpeg")
    (src / "notes.txt").write_text("not an image suffix: ignored")
    out = tmp_path_factory.mktemp("everything")
    res = run_cli("everything", src, *LOOSE, "--checkpoint", ckpt, "--output", out)
    return res, out


def test_everything_folder_layout_and_bad_image(everything_run):
    res, out = everything_run
    # The bad image is reported by name, the good one is finished, the status says something failed.
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "broken.jpg" in err[0] and "cannot read" in err[0], res.stderr
    assert "(1 failed)" in res.stdout
    assert not (out / "broken").exists()

    image = rgb(IMAGES / "chelsea.jpg")
    h, w = image.shape[:2]
    folder = out / "chelsea"
    lines = (folder / "metadata.csv").read_text().split("\n")
    assert lines[0] == METADATA_HEADER
    rows = list(csv.DictReader(lines))
    assert len(rows) > 1
    pngs = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    assert [p.stem for p in pngs] == [str(i) for i in range(len(rows))]
    masks = []
    for row, p in zip(rows, pngs):
        m = png(p)
        assert m.shape == (h, w) and set(np.unique(m)) <= {0, 255}
        m = m == 255
        masks.append(m)
        assert int(row["area"]) == int(m.sum())
        if m.any():
            ys, xs = np.nonzero(m)
            assert [int(row[k]) for k in ("bbox_x0", "bbox_y0")] == [xs.min(), ys.min()]
        assert [int(row[k]) for k in ("crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h")] == [0, 0, w, h]
        assert 0 <= float(row["point_input_x"]) <= w and 0 <= float(row["point_input_y"]) <= h

    overlay = rgb(out / "chelsea.overlay.png")
    assert overlay.shape == image.shape
    union = np.logical_or.reduce(masks)
    changed = np.any(overlay != image, axis=-1)
    assert changed[union].mean() > 0.9


def test_everything_rle_matches_pngs(everything_run, ckpt, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    _, png_out = everything_run
    code = cli.main(["everything", str(IMAGES / "chelsea.jpg"), *LOOSE, "--convert-to-rle", "--no-overlay",
                     "--checkpoint", str(ckpt), "--output", str(tmp_path)])
    assert code == 0
    records = json.loads((tmp_path / "chelsea.json").read_text())
    assert not (tmp_path / "chelsea.overlay.png").exists()
    rows = list(csv.DictReader((png_out / "chelsea" / "metadata.csv").read_text().split("\n")))
    assert len(records) == len(rows)
    for i, rec in enumerate(records):
        assert set(rec) >= {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                            "crop_box"}
        decoded = mask_utils.decode(rec["segmentation"]).astype(bool)
        from_png = png(png_out / "chelsea" / f"{i}.png") == 255
        np.testing.assert_array_equal(decoded, from_png)
        assert rec["area"] == int(rows[i]["area"])


def test_everything_hierarchical_random_weights(tmp_path, capsys):
    code = cli.main(["everything", "--input", str(IMAGES / "coffee.jpg"), "--hierarchical", "--points-per-side", "4",
                     "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--checkpoint", "random",
                     "--output", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0
    assert "RANDOM weights" in captured.err and "MEANINGLESS" in captured.err
    assert captured.out.startswith("everything: 1 image, ")
    lines = (tmp_path / "coffee" / "metadata.csv").read_text().split("\n")
    assert lines[0] == METADATA_HEADER and len(lines) >= 2
    assert lines[1].endswith(",0,0,600,400")  # hierarchical records cover the whole image
    assert rgb(tmp_path / "coffee.overlay.png").shape == (400, 600, 3)


# ---------------------------------------------------------------------------------------------
# info and help


def test_info_reports_type_params_and_sha(ckpt, capsys):
    assert cli.main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    n_params = sum(p.numel() for p in sam_model_registry["vit_t"]().parameters())
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert "model type: vit_t" in out
    assert "layout:     segment_anything" in out
    assert f"parameters: {n_params:,}" in out
    assert f"sha256:     {sha}" in out
    assert cli.main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["num_params"], info["sha256"]) == ("vit_t", n_params, sha)


# Every registered command, so a new one cannot ship without a working --help.
@pytest.mark.parametrize("command", [name.replace("_", "-") for name in cli.COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"sam-drop-in {command}" in capsys.readouterr().out


def test_everything_has_upstream_amg_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["everything", "--help"])
    text = capsys.readouterr().out
    for flag in ("--points-per-side", "--points-per-batch", "--pred-iou-thresh", "--stability-score-thresh",
                 "--stability-score-offset", "--box-nms-thresh", "--crop-n-layers", "--crop-nms-thresh",
                 "--crop-overlap-ratio", "--crop-n-points-downscale-factor", "--min-mask-region-area",
                 "--convert-to-rle", "--hierarchical", "--model-type", "--checkpoint", "--device", "--output"):
        assert flag in text


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, non-zero status


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sam-drop-in: error: ")
    return err[0]


@pytest.mark.parametrize("point", ["12", "1,2,3,4", "a,b", "1,2,7", "nan,3", "1;2"])
def test_bad_point_syntax(point, capsys):
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--point", point, "--checkpoint", "random"]) == 2
    line = one_error_line(capsys)
    assert f"bad --point {point!r}" in line and "X,Y" in line


@pytest.mark.parametrize("box", ["1,2,3", "10,10,5,20", "0,0,x,9"])
def test_bad_box_syntax(box, capsys):
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--box", box, "--checkpoint", "random"]) == 2
    assert f"bad --box {box!r}" in one_error_line(capsys)


def test_no_prompt(capsys):
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--checkpoint", "random"]) == 2
    assert "at least one prompt" in one_error_line(capsys)


def test_missing_image(tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert cli.main(["segment", str(missing), "--point", "1,1", "--checkpoint", "random"]) == 2
    assert f"no such file or directory: '{missing}'" in one_error_line(capsys)
    assert cli.main(["everything", str(missing), "--checkpoint", "random"]) == 2
    assert "nope.jpg" in one_error_line(capsys)


def test_missing_and_bad_checkpoint(tmp_path, capsys):
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--point", "1,1",
                     "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in one_error_line(capsys)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--point", "1,1", "--checkpoint", str(junk)]) == 2
    assert "junk.pt" in one_error_line(capsys)
    assert cli.main(["info", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in one_error_line(capsys)


def test_checkpoint_of_wrong_type(ckpt, capsys):
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--point", "1,1", "--model-type", "vit_b",
                     "--checkpoint", str(ckpt)]) == 2
    line = one_error_line(capsys)
    assert "holds a vit_t model but --model-type is vit_b" in line and "--model-type vit_t" in line


def test_prompt_outside_image_skips_that_image(ckpt, tmp_path, capsys):
    code = cli.main(["segment", str(IMAGES / "chelsea.jpg"), "--point", "500,10", "--checkpoint", str(ckpt),
                     "--output", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "--point 500,10 lies outside" in err and "451x300" in err
    assert not (tmp_path / "chelsea").exists()


def test_conflicting_inputs_and_options(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x.jpg").write_bytes(b"1")
    (b / "x.png").write_bytes(b"1")
    assert cli.main(["everything", str(a), str(b), "--checkpoint", "random"]) == 2
    assert "would both write output 'x'" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["everything", str(empty), "--checkpoint", "random"]) == 2
    assert "contains no image files" in one_error_line(capsys)
    assert cli.main(["everything", str(IMAGES / "coffee.jpg"), "--hierarchical", "--crop-n-layers", "1",
                     "--checkpoint", "random"]) == 2
    assert "--hierarchical" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(capsys):
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--point", "1,1", "--device", "cuda",
                     "--checkpoint", "random"]) == 2
    assert "CUDA is not available" in one_error_line(capsys)


def test_no_checkpoint_offline_without_cache(tmp_path):
    """No --checkpoint, no network, empty cache: one line that says so and what to do."""
    res = run_cli("segment", IMAGES / "coffee.jpg", "--point", "1,1", "--output", tmp_path / "o",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert "no --checkpoint given" in err[0] and "--checkpoint PATH" in err[0]
    assert "hf://" in err[0]  # names the default it tried
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# convert and the delegated commands


def test_convert_then_info(ckpt, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(ckpt), str(dst), "--model-type", "vit_t"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "vit_t" and config["layout"] == "segment_anything"
    assert cli.main(["info", str(dst / "model.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "vit_t"
    # A checkpoint of another type than required: one line, status 2, nothing written.
    assert cli.main(["convert", str(ckpt), str(tmp_path / "as_vit_b"), "--model-type", "vit_b"]) == 2
    assert "vit_t" in one_error_line(capsys)
    assert not (tmp_path / "as_vit_b" / "model.safetensors").exists()


def test_export_onnx_is_delegated(tmp_path, capsys):
    # The onnx module's own option check answers (status 2) before any model is built.
    code = cli.main(["export-onnx", "--checkpoint", "unused", "--model-type", "vit_t", "--output",
                     str(tmp_path / "d.onnx"), "--quantize-encoder-out", str(tmp_path / "q.onnx")])
    assert code == 2
    assert "--encoder-output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# issue 17: folder runs past a bad image, option validation, one file under several names


@pytest.mark.parametrize("command", ["everything", "segment"])
def test_folder_run_goes_on_past_a_too_thin_image(command, ckpt, tmp_path, capsys):
    """A valid 3000x1 PNG resizes to height 0 for the model: that image is reported by name,
    the other image (sorted after it) is still processed, the summary is printed, status 1."""
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (3000, 1), (120, 30, 200)).save(src / "a_thin.png")
    (src / "chelsea.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    out = tmp_path / "out"
    prompt = LOOSE if command == "everything" else ["--point", "0,0"]
    code = cli.main([command, str(src), *prompt, "--no-overlay", "--checkpoint", str(ckpt), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "a_thin.png" in err[0] and "too thin" in err[0] and err[0].endswith("; skipped"), err
    assert f"{command}: 2 images (1 failed), " in captured.out
    assert not (out / "a_thin").exists()
    assert (out / "chelsea" / ("metadata.csv" if command == "everything" else "scores.json")).exists()


@pytest.mark.parametrize("option", [
    ["--points-per-side", "0"], ["--crop-n-layers", "-1"], ["--points-per-batch", "0"],
    ["--pred-iou-thresh", "1.5"], ["--stability-score-thresh", "nan"], ["--stability-score-offset", "-1"],
    ["--box-nms-thresh", "-0.1"], ["--crop-nms-thresh", "2"], ["--crop-overlap-ratio", "1"],
    ["--crop-n-points-downscale-factor", "0"], ["--min-mask-region-area", "-5"],
])
def test_everything_refuses_out_of_range_options(option, tmp_path, capsys):
    # Refused before the model is built: one line that names the flag, status 2, nothing written.
    # (A small grid first, which the option under test overrides, keeps a run that is not
    # refused short.)
    code = cli.main(["everything", str(IMAGES / "coffee.jpg"), "--points-per-side", "2", *option, "--no-overlay",
                     "--checkpoint", "random",
                     "--output", str(tmp_path / "o")])
    assert code == 2
    assert f"{option[0]} must be " in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_high_score_thresh_needs_hierarchical(capsys):
    assert cli.main(["everything", str(IMAGES / "coffee.jpg"), "--high-score-thresh", "8",
                     "--checkpoint", "random"]) == 2
    assert "--hierarchical" in one_error_line(capsys)


def test_one_file_under_several_names_is_processed_once(tmp_path, capsys):
    img = tmp_path / "img.jpg"
    img.write_bytes((IMAGES / "coffee.jpg").read_bytes())
    (tmp_path / "x").mkdir()
    (tmp_path / "link.jpg").symlink_to(img)
    names = [str(img), str(tmp_path / "x" / ".." / "img.jpg"), str(tmp_path / "link.jpg"), str(tmp_path)]
    code = cli.main(["segment", *names, "--point", "10,10", "--no-overlay", "--checkpoint", "random",
                     "--output", str(tmp_path / "o")])
    assert code == 0
    assert "segment: 1 image, 1 mask," in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img"]  # under the first name given


def test_export_onnx_random_weights_and_bad_checkpoint(tmp_path, capsys):
    """``--checkpoint random`` works for export-onnx as for the other commands; a missing
    checkpoint is bad input (status 2, one line naming it), as everywhere else."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "d.onnx"
    assert cli.main(["export-onnx", "--checkpoint", "random", "--model-type", "vit_t", "--output", str(out)]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    names = [i.name for i in ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()]
    assert names[:2] == ["image_embeddings", "point_coords"]
    missing = tmp_path / "missing.pt"
    assert cli.main(["export-onnx", "--checkpoint", str(missing), "--model-type", "vit_t",
                     "--output", str(tmp_path / "e.onnx")]) == 2
    assert "missing.pt" in one_error_line(capsys)
    assert not (tmp_path / "e.onnx").exists()


def test_distill_is_a_command_like_the_others(tmp_path, capsys):
    """``sam-drop-in distill`` and ``python -m sam_drop_in.distill`` are one command: the same
    parser, the same one-line error and status 2 for a missing embedding store."""
    from sam_drop_in.distill.cli import main as distill_main

    args = ["eval", "--student", str(tmp_path / "s.pt"), "--embeddings", str(tmp_path / "nostore")]
    assert cli.main(["distill", *args]) == 2
    first = one_error_line(capsys)
    assert "nostore" in first
    assert distill_main(args) == 2
    assert one_error_line(capsys) == first


def test_checkpoint_missing_a_key_is_named(ckpt, tmp_path, capsys):
    # load_model goes through checkpoint.load_into, whose message names the missing key.
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpt))
    del sd["mask_decoder.iou_token.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(sd, str(partial))
    assert cli.main(["segment", str(IMAGES / "coffee.jpg"), "--point", "1,1", "--checkpoint", str(partial),
                     "--output", str(tmp_path / "o")]) == 2
    assert "mask_decoder.iou_token.weight" in one_error_line(capsys)
