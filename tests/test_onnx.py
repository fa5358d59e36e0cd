"""ONNX export and the ONNX Runtime predictor against the torch model on identical weights.

Everything runs on vit_t with perturbed random weights (every parameter and BatchNorm statistic
non-trivial) and a real photograph (examples/images/chelsea.jpg). One vit_t encoder export, one
torch encode and two ONNX Runtime encodes in all, to stay inside the suite's time budget. The
ViT encoder path (relative positions, windows) is exported from a 1-block, 64-wide
ImageEncoderViT: a full vit_b encoder export costs minutes on two cores and proves nothing more.

Tolerances (float32 throughout):
  * encoder embeddings: atol 2e-4 on unit-scale embeddings (LayerNorm2d output). ONNX Runtime
    fuses and reorders the same float32 sums as PyTorch; observed max error ~1e-5.
  * decoder logits: atol 2e-4 (observed ~1e-5), IoU predictions atol 1e-5 (observed ~1e-7).
  * binary masks: equal except at pixels where the torch logit is within 1e-3 of the
    threshold 0 (20x the worst logit error above; a pixel can flip only there).
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sam_drop_in import SamPredictor, sam_model_registry  # noqa: E402
from sam_drop_in import modeling  # noqa: E402
from sam_drop_in.onnx_export import (  # noqa: E402
    export_decoder,
    export_encoder,
    quantization_agreement,
    quantize,
)
from sam_drop_in.onnx_predictor import ResizeLongestSideNumpy, SamOnnxPredictor  # noqa: E402
from sam_drop_in.utils.onnx import SamOnnxModel  # noqa: E402
from sam_drop_in.utils.transforms import ResizeLongestSide  # noqa: E402

warnings.filterwarnings("ignore", module="timm")

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "examples" / "images" / "chelsea.jpg"

EMB_ATOL = 2e-4
LOGIT_ATOL = 2e-4
IOU_ATOL = 1e-5
NEAR_THRESHOLD = 1e-3

# Prompt sets in original-image pixels of chelsea.jpg (451x300): 0, 1, 2 and 3 points, a box,
# points with a box. They also exercise the dynamic number of decoder points (0 to 4).
PROMPTS = {
    "none": {},
    "one_point": dict(point_coords=np.array([[220, 150]]), point_labels=np.array([1])),
    "two_points": dict(point_coords=np.array([[220, 150], [60, 40]]), point_labels=np.array([1, 0])),
    "three_points_single": dict(
        point_coords=np.array([[220, 150], [60, 40], [300, 200]]), point_labels=np.array([1, 0, 1]),
        multimask_output=False,
    ),
    "box": dict(box=np.array([40, 30, 400, 280])),
    "point_and_box": dict(point_coords=np.array([[220, 150]]), point_labels=np.array([0]), box=np.array([40, 30, 400, 280])),
}


def _perturb(state_dict, seed=0):
    # Fresh models have zero biases, unit BatchNorm statistics and zero attention biases; move
    # them all so a dropped or mis-wired term in the exported graph shows up.
    from sam_drop_in.testing import perturbed_state_dict

    return perturbed_state_dict(state_dict, seed=seed)


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return _perturb(sam_model_registry["vit_t"]().state_dict())


@pytest.fixture(scope="module")
def sam(state_dict):
    model = sam_model_registry["vit_t"]()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def image():
    return np.asarray(Image.open(IMAGE).convert("RGB"))


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def encoder_path(sam, out_dir):
    path = out_dir / "encoder.onnx"
    export_encoder(sam, str(path), opset=17, include_preprocessing=True)
    return path


@pytest.fixture(scope="module")
def decoder_paths(sam, state_dict, out_dir):
    """Opset 17 through the Python function, opset 16 through the CLI entry point (checkpoint
    file on disk, as a user would run it)."""
    p17 = out_dir / "decoder17.onnx"
    export_decoder(sam, str(p17), opset=17)
    ckpt = out_dir / "vit_t.pt"
    torch.save(state_dict, ckpt)
    p16 = out_dir / "decoder16.onnx"
    from sam_drop_in import cli

    assert cli.main(["export-onnx", "--checkpoint", str(ckpt), "--model-type", "vit_t", "--output", str(p16),
                     "--opset", "16"]) == 0
    return {17: p17, 16: p16}


@pytest.fixture(scope="module")
def torch_predictor(sam, image):
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def onnx_predictor(encoder_path, decoder_paths, image):
    predictor = SamOnnxPredictor(encoder_path, decoder_paths[17])
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def sessions(decoder_paths):
    return {k: ort.InferenceSession(str(v), providers=["CPUExecutionProvider"]) for k, v in decoder_paths.items()}


@pytest.fixture(scope="module")
def reference(torch_predictor):
    """SamPredictor.predict(..., return_logits=True) per (prompt name, multimask), computed once."""
    cache = {}

    def get(name, multimask=None):
        prompt = dict(PROMPTS[name])
        if multimask is not None:
            prompt["multimask_output"] = multimask
        key = (name, prompt.get("multimask_output", True))
        if key not in cache:
            cache[key] = torch_predictor.predict(**prompt, return_logits=True)
        return cache[key]

    return get


def _decoder_feeds(predictor, embedding, prompt):
    """Inputs of the exported decoder for a SamPredictor-style prompt, in upstream's ONNX
    example convention, written independently of SamOnnxPredictor."""
    t = ResizeLongestSide(1024)
    coords, labels = [], []
    if "point_coords" in prompt:
        coords.append(t.apply_coords(prompt["point_coords"], predictor.original_size))
        labels.append(prompt["point_labels"].astype(np.float32))
    if "box" in prompt:
        coords.append(t.apply_boxes(prompt["box"], predictor.original_size).reshape(2, 2))
        labels.append(np.array([2, 3], np.float32))
    elif "point_coords" in prompt:
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([-1], np.float32))
    coords = np.concatenate(coords) if coords else np.zeros((0, 2))
    labels = np.concatenate(labels) if labels else np.zeros((0,))
    return {
        "image_embeddings": embedding,
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(predictor.original_size, np.float32),
    }


def _assert_masks_agree(ref_logits, masks):
    mismatch = (ref_logits > 0) != masks
    assert np.all(np.abs(ref_logits[mismatch]) < NEAR_THRESHOLD), (
        f"{mismatch.sum()} pixels differ, worst |logit| {np.abs(ref_logits[mismatch]).max()}"
    )


def test_resize_matches_torch_transform(image):
    # Odd sizes exercise the rounding of get_preprocess_shape.
    for h, w in [(300, 451), (451, 300), (333, 1024), (1500, 2250)]:
        assert ResizeLongestSideNumpy.get_preprocess_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    np.testing.assert_array_equal(ResizeLongestSideNumpy(1024).apply_image(image), ResizeLongestSide(1024).apply_image(image))
    coords = np.array([[10.5, 20.25], [450, 299]])
    np.testing.assert_array_equal(
        ResizeLongestSideNumpy(1024).apply_coords(coords, (300, 451)), ResizeLongestSide(1024).apply_coords(coords, (300, 451))
    )


def test_encoder_embedding_matches_torch(torch_predictor, onnx_predictor):
    ref = torch_predictor.get_image_embedding().numpy()
    emb = onnx_predictor.get_image_embedding()
    assert emb.shape == (1, 256, 64, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, rtol=0, atol=EMB_ATOL)
    assert onnx_predictor.original_size == torch_predictor.original_size
    assert onnx_predictor.input_size == torch_predictor.input_size


@pytest.mark.parametrize("opset", [16, 17])
def test_decoder_matches_torch(torch_predictor, sessions, reference, opset):
    """Same torch embedding into both decoders: the ONNX graph alone is under test. The prompt
    sets give 0 to 4 decoder points through one graph (dynamic number of points)."""
    embedding = torch_predictor.get_image_embedding().numpy()
    for name, prompt in PROMPTS.items():
        masks, iou, low_res = sessions[opset].run(None, _decoder_feeds(torch_predictor, embedding, prompt))
        assert masks.shape == (1, 4, 300, 451) and iou.shape == (1, 4) and low_res.shape == (1, 4, 256, 256)
        for multimask, pick in ((True, slice(1, None)), (False, slice(0, 1))):
            ref_masks, ref_iou, ref_low = reference(name, multimask)
            np.testing.assert_allclose(iou[0, pick], ref_iou, rtol=0, atol=IOU_ATOL, err_msg=name)
            np.testing.assert_allclose(low_res[0, pick], ref_low, rtol=0, atol=LOGIT_ATOL, err_msg=name)
            np.testing.assert_allclose(masks[0, pick], ref_masks, rtol=0, atol=LOGIT_ATOL, err_msg=name)
            _assert_masks_agree(ref_masks, masks[0, pick] > 0)


def test_decoder_mask_input_and_sizes(sam, torch_predictor, sessions):
    """mask_input path, and orig_im_size other than the export example's (the crop must follow
    the input, not be frozen at trace time)."""
    session = sessions[17]
    embedding = torch_predictor.get_image_embedding()
    prompt = PROMPTS["one_point"]
    _, _, low = torch_predictor.predict(**prompt)
    feeds = _decoder_feeds(torch_predictor, embedding.numpy(), prompt)
    feeds["mask_input"] = low[None, :1].astype(np.float32)
    feeds["has_mask_input"] = np.ones(1, np.float32)
    for size in [(683, 1024), (1024, 517), (37, 91)]:
        feeds["orig_im_size"] = np.array(size, np.float32)
        masks, iou, low_res = session.run(None, feeds)
        with torch.no_grad():
            coords = torch.from_numpy(feeds["point_coords"][:, :-1])
            labels = torch.from_numpy(feeds["point_labels"][:, :-1]).int()
            sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=torch.from_numpy(feeds["mask_input"]))
            ref_low, ref_iou = sam.mask_decoder.predict_masks(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense)
            input_size = ResizeLongestSide.get_preprocess_shape(size[0], size[1], 1024)
            ref = sam.postprocess_masks(ref_low, input_size, size).numpy()
        assert masks.shape == (1, 4) + size
        np.testing.assert_allclose(masks, ref, rtol=0, atol=LOGIT_ATOL)
        np.testing.assert_allclose(iou, ref_iou.numpy(), rtol=0, atol=IOU_ATOL)


_NO_TORCH_SCRIPT = r"""
import builtins, importlib.util, json, sys, types
import numpy as np
sys.modules["torch"] = None  # any "import torch" now raises ImportError
repo, enc, dec, image_path, out = sys.argv[1:6]
mode = sys.argv[6]
if mode == "module_only":
    # Run the predictor module without the package __init__ (which belongs to the torch API).
    pkg = types.ModuleType("sam_drop_in")
    pkg.__path__ = [repo + "/sam_drop_in"]
    sys.modules["sam_drop_in"] = pkg
else:
    sys.path.insert(0, repo)
from sam_drop_in.onnx_predictor import SamOnnxPredictor
from PIL import Image
prompts = json.loads(sys.argv[7])
image = np.asarray(Image.open(image_path).convert("RGB"))
p = SamOnnxPredictor(enc, dec)
p.set_image(image)
results = {}
for name, kw in prompts.items():
    kw = {k: (np.array(v) if isinstance(v, list) else v) for k, v in kw.items()}
    masks, scores, low = p.predict(**kw)
    logits, _, _ = p.predict(**kw, return_logits=True)
    results[name + "/masks"] = masks
    results[name + "/scores"] = scores
    results[name + "/low"] = low
    results[name + "/logits"] = logits
np.savez(out, **results)
assert "torch" not in {m for m in sys.modules if sys.modules[m] is not None}
print("ok")
"""


def _run_without_torch(mode, encoder_path, decoder_path, out_file):
    prompts = {k: {kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()} for k, v in PROMPTS.items()}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if mode == "module_only":
        env.pop("PYTHONPATH")
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, str(REPO), str(encoder_path), str(decoder_path), str(IMAGE),
         str(out_file), mode, json.dumps(prompts)],
        capture_output=True, text=True, env=env, cwd=str(out_file.parent), timeout=300,
    )


def test_onnx_predictor_without_torch_matches_sam_predictor(reference, encoder_path, decoder_paths, out_dir):
    out_file = out_dir / "no_torch.npz"
    proc = _run_without_torch("module_only", encoder_path, decoder_paths[17], out_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out_file)
    for name, prompt in PROMPTS.items():
        ref_logits, ref_scores, ref_low = reference(name)
        masks, scores, low = got[name + "/masks"], got[name + "/scores"], got[name + "/low"]
        assert masks.dtype == np.bool_ and masks.shape == ref_logits.shape
        assert scores.dtype == np.float32 and scores.shape == ref_scores.shape
        assert low.dtype == np.float32 and low.shape == ref_low.shape
        assert got[name + "/logits"].dtype == np.float32
        _assert_masks_agree(ref_logits, masks)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4)
        np.testing.assert_allclose(low, ref_low, rtol=0, atol=1e-3)


def test_package_import_without_torch(encoder_path, decoder_paths, out_dir):
    """`import sam_drop_in.onnx_predictor` runs the package __init__; with torch absent it must
    still import."""
    proc = _run_without_torch("package", encoder_path, decoder_paths[17], out_dir / "pkg.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]


BAD_CALLS = [
    ("image_format", lambda p, img: p.set_image(img, image_format="RGBA")),
    ("grayscale", lambda p, img: p.set_image(img[..., 0])),
    ("float_image", lambda p, img: p.set_image(img.astype(np.float32))),
    ("rgba", lambda p, img: p.set_image(np.dstack([img, img[..., :1]]))),
    ("coords_without_labels", lambda p, img: p.predict(point_coords=np.array([[1, 2]]))),
    ("labels_mismatch", lambda p, img: p.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([1, 1]))),
    ("coords_shape", lambda p, img: p.predict(point_coords=np.array([1, 2]), point_labels=np.array([1]))),
    ("nan_coords", lambda p, img: p.predict(point_coords=np.array([[np.nan, 2]]), point_labels=np.array([1]))),
    ("box_shape", lambda p, img: p.predict(box=np.array([1, 2, 3]))),
    ("mask_input_shape", lambda p, img: p.predict(mask_input=np.zeros((256, 256)))),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_inputs_same_errors(torch_predictor, onnx_predictor, image, name, call):
    before = onnx_predictor.get_image_embedding().copy()
    errors = []
    for predictor in (torch_predictor, onnx_predictor):
        with pytest.raises(Exception) as info:
            call(predictor, image)
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    assert isinstance(errors[1], (ValueError, AssertionError))
    # A rejected image or prompt leaves the set image in place.
    assert onnx_predictor.is_image_set
    np.testing.assert_array_equal(onnx_predictor.get_image_embedding(), before)


def test_predict_before_set_image(encoder_path, decoder_paths, sam):
    onnx_p = SamOnnxPredictor(encoder_path, decoder_paths[17])
    torch_p = SamPredictor(sam)
    for method in ("predict", "get_image_embedding"):
        with pytest.raises(RuntimeError) as a:
            getattr(torch_p, method)()
        with pytest.raises(RuntimeError) as b:
            getattr(onnx_p, method)()
        assert str(a.value) == str(b.value)


@pytest.fixture(scope="module")
def options_decoder(sam, out_dir):
    """Every non-default export flag at once: single mask chosen by stability score, extra
    metrics, tanh GELU."""
    path = out_dir / "options.onnx"
    opts = dict(return_single_mask=True, use_stability_score=True, return_extra_metrics=True, gelu_approximate=True)
    export_decoder(sam, str(path), opset=17, **opts)
    return path, opts


def test_predictor_rejects_swapped_or_single_mask_models(encoder_path, decoder_paths, options_decoder, out_dir):
    with pytest.raises(ValueError, match="argument order"):
        SamOnnxPredictor(decoder_paths[17], encoder_path)
    with pytest.raises(ValueError, match="return_single_mask"):
        SamOnnxPredictor(encoder_path, options_decoder[0])
    with pytest.raises(FileNotFoundError, match="export-onnx"):
        SamOnnxPredictor(out_dir / "missing.onnx", decoder_paths[17])


def test_decoder_options_match_upstream_onnx_model(sam, state_dict, torch_predictor, options_decoder):
    """return_single_mask, use_stability_score, return_extra_metrics and gelu_approximate against
    mobile_sam's own SamOnnxModel (upstream's code) in eager mode on identical weights."""
    mobile_sam = pytest.importorskip("mobile_sam")
    from mobile_sam.utils.onnx import SamOnnxModel as RefOnnxModel

    path, opts = options_decoder
    assert all(m.approximate == "none" for m in sam.modules() if isinstance(m, torch.nn.GELU))
    ref_sam = mobile_sam.sam_model_registry["vit_t"]()
    ref_sam.load_state_dict(state_dict, strict=True)
    ref_sam.eval()  # rebuild the reference's attention-bias cache after loading
    for m in ref_sam.modules():
        if isinstance(m, torch.nn.GELU):
            m.approximate = "tanh"  # what upstream's script does for --gelu-approximate
    ref_model = RefOnnxModel(ref_sam, **{k: v for k, v in opts.items() if k != "gelu_approximate"})
    embedding = torch_predictor.get_image_embedding().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
    for name in ("one_point", "three_points_single"):  # one click picks a multimask output, 3+ points the single one
        feeds = _decoder_feeds(torch_predictor, embedding, PROMPTS[name])
        got = session.run(None, feeds)
        with torch.no_grad():
            ref = ref_model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for label, g, r in zip(["masks", "scores", "stability", "areas", "low_res"], got, ref):
            r = r.numpy()
            assert g.shape == r.shape, label
            if label == "areas":  # pixel counts: only near-zero logits may flip (at most 0.1% of pixels)
                assert np.all(np.abs(g - r) <= 1e-3 * feeds["orig_im_size"].prod()), (g, r)
            elif label in ("scores", "stability"):  # ratios of pixel counts, same caveat
                np.testing.assert_allclose(g, r, rtol=0, atol=1e-3, err_msg=label)
            else:
                np.testing.assert_allclose(g, r, rtol=0, atol=LOGIT_ATOL, err_msg=label)


def test_quantized_decoder_agreement(decoder_paths, sessions, torch_predictor, out_dir):
    qpath = out_dir / "decoder_int8.onnx"
    quantize(str(decoder_paths[17]), str(qpath))
    assert qpath.stat().st_size < decoder_paths[17].stat().st_size / 2
    report = quantization_agreement(str(decoder_paths[17]), str(qpath))
    assert set(report) == {"mask_iou_mean", "mask_iou_min", "score_max_abs_diff"}
    assert report["mask_iou_mean"] > 0.9, report
    # And on the photograph's embedding: int8 masks overlap the float ones closely.
    embedding = torch_predictor.get_image_embedding().numpy()
    feeds = _decoder_feeds(torch_predictor, embedding, PROMPTS["one_point"])
    f = sessions[17].run(None, feeds)[0] > 0
    q = ort.InferenceSession(str(qpath)).run(None, feeds)[0] > 0
    iou = np.logical_and(f, q).sum((-2, -1)) / np.maximum(np.logical_or(f, q).sum((-2, -1)), 1)
    assert iou.min() > 0.8, iou


def _small_vit_sam():
    torch.manual_seed(0)
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2, out_chans=256,
            use_rel_pos=True, window_size=14, global_attn_indexes=(1,),
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    sam.load_state_dict(_perturb(sam.state_dict(), seed=3))
    return sam.eval()


def test_vit_encoder_without_preprocessing_opset16_dynamic_batch(out_dir, image):
    """The ViT encoder (windowed + global blocks, relative positions; reduced width/depth) exported
    without preprocessing at opset 16, run with batch 2, then quantised."""
    sam = _small_vit_sam()
    path = out_dir / "vit_encoder16.onnx"
    report = export_encoder(sam, str(path), opset=16, include_preprocessing=False, quantize_out=str(out_dir / "vit_q.onnx"))
    assert report["agreement"]["embedding_cosine"] > 0.95, report
    resized = ResizeLongestSide(1024).apply_image(image)
    with torch.no_grad():
        x = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
        x = torch.cat([x, x.flip(-1)])
        ref = sam.image_encoder(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert got.shape == (2, 256, 64, 64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=EMB_ATOL)


def test_export_keeps_model_state_and_is_atomic(sam, out_dir, monkeypatch):
    # The exporter restores its wrapper's training flag recursively; the caller's model must come
    # back exactly as it was (a regression here left BatchNorm in training mode).
    flags = [m.training for m in sam.modules()]
    export_decoder(sam, str(out_dir / "state.onnx"))
    assert [m.training for m in sam.modules()] == flags

    def broken_export(*args, **kwargs):
        Path(args[2]).write_bytes(b"partial")
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    target = out_dir / "atomic" / "decoder.onnx"
    with pytest.raises(RuntimeError, match="simulated"):
        export_decoder(sam, str(target))
    assert not target.exists()
    assert os.listdir(target.parent) == []
    with pytest.raises(ValueError, match="opset"):
        export_decoder(sam, str(target), opset=11)


def test_onnx_model_signature_matches_upstream():
    import inspect

    segment_anything = pytest.importorskip("segment_anything.utils.onnx")
    ours = inspect.signature(SamOnnxModel.__init__)
    theirs = inspect.signature(segment_anything.SamOnnxModel.__init__)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
    assert list(inspect.signature(SamOnnxModel.forward).parameters) == list(
        inspect.signature(segment_anything.SamOnnxModel.forward).parameters
    )


def test_external_data_is_gathered_into_one_file(decoder_paths, sessions, torch_predictor, tmp_path):
    """vit_h / vit_l encoders exceed ONNX's 2 GB protobuf limit and come out of the exporter with
    one external file per tensor; the export gathers them into <name>.data. Simulated on the
    decoder (a vit_h export takes minutes)."""
    import onnx

    from sam_drop_in.onnx_export import _set_metadata

    path = tmp_path / "big.onnx"
    onnx.save_model(onnx.load(str(decoder_paths[17])), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(os.listdir(tmp_path)) > 10
    _set_metadata(str(path), {"kind": "decoder"})
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    feeds = _decoder_feeds(torch_predictor, torch_predictor.get_image_embedding().numpy(), PROMPTS["box"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, r in zip(got, sessions[17].run(None, feeds)):
        np.testing.assert_array_equal(g, r)


def test_onnx_example_runs(encoder_path, decoder_paths, out_dir):
    """examples/onnx_predict.py, as a user runs it, on the committed image with exported models."""
    out = out_dir / "example_overlay.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "onnx_predict.py"), "--encoder", str(encoder_path),
         "--decoder", str(decoder_paths[17]), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    with Image.open(out) as im, Image.open(REPO / "examples" / "images" / "chelsea.jpg") as src:
        assert im.size[1] == src.size[1] and im.size[0] >= src.size[0]
