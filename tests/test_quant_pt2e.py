"""Real int8 execution of the image encoder through torchao's PT2E flow and Inductor
(sam_drop_in.quantization.pt2e_int8), and how precision.optimize chooses its int8 runtime.

The model is ``small_sam`` (a 1-block, 64-wide ViT encoder at 1024 px, the real prompt encoder
and mask decoder) with perturbed random weights, calibrated on one photograph and evaluated on
another; random weights put many logits near the threshold, so the bounds are lower bounds for
trained weights. benchmarks/bench_quant.py --real --runtimes torchao,bf16 measures the real vit_t.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sam_drop_in import SamPredictor
from sam_drop_in._errors import InputError
from sam_drop_in.precision import optimize
from sam_drop_in.testing import load_image, mean_iou, perturbed_state_dict, predict_quality_masks, small_sam

pytest.importorskip("torchao")  # the quant extra; the compat extra (the suite's) includes it

from sam_drop_in.quantization.pt2e_int8 import Pt2eImageEncoder, pt2e_int8_encoder


@pytest.fixture(scope="module")
def sd():
    return perturbed_state_dict(small_sam("sam_drop_in").state_dict(), seed=1)


def _model(sd):
    m = small_sam("sam_drop_in")
    m.load_state_dict(sd)
    return m


@pytest.fixture(scope="module")
def calib():
    return [load_image("astronaut.jpg")]  # calibration and evaluation photographs differ


@pytest.fixture(scope="module")
def coffee():
    return load_image("coffee.jpg")


@pytest.fixture(scope="module")
def fp32(sd, coffee):
    """(embedding, quality masks) of the float model on the evaluation photograph."""
    pred = SamPredictor(optimize(_model(sd), "fp32"))
    masks = predict_quality_masks(pred, coffee)
    return pred.get_image_embedding().clone(), masks


@pytest.fixture(scope="module")
def int8(sd, calib):
    return optimize(_model(sd), "int8", calibration=calib)  # auto: torchao, as torchao imports here


def _agreement(model, coffee, fp32):
    pred = SamPredictor(model)
    masks = predict_quality_masks(pred, coffee)
    emb = pred.get_image_embedding()
    cos = float(torch.nn.functional.cosine_similarity(emb.flatten(), fp32[0].flatten(), 0))
    return emb, cos, mean_iou(fp32[1], masks)


def test_auto_chooses_torchao_and_agrees(int8, coffee, fp32):
    enc = int8.image_encoder
    assert isinstance(enc, Pt2eImageEncoder) and enc.img_size == 1024
    # The quantised graph holds int8 weights and per-tensor activation quantisation.
    consts = [t for t in list(enc.graph.parameters()) + list(enc.graph.buffers()) if t.dtype == torch.int8]
    targets = {str(n.target) for n in enc.graph.graph.nodes if n.op == "call_function"}
    assert len(consts) >= 4, "the convolutions' and linears' weights are int8"
    assert any("quantize_per_tensor" in t for t in targets) and any("dequantize_per_channel" in t for t in targets)
    # The mask decoder stays float32, untouched.
    assert all(p.dtype == torch.float32 for p in int8.mask_decoder.parameters())
    emb, cos, iou = _agreement(int8, coffee, fp32)
    assert emb.dtype == torch.float32 and emb.shape == (1, 256, 64, 64)
    # Contract: 8-bit weights (per channel) and activations (per tensor, histogram observers over one
    # photograph) keep the embedding within cosine 0.995 of fp32 and the masks at mean IoU
    # >= 0.93 (the bound; measured on the AMX machine: see the printed figures). Not
    # equal to fp32: the rounding is real.
    assert cos >= 0.995, f"embedding cosine {cos:.5f}"
    assert iou >= 0.93, f"mean mask IoU {iou:.4f}"
    assert cos < 1.0
    print(f"pt2e int8: embedding cosine {cos:.5f}, mean mask IoU {iou:.4f}, threads {torch.get_num_threads()}")


def test_saturation_probe_and_the_seven_bit_ranges():
    """``int8_products_saturate`` asks oneDNN: in this process it must agree with whether the
    compiled int8 code of a linear whose pairs of products exceed int16 is exact; the 7-bit
    requantisation keeps the float range and fits 128 codes."""
    import torch._inductor.config as inductor_config

    from sam_drop_in.quantization.pt2e_int8 import _within_seven_bits, int8_products_saturate

    assert _within_seven_bits(0.5, 3, 0, 63) == (0.5, 3, 0, 63)  # 6-bit codes: unchanged
    scale, zp, lo, hi = _within_seven_bits(0.01, 100, 0, 255)
    assert (lo, hi) == (0, 127) and scale == pytest.approx(2.55 / 127) and zp == round(1.0 / scale)
    graph, x = _saturating_linear()
    with torch.no_grad():
        eager = graph(x)
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(graph)(x)
    err = float((compiled - eager).abs().max())
    # Contract: exact products give the eager result to float rounding (measured 2e-5 of 31.5
    # with AMX); saturated ones lose about a third of it (measured 9.96 with oneDNN at AVX2).
    assert (err > 1.0) == int8_products_saturate(), err


def _saturating_linear():
    """A linear whose every input code is 255 x weight code +-127 (per-channel weight scale 1/127,
    input scale 1/255, zero point 0): exact int8 products sum pairs beyond int16's range."""
    from sam_drop_in.testing import fixed_int8_graph

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 64).eval()
    with torch.no_grad():
        model.weight.copy_(torch.sign(torch.randn(64, 256)))
    x = torch.rand(64, 256) * 0.5 + 0.5
    return fixed_int8_graph(model, x, lambda w: (torch.full((64,), 1 / 127), -128, 127), (1 / 255, 0, 0, 255)), x


def test_compiled_code_calls_onednn_int8_kernels(sd, calib):
    """Really int8 at run time: Inductor lowers the quantised convolutions and linears to
    oneDNN's quantised kernels (qconv / qlinear), rather than running float ops on dequantised
    weights."""
    from torch._inductor.utils import run_and_get_code

    enc = pt2e_int8_encoder(_model(sd), calib, warm_up=False)
    x = torch.zeros(1, 3, 1024, 1024)
    _, code = run_and_get_code(enc, x)
    text = "\n".join(code)
    assert "qconv" in text and "qlinear" in text, "no oneDNN int8 kernel in Inductor's code"


def test_tinyvit_runs_every_linear_in_int8(calib, coffee):
    """vit_t (at 256 px, to keep the compile short): all 40 linears of its ten TinyViT blocks,
    the MLPs' output projections (fc2) included, take int8 weights and run as oneDNN qlinear
    kernels, and no residual addition is fused into one (pt2e_int8._residual_adds_apart: fused
    after fc2 it made oneDNN fall back to its reference int8 kernel)."""
    from torch._inductor.utils import run_and_get_code

    from sam_drop_in.build_sam import build_sam_sized
    from sam_drop_in.quantization.calibrate import preprocess

    torch.manual_seed(0)
    sam = build_sam_sized("vit_t", image_size=256).eval()
    sam.load_state_dict(perturbed_state_dict(sam.state_dict(), seed=0))
    enc = pt2e_int8_encoder(sam, calib, warm_up=False)
    nodes = list(enc.graph.graph.nodes)
    linears = [n for n in nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 40
    assert all("dequantize_per_channel" in str(n.args[1].target) for n in linears), "a linear kept float weights"
    rewritten = [n for n in nodes if n.target == torch.ops.aten.sub.Tensor
                 and getattr(n.args[1], "target", None) == torch.ops.aten.neg.default]
    assert len(rewritten) == 10, "one residual - (-fc2) per TinyViT block"
    x = preprocess(sam, coffee)
    with torch.no_grad():
        ref = sam.image_encoder(x)
        y, code = run_and_get_code(enc, x)
    text = "\n".join(code)
    assert text.count("onednn.qlinear_pointwise") == 40 and "qlinear_pointwise.binary" not in text
    # And all 29 convolutions (stem, MBConv, merges, local convolutions, neck) as oneDNN int8
    # convolutions, none left float32 (pt2e_int8._fold_batchnorms).
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in sam.image_encoder.modules())
    assert convs == 29
    assert text.count("onednn.qconv_pointwise") + text.count("onednn.qconv2d_pointwise") == convs
    float_convolutions = ("extern_kernels.convolution(", "mkldnn._convolution_pointwise", "aten.convolution.default(",
                          "mkldnn_convolution.default(")
    assert not any(call in text for call in float_convolutions)
    # Contract: int8 weights and activations keep the embedding within cosine 0.995 of fp32
    # (measured 0.9996 on the AMX machine); the rewrite itself is exact (x - (-y) == x + y).
    cos = float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), 0))
    assert 0.995 <= cos < 1.0, f"embedding cosine {cos:.5f}"


def test_batchnorm_folding_is_exact():
    """Each Conv2d_BN replaced by a plain convolution with the folded weight and bias (done on the
    copy that is quantised): the same folding formula computed once instead of in the graph, so
    the float exported graphs agree bit for bit (same kernels, same shapes)."""
    import copy

    from sam_drop_in.build_sam import build_sam_sized
    from sam_drop_in.modeling.tiny_vit import Conv2d_BN
    from sam_drop_in.quantization.pt2e_int8 import _fold_batchnorms

    torch.manual_seed(0)
    encoder = build_sam_sized("vit_t", image_size=256).eval().image_encoder
    encoder.load_state_dict(perturbed_state_dict(encoder.state_dict(), seed=0))  # BatchNorm statistics too
    folded = copy.deepcopy(encoder)
    assert _fold_batchnorms(folded) == 27  # every convolution but the neck's two
    assert not any(isinstance(m, Conv2d_BN) for m in folded.modules())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        want = torch.export.export(encoder, (x,)).module()(x)
        got = torch.export.export(folded, (x,)).module()(x)
    assert torch.equal(got, want)


def test_residual_rewrite_is_exact():
    """The fc2 residual rewrite (x + y -> x - (-y)) changes no value: negation is exact and
    subtracting a negated number is the same IEEE operation as adding it. Contract: bit-equal
    outputs of the float exported graph before and after (same kernels, same shapes)."""
    from sam_drop_in.build_sam import build_sam_sized
    from sam_drop_in.quantization.pt2e_int8 import _residual_adds_apart

    torch.manual_seed(0)
    encoder = build_sam_sized("vit_t", image_size=256).eval().image_encoder
    encoder.load_state_dict(perturbed_state_dict(encoder.state_dict(), seed=0))
    x = torch.randn(1, 3, 256, 256)
    graph = torch.export.export(encoder, (x,)).module()
    with torch.no_grad():
        before = graph(x)
        assert _residual_adds_apart(graph, encoder) == 10
        after = graph(x)
    assert torch.equal(before, after)
    assert _residual_adds_apart(graph, small_sam("sam_drop_in").image_encoder) == 0  # ViT: nothing to do


def test_batches_input_checks_and_copies(int8):
    enc = int8.image_encoder
    with pytest.raises(InputError, match="Bx3x1024x1024"):
        enc(torch.zeros(1, 3, 512, 512))
    with pytest.raises(InputError, match="Bx3x1024x1024"):
        enc(np.zeros((1, 3, 1024, 1024), np.float32))
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    assert out.shape == (2, 256, 64, 64) and out.dtype == torch.float32
    # A batch runs image by image through the one compiled function: the same kernels on the
    # same shapes, so each row equals that image alone, bit for bit.
    assert torch.equal(out[1:], enc(x[1:]))
    # compile() (optimize(..., compile=True) calls it) leaves the compiled encoder as it is.
    compiled = enc._get_compiled()
    enc.compile()
    assert enc._get_compiled() is compiled


def test_optimize_compile_true_keeps_the_int8_encoder(sd, calib, coffee, fp32):
    m = optimize(_model(sd), "int8", compile=True, calibration=calib, int8_runtime="torchao")
    assert isinstance(m.image_encoder, Pt2eImageEncoder)
    _, cos, _ = _agreement(m, coffee, fp32)
    assert cos >= 0.995, f"embedding cosine {cos:.5f}"  # contract as in test_auto_chooses_torchao_and_agrees


def test_runtime_choice_and_errors(sd, calib):
    with pytest.raises(ValueError, match="int8_runtime must be one of"):
        optimize(_model(sd), "int8", calibration=calib, int8_runtime="tensorrt")
    with pytest.raises(ValueError, match="applies to mode='int8' only"):
        optimize(_model(sd), "bf16", int8_runtime="torchao")
    with pytest.raises(ValueError, match="needs calibration images"):
        optimize(_model(sd), "int8", int8_runtime="torchao")
    with pytest.raises(InputError, match="no calibration images"):
        optimize(_model(sd), "int8", calibration=[], int8_runtime="torchao")
    m = _model(sd)
    with pytest.raises(InputError, match="float32 image encoder on CPU"):
        pt2e_int8_encoder(m.to(torch.bfloat16), calib)


def test_missing_torchao_names_the_extra_and_auto_falls_back(sd, calib, monkeypatch):
    pytest.importorskip("onnxruntime")
    from sam_drop_in.quantization.onnx_int8 import OnnxImageEncoder

    # Without images, auto is ONNX Runtime's dynamic quantisation (it needs none).
    assert optimize(_model(sd), "int8").image_encoder.quantized == "int8-dynamic"
    # A None entry in sys.modules makes `import torchao...` raise ImportError, as when the
    # package is not installed.
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'sam-drop-in\[quant\]'"):
        optimize(_model(sd), "int8", calibration=calib, int8_runtime="torchao")
    m = optimize(_model(sd), "int8", calibration=calib)
    assert isinstance(m.image_encoder, OnnxImageEncoder) and m.image_encoder.quantized == "int8-static-qdq-minmax"


_NO_VNNI_SCRIPT = r"""
import json, sys, torch
from sam_drop_in import SamPredictor
from sam_drop_in.precision import optimize
from sam_drop_in.testing import load_image, mean_iou, perturbed_state_dict, predict_quality_masks, small_sam

sd = perturbed_state_dict(small_sam("sam_drop_in").state_dict(), seed=1)
def model():
    m = small_sam("sam_drop_in"); m.load_state_dict(sd); return m
coffee = load_image("coffee.jpg")
ref = SamPredictor(optimize(model(), "fp32")); ref_masks = predict_quality_masks(ref, coffee)
import copy, dataclasses
from sam_drop_in import quantization as Q
from sam_drop_in.quantization.pt2e_int8 import int8_products_saturate
calib = [load_image("astronaut.jpg")]
# a short search keeps this child process quick (the search is tested in test_quantization.py)
fast = dataclasses.replace(Q.W8A8, max_search_rows=256, weight_search=(1.0, 0.9), act_search=(1.0, 0.8),
                           softmax_fine_shifts=(0, 2))
def searched():
    m = model(); m.image_encoder = Q.calibrate(m, calib, fast); return m
out = {"threads": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability(),
       "saturate": int8_products_saturate()}
# the calibrated route, and the searched scales of a simulated w8a8 model on the int8 kernels
for name, m in (("calibrated", lambda: optimize(model(), "int8", calibration=calib, int8_runtime="torchao")),
                ("w8a8", lambda: optimize(searched(), "int8"))):
    m = m()
    pred = SamPredictor(m); masks = predict_quality_masks(pred, coffee)
    cos = float(torch.nn.functional.cosine_similarity(pred.get_image_embedding().flatten(), ref.get_image_embedding().flatten(), 0))
    out[name] = {"cos": cos, "iou": mean_iou(ref_masks, masks), "label": m.image_encoder.quantized}
print(json.dumps(out))
"""


def test_runs_without_vnni_on_one_thread(tmp_path):
    """Both int8 routes (calibrated; a simulated w8a8 model's scales) on a CPU without VNNI/AMX:
    oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) and ATen/Inductor's vector code at AVX2
    (ATEN_CPU_CAPABILITY), one thread; a fresh process, since both are read once at start-up."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _NO_VNNI_SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["threads"] == 1 and r["isa"] == "AVX2"
    # Without VNNI oneDNN multiplies u8 x s8 pairs with AVX2's vpmaddubsw, whose int16 sums
    # saturate: the probe sees it, and both routes then hold activations to 7 bits ("-a7").
    assert r["saturate"] is True
    for name in ("calibrated", "w8a8"):
        assert r[name]["label"].endswith("-a7"), r
        # Contract: as with VNNI, cosine >= 0.995 and mean mask IoU >= 0.93 (the bound).
        # Before the 7-bit remedy the calibrated route measured 0.99600 / 0.977 here, and 8-bit
        # searched scales 0.993 on vit_t (tests/test_quant_pt2e_scales.py).
        assert r[name]["cos"] >= 0.995 and r[name]["iou"] >= 0.93, r
    print("pt2e int8 without VNNI, 1 thread:", r)
