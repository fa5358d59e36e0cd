"""The safe Q-TinySAM reader (sam_drop_in.quantization.qtinysam) on files built here.

TinySAM's released Q-TinySAM file is ``torch.save`` of a whole model object. The test builds one
the same way: classes with TinySAM's module paths and names (``tinysam.modeling.*`` and
``tinysam.quantization_layer.layers.InferQuant*``, registered as fake modules in sys.modules),
holding a small vit_t model's weights and made-up quantisation intervals, pickled with
torch.save. The reader must give back exactly those weights and intervals without importing or
running anything from the file, and refuse what is not on its allow-list.
"""

import os
import sys
import types

import pytest
import torch
from torch import nn

from sam_drop_in._errors import CheckpointError, UnsafeCheckpointError
from sam_drop_in.build_sam import build_sam_sized
from sam_drop_in.quantization.qtinysam import read_qtinysam
from sam_drop_in.testing import perturbed_state_dict

# Our module (by file) -> TinySAM's module of the same classes.
_TINYSAM_MODULE = {"tiny_vit": "tinysam.modeling.tiny_vit_sam", "sam": "tinysam.modeling.sam",
                   "prompt_encoder": "tinysam.modeling.prompt_encoder", "mask_decoder": "tinysam.modeling.mask_decoder",
                   "transformer": "tinysam.modeling.transformer", "common": "tinysam.modeling.common"}
LAYERS = "tinysam.quantization_layer.layers"


class _Fakes:
    """Fake modules in sys.modules and classes in them, created on demand."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch
        self.mods = {}

    def cls(self, module, name):
        if module not in self.mods:
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in self.mods:
                    self.mods[sub] = types.ModuleType(sub)
                    self.mp.setitem(sys.modules, sub, self.mods[sub])
        mod = self.mods[module]
        if not hasattr(mod, name):
            setattr(mod, name, type(name, (nn.Module,), {"__module__": module, "__qualname__": name}))
        return getattr(mod, name)


def _quant_leaf(fakes, leaf, name, intervals, path):
    """A TinySAM quantised layer standing for ``leaf`` (nn.Linear / Conv2d / ConvTranspose2d)."""
    cls = fakes.cls(LAYERS, name)
    q = cls()
    q.weight, q.bias = leaf.weight, leaf.bias
    q.w_bit, q.a_bit, q.mode = 8, 8, "quant_forward"
    g = torch.Generator().manual_seed(len(intervals))
    out = leaf.weight.shape[0]
    bufs = {"w_interval": torch.rand(out, 1, 1, 1, generator=g) * 0.01, "a_interval": torch.rand(1, generator=g)}
    if name in ("InferQuantLinear", "InferQuantLinearPost"):
        bufs["w_interval"] = bufs["w_interval"].view(out, 1, 1, 1)
        bufs.update(n_V=torch.tensor(out, dtype=torch.int32), n_H=torch.tensor(1, dtype=torch.int32),
                    n_a=torch.tensor(1, dtype=torch.int32))
    if name == "InferQuantLinearPost":
        bufs["a_neg_interval"] = torch.tensor(0.16997124254703522 / 128)
    if name in ("InferQuantConv2d", "InferQuantConvTranspose2d"):
        bufs["a_bias"] = torch.randn(1, generator=g)
    for k, v in bufs.items():
        q.register_buffer(k, v)
    intervals[path] = {"class": name, **bufs}
    return q


def _matmul(fakes, name, intervals, path):
    m = fakes.cls(LAYERS, name)()
    m.A_bit, m.B_bit, m.mode = 8, 8, "quant_forward"
    bufs = {"A_interval": torch.full((1, 2, 1, 1, 1, 1, 1), 0.05), "B_interval": torch.full((1, 2, 1, 1, 1, 1, 1), 0.07),
            "n_G_A": torch.tensor(2, dtype=torch.int32)}
    if name == "InferQuantMatMulPost":
        bufs["split"] = torch.tensor(0.01)
    for k, v in bufs.items():
        m.register_buffer(k, v)
    intervals[path] = {"class": name, **bufs}
    return m


def _tinysam_like(fakes, m, path="", intervals=None):
    """A copy of our module tree ``m`` made of TinySAM-named classes; the image encoder's and the
    decoder upscaling's layers become TinySAM's quantised layers (recorded in ``intervals``)."""
    in_encoder = path.startswith("image_encoder.")
    if isinstance(m, nn.Linear) and in_encoder:
        return _quant_leaf(fakes, m, "InferQuantLinearPost" if path.endswith("fc2.") else "InferQuantLinear",
                           intervals, path[:-1])
    if isinstance(m, nn.Conv2d) and in_encoder:
        return _quant_leaf(fakes, m, "InferQuantConv2d", intervals, path[:-1])
    if isinstance(m, nn.ConvTranspose2d):
        return _quant_leaf(fakes, m, "InferQuantConvTranspose2d", intervals, path[:-1])
    owner = type(m).__module__
    if owner.startswith("torch.nn") and not m._modules:
        return m  # a plain torch layer (LayerNorm, GELU, BatchNorm2d, Embedding...), pickled as itself
    if owner.startswith("torch.nn"):
        new = type(m)() if isinstance(m, (nn.Sequential, nn.ModuleList)) else None
    else:
        new = fakes.cls(_TINYSAM_MODULE[owner.rsplit(".", 1)[1]], type(m).__name__)()
    if new is None:
        raise AssertionError(f"unexpected container {type(m)}")
    for name, p in m._parameters.items():
        new.register_parameter(name, p)
    for name, b in m._buffers.items():
        new.register_buffer(name, b, persistent=name not in m._non_persistent_buffers_set)
    for name, child in m._modules.items():
        new.add_module(name, _tinysam_like(fakes, child, f"{path}{name}.", intervals))
    if type(m).__name__ == "Attention" and owner.endswith("tiny_vit"):
        # TinySAM's quantised TinyViT attention computes q @ k^T and attn @ v through modules.
        new.add_module("matmul1", _matmul(fakes, "InferQuantMatMul", intervals, path + "matmul1"))
        new.add_module("matmul2", _matmul(fakes, "InferQuantMatMulPost", intervals, path + "matmul2"))
        new.ab = torch.zeros(2, 3)  # an eval-mode cache attribute: a plain tensor, not a weight
        new.num_heads = m.num_heads
    return new


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    sam = build_sam_sized("vit_t", image_size=256).eval()
    sam.load_state_dict(perturbed_state_dict(sam.state_dict(), seed=5))
    return sam


@pytest.fixture
def released(model, tmp_path, monkeypatch):
    fakes = _Fakes(monkeypatch)
    intervals = {}
    obj = _tinysam_like(fakes, model, "", intervals)
    path = tmp_path / "tinysam_w8a8.pth"
    torch.save(obj, path)
    return path, intervals, fakes


def test_reads_weights_and_intervals_without_tinysam(model, released, monkeypatch):
    path, intervals, fakes = released
    # The reader must not need (or import) TinySAM: remove the fake modules before reading.
    for name in fakes.mods:
        monkeypatch.delitem(sys.modules, name)
    q = read_qtinysam(path)
    assert not any(name.startswith("tinysam") for name in sys.modules)
    # Contract: the float weights come back exactly, under segment_anything's keys (the
    # non-persistent attention_bias_idxs and the eval cache `ab` left out, as state_dict does).
    want = model.state_dict()
    assert q.state_dict.keys() == want.keys()
    assert all(torch.equal(q.state_dict[k], want[k]) for k in want)
    # Every quantised layer's released buffers, verbatim, with its class and bits.
    assert q.intervals.keys() == intervals.keys()
    for p, rec in intervals.items():
        got = q.intervals[p]
        assert got["class"] == rec["class"]
        for k, v in rec.items():
            if k != "class":
                assert torch.equal(got[k], v), (p, k)
        assert (got.get("w_bit", got.get("A_bit")), got.get("a_bit", got.get("B_bit"))) == (8, 8)
    fc2 = "image_encoder.layers.1.blocks.0.mlp.fc2"
    assert q.intervals[fc2]["class"] == "InferQuantLinearPost" and "a_neg_interval" in q.intervals[fc2]
    assert q.intervals["image_encoder.layers.1.blocks.0.attn.matmul2"]["class"] == "InferQuantMatMulPost"
    assert q.intervals["mask_decoder.output_upscaling.0"]["class"] == "InferQuantConvTranspose2d"
    assert q.recipe_name() == "w8a8"
    # The weights load into our vit_t model strictly.
    fresh = build_sam_sized("vit_t", image_size=256)
    q.load_into(fresh)
    assert all(torch.equal(fresh.state_dict()[k], want[k]) for k in want)
    meta = q.metadata()
    assert meta["converted_from"] == "Q-TinySAM tinysam_w8a8.pth" and fc2 in meta["qtinysam_intervals"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"asks for (posix|os|nt)\.system.*Nothing from the file was executed"):
        read_qtinysam(path)
    assert not marker.exists()


def test_class_outside_the_allow_list_is_named(model, tmp_path, monkeypatch):
    fakes = _Fakes(monkeypatch)
    root = fakes.cls("tinysam.modeling.sam", "Sam")()
    root.add_module("extra", fakes.cls("mypackage.layers", "CustomLayer")())
    path = tmp_path / "custom.pth"
    torch.save(root, path)
    with pytest.raises(UnsafeCheckpointError, match=r"mypackage\.layers\.CustomLayer.*safetensors\.torch\.save_file"):
        read_qtinysam(path)


class _CallsAllowedClass:
    def __reduce__(self):
        return (sys.modules["tinysam.modeling.sam"].Sam, ("arg",))


def test_calling_an_allowed_class_is_refused(tmp_path, monkeypatch):
    # A class on the allow-list is only ever a record; a pickle that calls it (REDUCE) is refused.
    _Fakes(monkeypatch).cls("tinysam.modeling.sam", "Sam")
    torch.save(_CallsAllowedClass(), tmp_path / "call.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"calls tinysam\.modeling\.sam\.Sam\(\.\.\.\)"):
        read_qtinysam(tmp_path / "call.pth")


def test_not_a_model_or_damaged(released, tmp_path):
    path, _, fakes = released
    loop = fakes.cls("tinysam.modeling.sam", "Sam")()
    loop.add_module("again", loop)
    torch.save(loop, tmp_path / "loop.pth")
    with pytest.raises(CheckpointError, match="appears twice in the module tree"):
        read_qtinysam(tmp_path / "loop.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint|truncated or corrupt"):
        read_qtinysam(cut)
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pth")
    with pytest.raises(CheckpointError, match="does not hold a pickled TinySAM model"):
        read_qtinysam(tmp_path / "sd.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_qtinysam(tmp_path / "nope.pth")


def test_quantize_command_from_qtinysam(model, released, tmp_path, capsys):
    # sam-drop-in quantize --from-qtinysam: the exact float weights, our calibration (bits from
    # the released layers: w8a8) overwritten by the released parameters our format expresses,
    # the released intervals kept in the file's metadata.
    import json

    from PIL import Image
    from skimage import data

    from sam_drop_in import cli, quantization as Q, sam_model_registry
    from sam_drop_in.quantization.io import read_metadata

    path, intervals, _ = released
    Image.fromarray(data.rocket()[::8, ::8]).save(tmp_path / "calib.png")
    out = tmp_path / "q.safetensors"
    code = cli.main(["quantize", "--from-qtinysam", str(path), "--calib", str(tmp_path / "calib.png"),
                     "--search-rows", "32", "--output", str(out), "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    qsam = sam_model_registry["vit_t"](checkpoint=str(out))
    assert isinstance(qsam.image_encoder, Q.QuantizedTinyViT) and qsam.image_encoder.recipe.name == "w8a8"
    want = model.mask_decoder.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in qsam.mask_decoder.state_dict().items())
    meta = read_metadata(out)
    assert meta["converted_from"] == "Q-TinySAM tinysam_w8a8.pth"
    kept = json.loads(meta["qtinysam_intervals"])
    fc2 = "image_encoder.layers.1.blocks.0.mlp.fc2"
    assert kept[fc2]["a_interval"] == intervals[fc2]["a_interval"].tolist()
    # The released parameters our format expresses are in the file (QTinySAM.apply_to; their
    # exactness is tested above): fc2's twin ranges, and what was applied where.
    applied = json.loads(meta["qtinysam_applied"])
    assert applied[fc2] == "applied: weights, input (twin uniform)"
    quant = dict(qsam.image_encoder.body.named_modules())["layers.1.blocks.0.mlp.fc2"].input_quant
    assert float(quant.scale) == float(intervals[fc2]["a_interval"]) and float(quant.fine_scale) == float(intervals[fc2]["a_neg_interval"])
    # The command refuses an unsafe file (status 2, the global named, nothing run) and a
    # conflicting --checkpoint.
    marker = tmp_path / "ran"
    torch.save(_RunsCode(marker), tmp_path / "evil.pth")
    assert cli.main(["quantize", "--from-qtinysam", str(tmp_path / "evil.pth"), "--calib", str(tmp_path / "calib.png"),
                     "--output", str(tmp_path / "e.safetensors")]) == 2
    assert "system, which is not on the Q-TinySAM reader's allow-list" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "e.safetensors").exists()
    assert cli.main(["quantize", "--from-qtinysam", str(path), "--checkpoint", "x", "--calib", str(tmp_path),
                     "--output", str(out)]) == 2
    assert "give one" in capsys.readouterr().err


def _tinysam_weight(w, rec):
    """TinySAM's linear weight quantisation (layers.py, InferQuantLinear.quant_weight_bias),
    written out here as the reference: codes per (row block x column block), symmetric."""
    qmax = 2 ** (int(rec.get("w_bit", 8)) - 1)
    n_v, n_h = int(rec["n_V"]), int(rec["n_H"])
    blocks = w.view(n_v, w.shape[0] // n_v, n_h, w.shape[1] // n_h)
    return ((blocks / rec["w_interval"]).round().clamp(-qmax, qmax - 1) * rec["w_interval"]).view_as(w)


def _tinysam_input(x, rec):
    """TinySAM's linear input quantisation (InferQuantLinear / InferQuantLinearPost.quant_input)
    for one chunk (n_a = 1)."""
    qmax = 2 ** (int(rec.get("a_bit", 8)) - 1)
    a = rec["a_interval"]
    if rec["class"] == "InferQuantLinear":
        return (x / a).round().clamp(-qmax, qmax - 1) * a
    neg = rec["a_neg_interval"]
    return (x / a).round().clamp(0, qmax - 1) * a + (x / neg).round().clamp(-qmax, 0) * neg


def test_released_parameters_applied_exactly(model, released):
    """QTinySAM.apply_to carries the released parameters our format expresses onto a calibrated
    encoder: each linear then computes exactly TinySAM's quantised linear (its formulas from
    layers.py, written out above), the convolutions hold TinySAM's weight codes with the
    BatchNorm folded into the scales, and the attention products' q, k, v take the released
    intervals; what our format cannot express keeps its calibration and says why."""
    import copy
    import dataclasses

    import torch.nn.functional as F
    from skimage import data

    import sam_drop_in.quantization as Q

    path, intervals, _ = released
    rel = read_qtinysam(path)
    fast = dataclasses.replace(Q.W8A8, max_search_rows=64, weight_search=(1.0,), act_search=(1.0,), softmax_fine_shifts=(0,))
    qenc = Q.calibrate(copy.deepcopy(model), [data.rocket()[::8, ::8]], fast)
    report = rel.apply_to(qenc)
    assert set(report) == set(intervals)
    body = dict(qenc.body.named_modules())
    g = torch.Generator().manual_seed(0)
    linears = [p for p, r in intervals.items() if r["class"] in ("InferQuantLinear", "InferQuantLinearPost")
               and p != "image_encoder.head"]
    assert len(linears) == 40
    assert report["image_encoder.head"].startswith("not applied: our encoder has no quantised layer at head")
    for p in linears:
        rec = {**intervals[p], "w_bit": 8, "a_bit": 8}
        assert report[p] in ("applied: weights, input", "applied: weights, input (twin uniform)"), (p, report[p])
        w, b = rel.state_dict[p + ".weight"], rel.state_dict.get(p + ".bias")
        x = torch.randn(2, 5, w.shape[1], generator=g) * 2
        if rec["class"] == "InferQuantLinearPost":
            # Post-GELU inputs, kept off GELU's minimum: within half a step of it TinySAM's
            # negative code -128 exists and ours stops at -127 (documented in apply_to).
            x = F.gelu(x).clamp_min(-0.169)
        with torch.no_grad():
            got = body[p[len("image_encoder."):]](x)
        # Contract: bit-equal (the same divisions, roundings, clamps and products; one F.linear).
        assert torch.equal(got, F.linear(_tinysam_input(x, rec), _tinysam_weight(w, rec), b)), p
    convs = [p for p, r in intervals.items() if r["class"] == "InferQuantConv2d"]
    assert len(convs) == 29
    for p in convs:
        assert report[p].startswith("applied: weights (input calibrated"), (p, report[p])
        owner = p[len("image_encoder."):].removesuffix(".c")
        layer = body[owner]
        w, s = rel.state_dict[p + ".weight"], intervals[p]["w_interval"].flatten()
        codes = (w / s.view(-1, 1, 1, 1)).round().clamp(-128, 127)  # TinySAM's InferQuantConv2d
        if p.endswith(".c"):  # BatchNorm folded: codes x scale x gamma / sqrt(var + eps)
            gamma, var = (rel.state_dict[f"image_encoder.{owner}.bn.{k}"] for k in ("weight", "running_var"))
            want = codes * (s * gamma / torch.sqrt(var + 1e-5)).view(-1, 1, 1, 1)
            # Contract: TinySAM's dequantised weight with the BatchNorm folded, to float32
            # rounding of the products (same codes; one extra rounding of the scale).
            assert torch.allclose(layer.weight(), want, rtol=1e-6, atol=0), p
            assert torch.equal(layer.weight_int.float(), codes)  # the codes themselves: TinySAM's
        else:
            assert torch.equal(layer.weight_int.float(), codes) and torch.equal(layer.weight_scale, s)
    for p, r in intervals.items():
        if r["class"].startswith("InferQuantMatMul"):
            attn = body[p[len("image_encoder."):].rpartition(".")[0]]
            pairs = ([(attn.q_quant, 0.05), (attn.k_quant, 0.07)] if r["class"] == "InferQuantMatMul"
                     else [(attn.v_quant, 0.07)])
            for quant, step in pairs:
                assert float(quant.scale) == pytest.approx(step) and int(quant.zero_point) == 128
    outside = [p for p in intervals if not p.startswith("image_encoder.")]
    assert outside and all(report[p].startswith("not applied: outside the image encoder") for p in outside)
    # A record our format cannot express is reported and leaves the calibration alone.
    fc1 = "image_encoder.layers.1.blocks.0.mlp.fc1"
    before = body["layers.1.blocks.0.mlp.fc1"].weight_scale.clone()
    rel.intervals = {fc1: {**intervals[fc1], "n_H": torch.tensor(2), "a_interval": torch.tensor([0.1, 0.2])}}
    assert rel.apply_to(qenc) == {fc1: "not applied: not expressible in our format"}
    assert torch.equal(body["layers.1.blocks.0.mlp.fc1"].weight_scale, before)
