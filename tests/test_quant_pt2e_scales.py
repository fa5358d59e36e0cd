"""Real int8 execution of an already quantised encoder: a saved quantised file (or a model after
``optimize(..., "w8a8"/"w6a6")``) runs its searched integer weights and activation scales on the
oneDNN int8 kernels through torchao's PT2E flow, with no calibration images
(``pt2e_int8_encoder`` on a quantised encoder; ``optimize(q, "int8")``).

Models: vit_t at 256 px (the compile stays short) and ``small_sam`` (a 1-block ViT at 1024 px),
perturbed random weights, calibrated on one scikit-image photograph with a short search (the
search itself is tested in test_quantization.py), evaluated on another. Random weights make the
agreement bounds lower bounds for trained ones.
"""

import copy
import dataclasses

import pytest
import torch
from skimage import data

import sam_drop_in.quantization as Q
from sam_drop_in import SamPredictor, sam_model_registry
from sam_drop_in.build_sam import build_sam_sized
from sam_drop_in.precision import optimize
from sam_drop_in.quantization.calibrate import preprocess
from sam_drop_in.testing import (
    fixed_int8_graph,
    load_image,
    mean_iou,
    perturbed_state_dict,
    predict_quality_masks,
    small_sam,
)

pytest.importorskip("torchao")  # the quant extra; the compat extra (the suite's) includes it

from sam_drop_in.quantization.pt2e_int8 import (  # noqa: E402
    Pt2eImageEncoder,
    _activation_qparams,
    _clamp_narrow_ranges,
    _within_seven_bits,
    int8_products_saturate,
    pt2e_int8_encoder,
)

_Q = torch.ops.quantized_decomposed


def _fast(recipe):
    return dataclasses.replace(recipe, max_search_rows=256, weight_search=(1.0, 0.9), act_search=(1.0, 0.8, 0.6),
                               softmax_fine_shifts=(0, 2))


@pytest.fixture(scope="module")
def vit_t():
    torch.manual_seed(0)
    sam = build_sam_sized("vit_t", image_size=256).eval()
    sam.load_state_dict(perturbed_state_dict(sam.state_dict(), seed=3))
    return sam


@pytest.fixture(scope="module")
def x(vit_t):
    return preprocess(vit_t, data.astronaut())  # not the calibration photograph


def _quantised(sam, recipe):
    q = copy.deepcopy(sam)
    q.image_encoder = Q.calibrate(sam, [data.rocket()[::4, ::4]], _fast(recipe))
    return q


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def _compiled_code(enc, x):
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        y, code = run_and_get_code(enc, x)
    return y, "\n".join(code)


def _kernel_counts(text):
    return (text.count("onednn.qlinear_pointwise"),
            text.count("onednn.qconv_pointwise") + text.count("onednn.qconv2d_pointwise"))


def test_saved_w8a8_file_runs_its_own_codes_and_scales_in_int8(vit_t, x, tmp_path):
    """The file written once (calibration and search) loads through the registry and becomes a
    real int8 encoder with no image: every int8 weight the kernels multiply equals the file's code,
    with the file's per-channel scales; every activation quantisation has the file's scale and
    zero point (post-GELU pairs: the one range of ``_activation_qparams``)."""
    from sam_drop_in.quantization.fake_quant import QuantLayer

    path = tmp_path / "q.safetensors"
    Q.save_quantized(_quantised(vit_t, Q.W8A8), path)
    q = sam_model_registry["vit_t"](checkpoint=str(path))
    layers = {n: m for n, m in q.image_encoder.body.named_modules() if isinstance(m, QuantLayer)}
    assert len(layers) == 69  # 29 convolutions and 40 linears

    enc = pt2e_int8_encoder(q, warm_up=False)
    assert isinstance(enc, Pt2eImageEncoder) and enc.quantized.startswith("w8a8-pt2e-x86-inductor")
    g = enc.graph
    aten = torch.ops.aten
    products = [n for n in g.graph.nodes if n.target in (aten.conv2d.default, aten.linear.default)]
    assert len(products) == 69
    # Each product's operands: dequantize_per_tensor(quantize_per_tensor(x)) and
    # dequantize_per_channel(int8 constant). Walk back from the product to the layer by the order
    # of the encoder's forward (export keeps it) and compare exactly.
    order = [n for n, _ in layers.items()]
    seen_weights = []
    for node in products:
        dq_w = node.args[1]
        assert dq_w.target == _Q.dequantize_per_channel.default
        codes = getattr(g, dq_w.args[0].target)
        scales = getattr(g, dq_w.args[1].target)
        assert codes.dtype == torch.int8
        seen_weights.append((codes, scales))
        dq_x = node.args[0]
        assert dq_x.target == _Q.dequantize_per_tensor.default
        seen_weights[-1] += (dq_x.args[1:5],)
    # Where the CPU's int8 products saturate (no VNNI) the activations are held to 7 bits.
    seven = int8_products_saturate()
    assert enc.quantized.endswith("-a7") == seven
    matched = 0
    for name in order:
        layer = layers[name]
        hits = [s for s in seen_weights if s[0].shape == layer.weight_int.shape and torch.equal(s[0], layer.weight_int)]
        assert hits, f"{name}: its integer codes are not in the int8 graph"
        codes, scales, act = hits[0]
        assert torch.equal(scales.float(), layer.weight_scale)
        want = _activation_qparams(layer.input_quant)
        if seven:
            want = _within_seven_bits(*want)
        assert act[0] == pytest.approx(want[0], rel=1e-6) and tuple(act[1:]) == want[1:]
        if layer.input_quant.kind == "uniform" and not seven:  # carried exactly
            assert act[0] == float(layer.input_quant.scale) and act[1] == int(layer.input_quant.zero_point)
        matched += 1
    assert matched == 69
    clamps = sum(n.target == torch.ops.aten.clamp.default for n in g.graph.nodes)
    assert clamps == (69 if seven else 0)  # 8-bit ranges are the dtype's: nothing to clamp

    # What these numbers compute: the quantised graph run eagerly (quantise/dequantise in
    # float32). Not compiled here, to keep CI short: Inductor's lowering of this graph is the
    # calibrated route's (same graph, other numbers; 40 qlinear and 29 qconv calls checked in
    # test_quant_pt2e.py::test_tinyvit_runs_every_linear_in_int8), the w6a6 test below compiles
    # the file route with its clamps, and the ViT test and the AVX2-capped child process run
    # compiled file routes against fp32.
    with torch.no_grad():
        ref = vit_t.image_encoder(x)
        sim = q.image_encoder(x)
        y = g(x)
    # Contract: 8-bit codes keep the embedding within cosine 0.995 of fp32 (measured 0.9996) and
    # 0.999 of the simulated model it came from (measured 0.9995; the differences: the attention
    # products, which only it quantises, post-GELU pairs as one range, and the two MBConv
    # shortcuts that the int8 fusion quantises with the next convolution's input). Where the
    # CPU's int8 products saturate the activations have 7 bits: bounds 0.99.
    cos_ref, cos_sim = _cos(y, ref), _cos(y, sim)
    bound = 0.99 if seven else 0.995
    assert bound <= cos_ref < 1.0 and cos_sim >= (0.99 if seven else 0.999), (cos_ref, cos_sim)
    print(f"w8a8 file, quantised graph: cosine {cos_ref:.5f} to fp32, {cos_sim:.5f} to the simulated model")


def test_w6a6_runs_six_bit_codes_in_the_int8_kernels(vit_t, x):
    """w6a6 has no 6-bit kernel; its codes run in the int8 ones: weights in [-32, 31], every
    activation clamped to its 64 codes before quantisation, as Inductor's fused requantisation
    saturates at the dtype's [0, 255] otherwise."""
    q = _quantised(vit_t, Q.W6A6)
    enc = pt2e_int8_encoder(q, warm_up=False)
    assert enc.quantized == "w6a6-pt2e-x86-inductor"  # 6-bit codes cannot saturate: never "-a7"
    g = enc.graph
    quantize = [n for n in g.graph.nodes if n.target == _Q.quantize_per_tensor.default]
    assert len(quantize) == 69 and all(tuple(n.args[3:5]) == (0, 63) for n in quantize)
    clamps = [n for n in g.graph.nodes if n.target == torch.ops.aten.clamp.default]
    assert len(clamps) == 69 and all(n.users.keys() <= set(quantize) for n in clamps)
    for n in g.graph.nodes:
        if n.target == _Q.dequantize_per_channel.default:
            codes = getattr(g, n.args[0].target)
            assert int(codes.min()) >= -32 and int(codes.max()) <= 31 and tuple(n.args[4:6]) == (-32, 31)
    # The clamps change nothing where the quantisation honours its range (the eager graph):
    # bit-equal with and without them (same kernels, same shapes).
    bare = copy.deepcopy(g)
    for c in [n for n in bare.graph.nodes if n.target == torch.ops.aten.clamp.default]:
        c.replace_all_uses_with(c.args[0])
        bare.graph.erase_node(c)
    bare.recompile()
    with torch.no_grad():
        eager = g(x)
        assert torch.equal(bare(x), eager)
        ref = vit_t.image_encoder(x)
        sim = q.image_encoder(x)
    y, text = _compiled_code(enc, x)
    assert _kernel_counts(text) == (40, 29)
    # Contract: the compiled int8 code computes the eager quantised graph up to rounding flips
    # (the int8 kernels' products differ from float ones in the last bits, and a value that moves
    # across a half step moves a whole 6-bit step; measured cosine 0.994, 0.9995 at 8 bits; the
    # clamps themselves are checked exactly in test_narrow_range_clamps_hold_in_compiled_code);
    # 6-bit agreement with fp32 >= 0.99 (measured 0.994) and with the simulated w6a6 model
    # >= 0.98 (measured 0.989 with this short search; it also quantises the attention products).
    assert _cos(y, eager) >= 0.99, _cos(y, eager)
    assert _cos(y, ref) >= 0.99 and _cos(y, sim) >= 0.98, (_cos(y, ref), _cos(y, sim))


def _tiny_int8_graph(clamp: bool):
    """linear -> ReLU -> linear quantised with 6-bit codes; the second linear's input range
    ([-0.32, 0.31], codes 0..63) is far narrower than the first linear's outputs, so most of
    them must saturate at code 63."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    x = torch.randn(256, 64)
    graph = fixed_int8_graph(model, x, lambda w: (w.abs().amax(1) / 31, -32, 31), (0.01, 32, 0, 63))
    count = _clamp_narrow_ranges(graph) if clamp else 0
    return graph, x, count


@pytest.mark.parametrize("clamp", [True, False])
def test_narrow_range_clamps_hold_in_compiled_code(clamp):
    """Inductor fuses an activation's quantisation into the int8 linear that produces it and
    saturates at uint8's [0, 255], not at the 6-bit range; with ``_clamp_narrow_ranges`` the
    compiled code computes what the quantised graph says (eager: codes clamped to 0..63). The
    unclamped case is kept as the check that the test can fail: it shows the saturation."""
    import torch._inductor.config as inductor_config

    graph, x, count = _tiny_int8_graph(clamp)
    with torch.no_grad():
        eager = graph(x)
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(graph)(x)
    err = float((compiled - eager).abs().max())
    if clamp:
        assert count == 2  # both linears' inputs
        # Contract: equal up to float32 rounding of the dequantised sums (measured 6e-8; one
        # 6-bit step of the output is 0.01 * |w| scale, far above).
        assert err <= 1e-5, err
    else:
        assert err >= 1e-2, err  # measured 0.078: codes above 63 survived


def test_optimize_int8_after_w8a8_on_a_vit(tmp_path):
    """The public path on a ViT (small_sam): mode 'w8a8' (simulated, for accuracy), then mode
    'int8' on the same model runs those scales; the refusals say what to do."""
    sd = perturbed_state_dict(small_sam("sam_drop_in").state_dict(), seed=1)

    def model():
        m = small_sam("sam_drop_in")
        m.load_state_dict(sd)
        return m

    coffee = load_image("coffee.jpg")
    ref = SamPredictor(model())
    ref_masks = predict_quality_masks(ref, coffee)
    calib = [load_image("astronaut.jpg")]
    q = optimize(model(), "w8a8", calibration=calib)
    for kwargs, match in (({"calibration": calib}, "already quantised"), ({"int8_runtime": "onnxruntime"}, "quantises a float encoder")):
        with pytest.raises(ValueError, match=match):
            optimize(q, "int8", **kwargs)
    unmarked = model()  # as loaded from a quantised file: not marked as optimised
    unmarked.image_encoder = copy.deepcopy(q.image_encoder)
    with pytest.raises(ValueError, match="needs a float model"):
        optimize(unmarked, "bf16")
    sim_masks = predict_quality_masks(SamPredictor(q), coffee)
    assert optimize(q, "int8") is q
    assert isinstance(q.image_encoder, Pt2eImageEncoder) and q.image_encoder.quantized.startswith("w8a8-pt2e-x86-inductor")
    pred = SamPredictor(q)
    masks = predict_quality_masks(pred, coffee)
    cos = _cos(pred.get_image_embedding(), ref.get_image_embedding())
    # Contract as for the calibrated int8 route: cosine >= 0.995, mean mask IoU >= 0.93 to fp32;
    # and close to the simulated model whose scales it runs (IoU >= 0.93).
    assert cos >= 0.995, cos
    assert mean_iou(ref_masks, masks) >= 0.93 and mean_iou(sim_masks, masks) >= 0.93
    with pytest.raises(ValueError, match="already optimised"):
        optimize(q, "bf16")


def test_negative_weight_scales_compile_to_their_eager_result():
    """A Q-TinySAM conversion folds BatchNorm gammas into the convolutions' per-channel scales,
    so a scale can be negative (QTinySAM.apply_to); the int8 route fixes those scales in its
    observers. oneDNN's int8 convolution must then compute what the quantised graph says:
    two convolutions with every other output channel's weight scale negated, compiled against
    eager."""
    import torch._inductor.config as inductor_config

    def signed(w):
        scale = w.flatten(1).abs().amax(1) / 127
        scale[::2] *= -1
        return scale, -128, 127

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(1, 16, 20, 20)
    # 8-bit activations, or 7-bit where the CPU's int8 products saturate (as the int8 routes do).
    act = (0.04, 64, 0, 127) if int8_products_saturate() else (0.02, 128, 0, 255)
    graph = fixed_int8_graph(model, x, signed, act)
    _clamp_narrow_ranges(graph)
    with torch.no_grad():
        eager, ref = graph(x), model(x)
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(graph)(x)
    # Contract: compiled = eager to float32 rounding (measured 1.8e-7 of 1.6); eager is the
    # float model up to 8-bit rounding (measured 0.11: a negative scale flips codes' signs,
    # so a sign error would show as errors of the outputs' own size).
    assert float((compiled - eager).abs().max()) <= 1e-4
    assert float((eager - ref).abs().max()) <= 0.3 * float(ref.abs().max())


def test_refusals_name_what_to_do(vit_t):
    """pt2e_int8_encoder's own checks, before any export: images with a quantised encoder, a
    recipe that left a layer group float (its int8 scales would be guesses), an encoder not yet
    calibrated, a float model without images."""
    from sam_drop_in._errors import InputError
    from sam_drop_in.quantization.tinyvit import QuantizedTinyViT

    calibrated = _quantised(vit_t, dataclasses.replace(Q.W8A8, layers=("conv",)))
    with pytest.raises(InputError, match="without calibration images"):
        pt2e_int8_encoder(calibrated, [data.rocket()], warm_up=False)
    with pytest.raises(InputError, match=r"leaves the \['linear'\] layers float"):
        pt2e_int8_encoder(calibrated, warm_up=False)
    raw = copy.deepcopy(vit_t)
    raw.image_encoder = QuantizedTinyViT(vit_t.image_encoder, Q.W8A8)
    with pytest.raises(InputError, match="not calibrated yet"):
        pt2e_int8_encoder(raw, warm_up=False)
    with pytest.raises(InputError, match="needs calibration images for a float model"):
        pt2e_int8_encoder(vit_t, warm_up=False)
