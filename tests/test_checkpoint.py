"""Local checkpoint loading: formats, containers, layouts, unsafe pickles, conversion."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from sam_drop_in import checkpoint as ck
from sam_drop_in import _layouts, _manifest
from sam_drop_in._fileio import sha256_file


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
    assert cfg["source_sha256"] == sha256_file(mobile_pt)
    assert cfg["weights_sha256"] == sha256_file(out)
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


# --- hf:// addresses: every malformed one is a CheckpointError that says what is wrong -----------

MALFORMED_ADDRESSES = [
    ("hf://", "names no OWNER/REPO"),
    ("hf://a", "names no OWNER/REPO"),
    ("hf://a/", "names no OWNER/REPO"),
    ("hf://models", "names no OWNER/REPO"),
    ("hf://models/a", "no OWNER/REPO after 'models/'"),
    ("hf://../../etc/passwd", "owner name '..' contains '--' or '..'"),
    ("hf://a/../etc/passwd", "repo name '..'"),
    ("hf://a/b/../../f.pt", "'.' or '..' part"),
    ("hf://a/b/./f.pt", "'.' or '..' part"),
    ("hf://a/b@", "revision after '@' is empty"),
    ("hf://a/b@@x/f", "revision '@x' contains '@'"),
    ("hf://a@v/b/f", "belongs after the repo name"),
    ("hf://a b/c/f.pt", "owner name 'a b' contains ' '"),
    ("hf://a/b c/f.pt", "repo name 'b c' contains ' '"),
    ("hf://a/b@v 1/f.pt", "revision 'v 1' contains ' '"),
    ("hf://a\\b/f.pt", "backslash"),
    ("hf://a/b/..\\..\\f.pt", "backslash"),
    ("hf://a//b/f.pt", "empty part"),
    ("hf:///a/b", "empty part"),
    ("hf://a/b//f.pt", "empty part"),
    ("hf://-a/b", "starts or ends with '-' or '.'"),
    ("hf://a/b.", "starts or ends with '-' or '.'"),
    ("hf://a--x/b", "contains '--' or '..'"),
    ("hf://a/b.git", "ends with '.git'"),
    ("hf://a/" + "x" * 97, "97 characters long"),
    ("hf://caf\u00e9/b", "only letters, digits"),
    ("hf://a/b@..%2F..%2Fx/f.pt", "not a valid branch, tag or commit name"),
    ("hf://a/b@v~1/f", "revision 'v~1' contains '~'"),
    ("hf://a/b/f.pt\n", "whitespace"),
    (" hf://a/b/f.pt"[1:] + " ", "whitespace"),
    ("hf://a/b\x00/f", "control character"),
    ("hf://datasets/a/b/f", "names a dataset repo"),
    ("hf://spaces/a/b", "names a space repo"),
]


@pytest.mark.parametrize("address,why", MALFORMED_ADDRESSES)
def test_malformed_hub_address_is_a_checkpoint_error(address, why, monkeypatch):
    import huggingface_hub

    def no_request(*args, **kwargs):
        raise AssertionError(f"huggingface_hub was called for the malformed address {address!r}")

    # Malformed addresses are refused before huggingface_hub is asked anything (cache included).
    for name in ("hf_hub_download", "try_to_load_from_cache", "HfApi"):
        monkeypatch.setattr(huggingface_hub, name, no_request)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_state_dict(address, "vit_t")
    assert type(info.value) is ck.CheckpointError  # neither huggingface_hub's error nor "not found"
    msg = str(info.value)
    assert why in msg, msg
    assert repr(address) in msg, msg


# --- corrupt files are "not a valid checkpoint"; only a refused global is "unsafe" --------------

def _corrupt_files(tmp_path, sd) -> dict:
    from safetensors.torch import save

    small = {k: v for k, v in list(sd.items())[:20]}
    pt = tmp_path / "ok.pt"
    torch.save(small, pt)
    zipped = pt.read_bytes()
    st = save({k: v.contiguous() for k, v in small.items()})
    rng = torch.Generator().manual_seed(0)
    return {
        "x.pt": b"x",
        "empty.pt": b"",
        "random.pt": torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).numpy().tobytes(),
        "zip_cut.pt": zipped[: len(zipped) // 2],
        "zip_head.pt": zipped[:100],
        "st_cut5.safetensors": st[:5],
        "st_cut_header.safetensors": st[:40],
        "st_cut_data.safetensors": st[:-7],
        "text.pth": b"this is not a checkpoint\n" * 10,
        "pickle_cut.pkl": pickle.dumps({"w": 1.0, "v": [1, 2, 3]})[:-4],
    }


def test_corrupt_file_is_not_reported_as_unsafe(mobile, tmp_path):
    for name, data in _corrupt_files(tmp_path, mobile[1]).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ck.CheckpointError) as info:
            ck.load_state_dict(path, "vit_t")
        assert not isinstance(info.value, ck.UnsafeCheckpointError), (name, str(info.value))
        msg = str(info.value)
        assert name in msg and "not a valid" in msg and ("truncated" in msg or "corrupt" in msg), (name, msg)
        assert "weights_only" not in msg, (name, msg)  # never torch's advice to load unsafely


def test_refused_global_is_unsafe_and_named(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _Evil(str(marker))}, zipped)
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    old = tmp_path / "evil_old.pt"
    torch.save({"w": torch.zeros(2), "payload": _Evil(str(marker))}, old, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy, old):
        with pytest.raises(ck.UnsafeCheckpointError) as info:
            ck.load_state_dict(path, "vit_t")
        msg = str(info.value)
        assert "builtins.open" in msg or "io.open" in msg, msg
        assert "Nothing from it was executed" in msg and "weights_only" not in msg, msg
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no torch advice in the chain
    assert not marker.exists()


# --- convert: whole files only, stale temporaries cleaned, hash checked, same bytes twice ------

def test_convert_twice_gives_identical_bytes_and_normal_permissions(mobile_pt, tmp_path):
    old = os.umask(0o022)
    try:
        outs = [ck.convert(mobile_pt, tmp_path / f"out{i}").parent for i in range(3)]
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "README.md"):
        first = (outs[0] / name).read_bytes()
        for other in outs[1:]:
            assert (other / name).read_bytes() == first, name
        # What open(path, "w") gives under umask 022, not mkstemp's 0600.
        assert (outs[0] / name).stat().st_mode & 0o777 == 0o644, name


_KILL_DURING = r"""
import os, signal, sys
from pathlib import Path
import safetensors.torch as st
from sam_drop_in import checkpoint as ck

stage = sys.argv[3]
if stage == "weights":
    # Half of the weights written to the temporary file, then the process is killed.
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    st.save_file = save_file
else:
    # The weights are in place; killed while the card (before config.json) is written.
    real = Path.write_text
    def write_text(self, *a, **k):
        if self.name.startswith(".README.md."):
            real(self, "partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **k)
    Path.write_text = write_text
ck.convert(sys.argv[1], sys.argv[2])
"""


def _killed_convert(src, dst, stage):
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING, str(src), str(dst), stage], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_killed_convert_leaves_a_consistent_folder(mobile, mobile_pt, tmp_path):
    _, sd = mobile
    dst = tmp_path / "out"
    # A kill mid-weights on a fresh folder: only a temporary file is left ...
    _killed_convert(mobile_pt, dst, "weights")
    assert [p.name for p in dst.iterdir() if p.name.endswith(".tmp")], list(dst.iterdir())
    assert not (dst / "model.safetensors").exists()
    # ... and the next run removes it and completes.
    ck.convert(mobile_pt, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    _equal(ck.load_state_dict(dst, "vit_t"), sd)

    # Overwriting that conversion with other weights, killed after the new weights are in place:
    # the old config.json (with the old hash) is gone, never beside the new weights.
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    other_pt = _save(tmp_path / "other.pt", other)
    _killed_convert(other_pt, dst, "card")
    assert not (dst / "config.json").exists()
    _equal(ck.load_state_dict(dst, "vit_t"), other)
    ck.convert(other_pt, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    _equal(ck.load_state_dict(dst, "vit_t"), other)


def test_weights_sha256_is_checked_on_load(mobile, mobile_pt, tmp_path):
    _, sd = mobile
    a = ck.convert(mobile_pt, tmp_path / "a")
    other = {k: (v * 2 if v.is_floating_point() else v) for k, v in sd.items()}
    b = ck.convert(_save(tmp_path / "other.pt", other), tmp_path / "b")
    # A folder that mixes two conversions (or whose weights were changed afterwards).
    b.replace(a)
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors does not match its config.json.*convert"):
        ck.load_state_dict(tmp_path / "a", "vit_t")
    # The file itself carries no such record; it loads.
    _equal(ck.load_state_dict(a, "vit_t"), other)


# --- weights of the wrong dtype, and NaN/inf weights ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_non_float_weights_are_refused_with_the_key(mobile, tmp_path, dtype):
    model, sd = mobile
    key = "mask_decoder.iou_token.weight"
    bad = dict(sd)
    bad[key] = sd[key].to(dtype)
    path = _save(tmp_path / "bad.pt", bad)
    with pytest.raises(ck.CheckpointError, match=rf"{key} is {dtype}"):
        ck.load_state_dict(path, "vit_t")
    with pytest.raises(ck.CheckpointError, match=rf"{key} is {dtype}"):
        ck.load_into(model, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_unless_allowed(mobile, tmp_path, monkeypatch, value):
    model, sd = mobile
    key = "image_encoder.layers.1.blocks.0.attn.qkv.weight"
    bad = dict(sd)
    bad[key] = sd[key].clone()
    bad[key][0, :3] = value
    path = _save(tmp_path / "nan.pt", bad)
    with pytest.raises(ck.CheckpointError, match=rf"{key} \(3 of \d+ values\).*allow_non_finite=True"):
        ck.load_state_dict(path, "vit_t")
    with pytest.raises(ck.CheckpointError, match=key):
        ck.load_into(model, bad)
    with pytest.raises(ck.CheckpointError, match=key):
        ck.convert(path, tmp_path / "out")
    loaded = ck.load_state_dict(path, "vit_t", allow_non_finite=True)
    assert torch.equal(loaded[key].isfinite(), bad[key].isfinite())
    monkeypatch.setenv("SAM_DROP_IN_ALLOW_NON_FINITE", "1")
    ck.load_state_dict(path, "vit_t")
    monkeypatch.setenv("SAM_DROP_IN_ALLOW_NON_FINITE", "maybe")
    with pytest.raises(ck.CheckpointError, match="SAM_DROP_IN_ALLOW_NON_FINITE"):
        ck.load_state_dict(path, "vit_t")


def test_large_finite_weights_are_accepted(mobile, tmp_path):
    """Finite values whose sum overflows float32 are not mistaken for infinities."""
    _, sd = mobile
    key = "mask_decoder.iou_token.weight"
    big = dict(sd)
    big[key] = torch.full_like(sd[key], 3e38)
    loaded = ck.load_state_dict(_save(tmp_path / "big.pt", big), "vit_t")
    assert torch.equal(loaded[key], big[key])


@pytest.mark.parametrize("where", ["try_to_load_from_cache", "hf_hub_download"])
def test_huggingface_hub_validation_errors_are_wrapped(where, monkeypatch):
    """Should huggingface_hub refuse an address that passes our rules, in the cache lookup or the
    download, the caller still gets a CheckpointError."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    def refuse(*args, **kwargs):
        raise HFValidationError("Repo id must use alphanumeric chars (a rule added later)")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", refuse if where == "try_to_load_from_cache"
                        else (lambda *a, **k: None))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(ck.CheckpointError, match=r"huggingface_hub refused the address of 'f.pt' in repo 'acme/x'"):
        ck.load_state_dict("hf://acme/x/f.pt", "vit_t")
