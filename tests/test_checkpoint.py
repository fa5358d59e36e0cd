"""Local checkpoint loading: formats, containers, layouts, unsafe pickles, conversion."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from sam_drop_in import checkpoint as ck
from sam_drop_in import _layouts, _manifest


@pytest.fixture(scope="module")
def mobile():
    """A random-weight mobile_sam vit_t model (the reference) and its state dict."""
    mobile_sam = pytest.importorskip("mobile_sam")
    torch.manual_seed(0)
    model = mobile_sam.sam_model_registry["vit_t"]()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mobile_pt(mobile, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "mobile_sam.pt"
    torch.save(mobile[1], path)  # what MobileSAM ships: a plain pickled state dict
    return path


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_pickle_containers_and_prefixes(mobile, tmp_path):
    sd = mobile[1]
    assert len(sd) == 439
    _equal(ck.load_state_dict(_save(tmp_path / "a.pt", sd), "vit_t"), sd)
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    _equal(ck.load_state_dict(str(_save(tmp_path / "b.pth", wrapped)), "vit_t"), sd)
    compiled = {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}
    _equal(ck.load_state_dict(_save(tmp_path / "c.bin", compiled), "vit_t"), sd)


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_mobile_sam_roundtrip_through_convert(mobile, mobile_pt, tmp_path):
    """mobile_sam-saved .pt -> convert -> safetensors -> load: same tensors, same outputs."""
    model, sd = mobile
    out = ck.convert(mobile_pt, tmp_path / "out")
    assert out == tmp_path / "out" / "model.safetensors"
    loaded = ck.load_state_dict(out, "vit_t")
    _equal(loaded, sd)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "vit_t" and cfg["weights"] == "model.safetensors"
    assert cfg["source_sha256"] == ck._sha256_file(str(mobile_pt))
    assert cfg["weights_sha256"] == ck._sha256_file(str(out))
    assert cfg["num_params"] == sum(p.numel() for p in model.parameters()) == 10_130_092
    assert "vit_t" in (tmp_path / "out" / "README.md").read_text()
    # The folder itself is also a valid source (config.json next to model.safetensors).
    _equal(ck.load_state_dict(tmp_path / "out", "vit_t"), sd)
    info = ck.inspect_checkpoint(out)
    assert (info["model_type"], info["layout"], info["format"], info["num_params"]) == (
        "vit_t", "segment_anything", "safetensors", 10_130_092)
    assert info["sha256"] == cfg["weights_sha256"]

    # Outputs: the reference model loaded from the converted file equals the original.
    import mobile_sam

    other = mobile_sam.sam_model_registry["vit_t"]()
    ck.load_into(other, out, "vit_t")
    other.eval()  # mobile_sam's attention-bias cache is rebuilt on a mode change
    model.eval()
    image = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        emb = model.image_encoder(image)
        assert torch.equal(emb, other.image_encoder(image))
        points = (torch.tensor([[[500.0, 375.0]]]), torch.tensor([[1]]))
        outs = []
        for m in (model, other):
            sparse, dense = m.prompt_encoder(points=points, boxes=None, masks=None)
            outs.append(m.mask_decoder(image_embeddings=emb, image_pe=m.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=True))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_convert_is_atomic(mobile_pt, tmp_path, monkeypatch):
    import safetensors.torch as st

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(st, "save_file", broken_save)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ck.convert(mobile_pt, dst)
    assert list(dst.iterdir()) == []  # neither the weights nor a temp file was left behind


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create the marker file.
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.load_state_dict(path, "vit_t")
    assert "safetensors" in str(info.value) and "Nothing from it was executed" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    # Also a classic (non-zip) pickle stream.
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    with pytest.raises(ck.UnsafeCheckpointError):
        ck.inspect_checkpoint(legacy)
    assert not marker.exists()


def test_wrong_model_type_and_bad_files(mobile, tmp_path):
    sd = mobile[1]
    path = _save(tmp_path / "m.pt", sd)
    with pytest.raises(ck.CheckpointError, match=r"this is a vit_t checkpoint.*sam_model_registry\['vit_t'\]"):
        ck.load_state_dict(path, "vit_b")
    with pytest.raises(ck.CheckpointNotFoundError) as info:
        ck.load_state_dict(tmp_path / "nope.pth", "vit_t")
    assert isinstance(info.value, FileNotFoundError) and "nope.pth" in str(info.value)
    # A safetensors file cut short.
    from safetensors.torch import save_file

    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    data = st.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="cut.safetensors.*truncated or corrupt"):
        ck.load_state_dict(cut, "vit_t")
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ck.CheckpointError, match="cut.pt.*truncated"):
        ck.load_state_dict(cut_pt, "vit_t")
    # Encoder only (as distillation scripts save it).
    enc = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    with pytest.raises(ck.CheckpointError, match="only an image encoder"):
        ck.load_state_dict(_save(tmp_path / "enc.pt", enc), "vit_t")
    # Not SAM at all.
    with pytest.raises(ck.CheckpointError, match="not a Segment Anything checkpoint"):
        ck.load_state_dict(_save(tmp_path / "lin.pt", torch.nn.Linear(2, 2).state_dict()))


def test_load_into_names_keys(mobile, tmp_path):
    model, sd = mobile
    partial = dict(sd)
    partial.pop("mask_decoder.iou_token.weight")
    partial["mask_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_into(model, partial)
    msg = str(info.value)
    assert "mask_decoder.iou_token.weight" in msg and "mask_decoder.extra.weight" in msg and "vit_t" in msg


def test_vit_detection_matches_segment_anything():
    """Model-type detection against segment_anything's own builders (meta device: no memory)."""
    sa = pytest.importorskip("segment_anything")
    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            sd = sa.sam_model_registry[name]().state_dict()
        assert _layouts.detect_layout(sd) == "segment_anything"
        assert _layouts.detect_model_type(sd) == name


def test_manifest_and_weights_readme():
    for mt in ("vit_h", "vit_l", "vit_b", "vit_t"):
        address = _manifest.default_checkpoint(mt)
        assert address.startswith("hf://")
        assert sum(e["default"] for e in _manifest.entries(mt)) == 1
    assert _manifest.default_checkpoint("default") == _manifest.default_checkpoint("vit_h")
    with pytest.raises(ValueError):
        _manifest.default_checkpoint("vit_x")
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "weights", "README.md")
    with open(readme, encoding="utf-8") as f:
        assert _manifest.render_markdown() in f.read(), "weights/README.md is stale: re-render the table"


def test_unknown_source_types(tmp_path):
    with pytest.raises(ck.CheckpointError, match="must be a path"):
        ck.load_state_dict(123, "vit_t")
    with pytest.raises(ck.CheckpointError, match="web URL"):
        ck.load_state_dict("https://example.com/sam.pth", "vit_t")
    with pytest.raises(ck.CheckpointError, match="malformed Hub address"):
        ck.load_state_dict("hf://justone", "vit_t")
