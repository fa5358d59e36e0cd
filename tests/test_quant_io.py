"""Quantised model files: one safetensors file with the quantised encoder and the float prompt
encoder and mask decoder, loaded back through sam_model_registry (sam_drop_in.quantization.io)."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from skimage import data

from sam_drop_in import SamPredictor, quantization as Q, sam_model_registry
from sam_drop_in import checkpoint as ckpt
from sam_drop_in._errors import CheckpointError
from sam_drop_in.build_sam import build_sam_sized, build_sam_vit_t
from sam_drop_in.testing import perturbed_state_dict

# A small search (few rows, short grids) keeps calibration under a second; the search itself is
# tested in test_quantization.py, this file tests what is written and read.
FAST = dataclasses.replace(Q.W8A8, max_search_rows=64, weight_search=(1.0, 0.9), act_search=(1.0, 0.8),
                           softmax_fine_shifts=(0, 2))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    sam = build_sam_sized("vit_t", image_size=256).eval()
    sam.load_state_dict(perturbed_state_dict(sam.state_dict(), seed=3))
    return sam


@pytest.fixture(scope="module")
def qsam(model):
    q = copy.deepcopy(model)
    q.image_encoder = Q.calibrate(model, [data.rocket()[::4, ::4]], FAST)
    return q


@pytest.fixture(scope="module")
def qfile(qsam, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "q.safetensors"
    Q.save_quantized(qsam, path)
    return path


def _embed_and_masks(sam, image):
    pred = SamPredictor(sam)
    pred.set_image(image)
    h, w = image.shape[:2]
    masks, scores, _ = pred.predict(np.array([[0.4 * w, 0.5 * h]]), np.array([1]), box=np.array([10, 10, w - 20, h - 30]))
    return pred.get_image_embedding(), masks, scores


def test_whole_model_file_loads_through_the_registry(qsam, qfile):
    # Contract: sam_model_registry["vit_t"](checkpoint=q) and build_sam_vit_t give a Sam whose
    # encoder is the quantised one, and the model computes exactly what the calibrated model in
    # memory computes (same codes, scales and float weights; same kernels on the same shapes).
    with safe_open(str(qfile), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        assert f.get_tensor("image_encoder.body.neck.0.weight_int").dtype == torch.int8
    assert meta["format"] == "sam_drop_in.quantized" and meta["model_type"] == "vit_t" and meta["image_size"] == "256"
    assert json.loads(meta["architecture"])["kind"] == "tiny_vit"
    assert Q.QuantRecipe.from_json(meta["recipe"]) == FAST
    assert any(k.startswith("prompt_encoder.") for k in keys) and any(k.startswith("mask_decoder.") for k in keys)

    image = data.astronaut()[::2, ::2]
    ref = _embed_and_masks(qsam, image)
    for loaded in (sam_model_registry["vit_t"](checkpoint=str(qfile)), build_sam_vit_t(checkpoint=qfile)):
        assert isinstance(loaded.image_encoder, Q.QuantizedTinyViT)
        assert loaded.image_encoder.recipe == FAST and not loaded.training
        for part in ("prompt_encoder", "mask_decoder"):
            got, want = getattr(loaded, part).state_dict(), getattr(qsam, part).state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        emb, masks, scores = _embed_and_masks(loaded, image)
        assert torch.equal(emb, ref[0])
        np.testing.assert_array_equal(masks, ref[1])
        np.testing.assert_array_equal(scores, ref[2])


def test_encoder_only_files_old_and_new(qsam, tmp_path):
    # Contract: an encoder-only file (what the first save_quantized wrote: no "kind" in the
    # architecture, no prompt encoder or mask decoder) still loads with load_quantized; the
    # registry refuses it with a message that says how to use it.
    qenc = qsam.image_encoder
    new = tmp_path / "enc.safetensors"
    Q.save_quantized(qenc, new)
    old = tmp_path / "old.safetensors"
    meta = {"format": "sam_drop_in.quantized_encoder", "format_version": "1", "recipe": qenc.recipe.to_json(),
            "architecture": json.dumps({k: v for k, v in qenc.arch.items() if k != "kind"}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in qenc.state_dict().items()}, str(old), metadata=meta)
    x = Q.preprocess(qsam, data.astronaut()[::4, ::4])
    with torch.no_grad():
        want = qenc(x)
        for path in (new, old):
            assert torch.equal(Q.load_quantized(path)(x), want)
        # The whole-model file's encoder reads back with load_quantized too.
        whole = tmp_path / "whole.safetensors"
        Q.save_quantized(qsam, whole)
        assert torch.equal(Q.load_quantized(whole)(x), want)
    with pytest.raises(CheckpointError, match="quantised image encoder only"):
        sam_model_registry["vit_t"](checkpoint=str(old))


def _rewrite(src, dst, **meta_changes):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_mismatch_and_damage_are_checkpoint_errors(qfile, tmp_path):
    vit_b = _rewrite(qfile, tmp_path / "b.safetensors", model_type="vit_b",
                     architecture=json.dumps({"kind": "vit", "embed_dim": 768, "depth": 12}))
    with pytest.raises(CheckpointError, match=r"quantised vit_b model, but a vit_t model was requested; "
                                              r"use sam_model_registry\['vit_b'\]"):
        sam_model_registry["vit_t"](checkpoint=str(vit_b))
    with pytest.raises(CheckpointError, match="quantised vit_t model, but a vit_b model"):
        sam_model_registry["vit_b"](checkpoint=str(qfile))
    # Dispatch on the architecture's kind: a "vit" file goes to quantization.vit (an error that
    # says so while that module is missing; with it, this made-up architecture cannot be built).
    with pytest.raises(CheckpointError, match="quantised ViT .* cannot build|cannot build the recorded architecture"):
        sam_model_registry["vit_b"](checkpoint=str(vit_b))
    with pytest.raises(CheckpointError, match="unknown quantised encoder kind 'mamba'"):
        sam_model_registry["vit_t"](checkpoint=str(_rewrite(qfile, tmp_path / "k.safetensors",
                                                            architecture=json.dumps({"kind": "mamba"}))))
    with pytest.raises(CheckpointError, match="format version '9'"):
        sam_model_registry["vit_t"](checkpoint=str(_rewrite(qfile, tmp_path / "v9.safetensors", format_version="9")))
    # Cut short: the header is intact (still recognised as quantised), the tensor data is not.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(qfile.read_bytes()[: qfile.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        sam_model_registry["vit_t"](checkpoint=str(cut))
    # A tensor missing: named, not a bare key dump from torch.
    sd = load_file(str(qfile))
    del sd["image_encoder.body.neck.0.weight_int"]
    with safe_open(str(qfile), framework="pt") as f:
        meta = f.metadata()
    save_file(sd, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="missing .*neck.0.weight_int.* damaged or was edited"):
        sam_model_registry["vit_t"](checkpoint=str(tmp_path / "missing.safetensors"))


def test_float_loaders_refuse_a_quantised_file_clearly(qfile, tmp_path):
    # load_state_dict / load_into / convert need float weights: one sentence that says what the
    # file is and what loads it, instead of a key-mismatch list. inspect_checkpoint describes it.
    msg = r"is a quantised vit_t model \(w8a8.*not float weights.*sam_model_registry\['vit_t'\]"
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_state_dict(str(qfile))
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_into(sam_model_registry["vit_t"](), str(qfile))
    with pytest.raises(CheckpointError, match=msg):
        ckpt.convert(str(qfile), tmp_path / "out")
    info = ckpt.inspect_checkpoint(str(qfile))
    assert info["model_type"] == "vit_t" and info["layout"] == "sam_drop_in quantized model"
    assert info["quantized"].startswith("w8a8 (weights 8 bits, activations 8 bits)")
    assert "int8" in info["dtype"] and info["size_bytes"] == qfile.stat().st_size


def test_failed_write_keeps_the_old_file(qsam, qfile, tmp_path, monkeypatch):
    # A write that fails half-way leaves the previous file byte-identical and no temporary file.
    import safetensors.torch

    target = tmp_path / "q.safetensors"
    target.write_bytes(qfile.read_bytes())
    before = target.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        Q.save_quantized(qsam, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


def test_save_refuses_what_is_not_quantised(model, tmp_path):
    with pytest.raises(TypeError, match="quantised image_encoder"):
        Q.save_quantized(model, tmp_path / "x.safetensors")
    raw = Q.QuantizedTinyViT(model.image_encoder, FAST)  # not calibrated
    with pytest.raises(ValueError, match="not calibrated"):
        Q.save_quantized(raw, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# sam-drop-in quantize


@pytest.fixture(scope="module")
def float_ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "vit_t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    Image.fromarray(data.rocket()[::8, ::8]).save(folder / "rocket.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_quantize_command_writes_a_loadable_model(model, float_ckpt, calib_dir, tmp_path, capsys):
    from sam_drop_in import cli
    from sam_drop_in.cli._common import load_model

    out = tmp_path / "q6.safetensors"
    # --search-rows keeps the search small (the command calibrates at the model's 1024 pixels).
    code = cli.main(["quantize", "--model-type", "vit_t", "--checkpoint", str(float_ckpt), "--calib", str(calib_dir),
                     "--bits", "6", "--search-rows", "32", "--output", str(out), "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("quantize: vit_t w6a6, 1 calibration image, ")
    qsam = sam_model_registry["vit_t"](checkpoint=str(out))
    assert isinstance(qsam.image_encoder, Q.QuantizedTinyViT)
    assert qsam.image_encoder.recipe == dataclasses.replace(Q.W6A6, max_search_rows=32)
    assert all(torch.equal(v, model.mask_decoder.state_dict()[k]) for k, v in qsam.mask_decoder.state_dict().items())
    # The other commands take the file as --checkpoint; info says what it is.
    loaded, found, _ = load_model(None, str(out), "cpu")
    assert found == "vit_t" and isinstance(loaded.image_encoder, Q.QuantizedTinyViT)
    assert cli.main(["info", str(out)]) == 0
    assert "quantized:  w6a6 (weights 6 bits, activations 6 bits)" in capsys.readouterr().out
    # Quantising a quantised file again is refused before any work.
    assert cli.main(["quantize", "--checkpoint", str(out), "--calib", str(calib_dir), "--output",
                     str(tmp_path / "again.safetensors")]) == 2
    assert "is already quantised (w6a6); pass the float checkpoint" in capsys.readouterr().err


def test_quantize_command_help(capsys):
    from sam_drop_in import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "sam-drop-in quantize" in out and "--calib" in out and "--from-qtinysam" in out


def test_quantize_command_bad_input(float_ckpt, calib_dir, tmp_path, capsys):
    from sam_drop_in import cli

    def run(*args):
        code = cli.main(["quantize", "--checkpoint", str(float_ckpt), *map(str, args)])
        return code, capsys.readouterr().err

    out = tmp_path / "q.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    cases = [
        (["--calib", tmp_path / "nope", "--output", out], "no such file or directory"),
        (["--calib", empty, "--output", out], "contains no image files"),
        (["--calib", bad, "--output", out], "cannot read .*broken.png.* remove it from the calibration images"),
        (["--output", out], "--calib is required"),
        (["--calib", calib_dir, "--output", tmp_path / "missing" / "q.safetensors"], "folder .* does not exist"),
        (["--calib", calib_dir, "--output", tmp_path], "is a directory"),
        (["--calib", calib_dir, "--search-rows", "0", "--output", out], "--search-rows must be at least 1"),
    ]
    import re

    for args, message in cases:
        code, err = run(*args)
        assert code == 2 and re.search(message, err), (args, err)
        assert err.startswith("sam-drop-in: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_quantize_command_in_a_subprocess(float_ckpt, tmp_path):
    # The installed entry point (python -m sam_drop_in) knows the command and reports bad input
    # as one line with status 2 before loading anything; the calibration itself runs in-process
    # above (a second calibration here would double this file's time).
    import os
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    env = dict(os.environ)
    env.pop("SAM_DROP_IN_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "sam_drop_in", "quantize", "--checkpoint", str(float_ckpt),
                          "--calib", str(tmp_path / "empty"), "--output", str(tmp_path / "q.safetensors")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 2
    assert res.stderr == f"sam-drop-in: error: directory '{tmp_path / 'empty'}' contains no image files\n"
    assert not (tmp_path / "q.safetensors").exists()
