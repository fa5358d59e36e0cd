"""Reading TinySAM's released Q-TinySAM checkpoint without running any code from it.

The released file (``tinysam_w8a8.pth``) is ``torch.save`` of a whole model object: a pickle
whose globals are TinySAM's module classes (``tinysam.modeling.*``), torch's containers and
layers, and the quantised layers of ``tinysam/quantization_layer/layers.py``
(``InferQuantLinear``, ``InferQuantLinearPost``, ``InferQuantConv2d``,
``InferQuantConvTranspose2d``, ``InferQuantMatMul``, ``InferQuantMatMulPost``). Loading it the
usual way imports TinySAM and executes whatever the pickle names. This reader instead:

- opens the zip archive with ``zipfile`` and reads ``data.pkl`` with an unpickler whose
  ``find_class`` maps an allow-list of names to plain classes of this module (``_Held``: a
  record of the pickled attributes, with no behaviour) and to tensor rebuilders of its own;
  every other global (``os.system``, ``builtins.eval``, an unknown class) raises
  ``UnsafeCheckpointError`` before anything is called;
- answers the pickle's storage references (``persistent_load``) with tensors made from the raw
  bytes of the archive's ``data/`` records (``torch.frombuffer``; no torch unpickling);
- walks the records like ``nn.Module.state_dict`` (``_parameters``, persistent ``_buffers``,
  ``_modules``) to get the float weights, and collects each quantised layer's released
  quantisation parameters separately.

What maps to what:

- float weights -> a segment_anything-layout ``vit_t`` state dict, exactly (every parameter and
  persistent buffer of the model, the quantised layers' ``weight``/``bias`` included: TinySAM's
  simulated forward quantises those float weights at run time with its intervals);
- each quantised layer's ``w_bit``/``a_bit`` (``A_bit``/``B_bit`` of the matmuls), ``mode``,
  and buffers (``w_interval``, ``a_interval``, ``a_bias``, ``a_neg_interval``, ``A_interval``,
  ``B_interval``, ``split`` and the block-layout counts ``n_V``, ``n_H``, ``n_a``, ``crb_*``,
  ``n_G_*``, ...) -> ``QTinySAM.intervals[module path]``, verbatim.

``QTinySAM.apply_to`` then carries onto a calibrated ``QuantizedTinyViT`` every released
parameter our format expresses exactly (linear weights and inputs, fc2's twin ranges,
convolution weight codes with the BatchNorm folded into the scales, the attention products' q,
k and v); ``sam-drop-in quantize --from-qtinysam`` does so and records which in the metadata.

Our fake-quant format cannot hold the rest of the released intervals faithfully: TinySAM quantises linear
inputs symmetrically per channel chunk (``n_a`` intervals), convolution inputs with a float
offset (``a_bias``), weights of linears per (row block x column block), attention matrices per
block, and post-softmax values with a float split point; ours are per tensor (asymmetric with an
integer zero point, or twin uniform with power-of-two step ratios) and per output channel. So a
conversion (``sam-drop-in quantize --from-qtinysam``) takes the exact float weights,
calibrates our quantisers on images, applies the released parameters that fit, and keeps the
released intervals verbatim in the output's metadata (``qtinysam_intervals``) for reference.
"""

import _compat_pickle
import collections
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set, Tuple

import torch

from .._errors import CheckpointError, UnsafeCheckpointError
from .._layouts import detect_model_type
from ..checkpoint import load_into

QUANT_LAYERS_MODULE = "tinysam.quantization_layer.layers"

# TinyViT's Conv2d_BN BatchNorm epsilon (BatchNorm2d's default; the file holds no eps).
_BN_EPS = 1e-5
QUANT_LAYER_CLASSES = frozenset({"InferQuantMatMul", "InferQuantMatMulPost", "InferQuantLinear",
                                 "InferQuantLinearPost", "InferQuantConv2d", "InferQuantConvTranspose2d"})

# TinySAM's model classes (its modeling package mirrors segment_anything's and MobileSAM's).
_TINYSAM_CLASSES = {
    "tinysam.modeling.sam": {"Sam"},
    "tinysam.modeling.tiny_vit_sam": {"Conv2d_BN", "DropPath", "PatchEmbed", "MBConv", "PatchMerging", "ConvLayer",
                                      "Mlp", "Attention", "TinyViTBlock", "BasicLayer", "LayerNorm2d", "TinyViT"},
    "tinysam.modeling.image_encoder": {"ImageEncoderViT", "Block", "Attention", "PatchEmbed"},
    "tinysam.modeling.prompt_encoder": {"PromptEncoder", "PositionEmbeddingRandom"},
    "tinysam.modeling.mask_decoder": {"MaskDecoder", "MLP"},
    "tinysam.modeling.transformer": {"TwoWayTransformer", "TwoWayAttentionBlock", "Attention"},
    "tinysam.modeling.common": {"MLPBlock", "LayerNorm2d"},
    QUANT_LAYERS_MODULE: set(QUANT_LAYER_CLASSES),
    # TinyViT's stochastic depth comes from timm (an identity at inference).
    "timm.models.layers.drop": {"DropPath"},
    "timm.layers.drop": {"DropPath"},
}

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _Held:
    """The pickled state of one object of an allow-listed class: attributes only, no behaviour.

    ``_source`` names the class it stands for ("tinysam.modeling.sam.Sam"). The pickle creates
    it with ``cls.__new__(cls)`` (NEWOBJ) and fills it with ``__setstate__`` (BUILD); calling the
    class (REDUCE) is refused, since a module is never pickled that way.
    """

    _source = "?"

    def __init__(self, *args, **kwargs):
        raise UnsafeCheckpointError(f"the pickle calls {self._source}(...) to build an object, which a saved "
                                    "torch module never does; refused (nothing was executed)")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise CheckpointError(f"{self._source}: unexpected pickled state of type {type(state).__name__}")
        self.__dict__.update(state)


def _held_class(module: str, name: str) -> type:
    return type(name, (_Held,), {"_source": f"{module}.{name}", "__module__": __name__})


def _storage_class(name: str) -> type:
    """Stands for a ``torch.*Storage`` type in the pickle's storage references: only its dtype is used."""
    return type(name, (), {"dtype": _STORAGE_DTYPES[name], "__module__": __name__})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError("a tensor in the pickle does not refer to a storage of the archive")
    size, stride = tuple(size), tuple(stride)
    if size and any(s < 0 for s in size + stride):
        raise CheckpointError("a tensor in the pickle has a negative size or stride")
    need = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if need > storage.numel():
        raise CheckpointError("a tensor in the pickle reaches past the end of its storage (corrupt file)")
    return storage.as_strided(size, stride, storage_offset).clone()


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    # A parameter is kept as its plain tensor: this reader only reads values.
    return data


class _Device(str):
    pass


def _torch_size(*args):
    return tuple(*args) if args else ()


# Globals other than classes: what each allowed (module, name) becomes.
_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _Device,
}


def _is_torch_module_class(module: str, name: str) -> bool:
    """A layer class of ``torch.nn`` (looked up by name in torch.nn's namespace, never imported from the file)."""
    if not module.startswith("torch.nn.modules."):
        return False
    cls = getattr(torch.nn, name, None)
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module


class _SafeUnpickler(pickle.Unpickler):
    """Maps the allow-list to plain data holders; anything else is refused before it is called."""

    def __init__(self, data: bytes, read_record, path: str):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._path = path
        self._classes: Dict[Tuple[str, str], type] = {}
        self._storages: Dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch.save's) spell Python 2 names ("__builtin__.set"); translate
        # them as pickle's own find_class does (a renaming table, nothing imported).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _FUNCTIONS:
            return _FUNCTIONS[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return self._classes.setdefault(key, _storage_class(name))
        if name in _TINYSAM_CLASSES.get(module, ()) or _is_torch_module_class(module, name):
            return self._classes.setdefault(key, _held_class(module, name))
        raise UnsafeCheckpointError(
            f"refused to read {self._path!r}: its pickle asks for {module}.{name}, which is not on the Q-TinySAM "
            "reader's allow-list (TinySAM's model and quantisation-layer classes, torch.nn layers, tensors and "
            "containers). Nothing from the file was executed. If you trust the file, load it with TinySAM's own "
            "code, save model.state_dict() with safetensors.torch.save_file(), and pass that file instead"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path!r}: unexpected persistent reference {str(pid)[:80]} in the pickle")
        _, storage_type, key, _location, numel = pid
        dtype = getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self._path!r}: a storage of unknown type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < int(numel) * itemsize:
                raise CheckpointError(f"{self._path!r}: storage record {key} is shorter than its {numel} elements "
                                      "(truncated or corrupt file)")
            # bytearray: a writable copy, so the tensors own their memory.
            flat = torch.frombuffer(bytearray(raw[: int(numel) * itemsize]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            self._storages[key] = flat
        return self._storages[key]


def _unpickle(path: str) -> Any:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path!r} is not a torch zip checkpoint (torch.save since torch 1.6); the released "
                              "Q-TinySAM file is one: download it again")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path!r}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and archive.read(order).decode().strip() != "little":
            raise CheckpointError(f"{path!r} was saved on a big-endian machine; this reader takes little-endian files")

        def read_record(key: str) -> bytes:
            try:
                info = archive.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{path!r}: the pickle refers to storage {key}, which the archive lacks") from None
            # torch.save stores records uncompressed; a compressed one could inflate without bound.
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path!r}: storage record {key} is compressed, which torch.save never "
                                      "writes; the file was repacked or is not a torch checkpoint")
            return archive.read(info)

        try:
            return _SafeUnpickler(archive.read(pkl[0]), read_record, path).load()
        except (UnsafeCheckpointError, CheckpointError):
            raise
        except Exception as exc:  # a truncated or corrupt pickle stream
            raise CheckpointError(f"{path!r}: its pickle cannot be read ({type(exc).__name__}: {exc}); the file is "
                                  "truncated or corrupt: download it again") from None


@dataclass
class QTinySAM:
    """What a Q-TinySAM file holds, as data.

    Attributes:
      state_dict (dict(str, Tensor)): float weights in segment_anything's layout (``vit_t``).
      intervals (dict(str, dict)): per quantised layer (module path, e.g.
        "image_encoder.layers.1.blocks.0.mlp.fc2"): ``class`` (TinySAM's class name), the bits
        and mode, and every buffer of the layer that is not a weight (tensors, as released).
      source (str): the file read.
    """

    state_dict: Dict[str, torch.Tensor]
    intervals: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def bits(self) -> Set[Tuple[int, int]]:
        """The (weight or A bits, activation or B bits) pairs used by the quantised layers."""
        out = set()
        for rec in self.intervals.values():
            w = rec.get("w_bit", rec.get("A_bit"))
            a = rec.get("a_bit", rec.get("B_bit"))
            if w is not None and a is not None:
                out.add((int(w), int(a)))
        return out

    def recipe_name(self) -> Optional[str]:
        """"w8a8" or "w6a6" when every quantised layer uses those bits, else None."""
        b = self.bits()
        return {frozenset({(8, 8)}): "w8a8", frozenset({(6, 6)}): "w6a6"}.get(frozenset(b))

    def load_into(self, sam) -> None:
        """Load the float weights into a segment_anything-layout ``vit_t`` Sam (strictly;
        CheckpointError naming the keys on a mismatch)."""
        load_into(sam, self.state_dict)

    @torch.no_grad()
    def apply_to(self, qenc) -> Dict[str, str]:
        """Carry the released parameters that our format expresses exactly onto ``qenc``, a
        calibrated ``QuantizedTinyViT`` of this model's float weights, in place; the others keep
        their calibrated values. Returns {released layer path: what was taken, or why not}.

        Taken (TinySAM's arithmetic, layers.py, reproduced exactly by ours):

        - linear weights (``InferQuantLinear``/``Post``) with one column block (``n_H`` 1): the
          per-row-block ``w_interval`` as our per-output-channel scales and the codes
          ``round(w / s)`` clamped to [-2**(b-1), 2**(b-1)-1] (the same rounding);
        - linear inputs with one interval (``n_a`` 1, or all chunks equal): symmetric codes
          [-2**(b-1), 2**(b-1)-1] are our affine codes with zero point 2**(b-1);
        - fc2 inputs (``InferQuantLinearPost``): our twin uniform post-GELU pair, coarse step
          ``a_interval`` for positives, fine step ``a_neg_interval`` for negatives (ours clamps
          the negatives at -(2**(b-1)-1) steps, TinySAM at -2**(b-1): the two differ only within
          half a step of GELU's minimum, -0.16997);
        - convolution weights (``InferQuantConv2d`` on a ``Conv2d_BN``'s convolution, or on a
          plain one): TinySAM's codes, with the BatchNorm folded into the per-channel scales
          (scale x gamma / sqrt(var + eps), negative where gamma is; a channel whose factor is
          zero is zero); the folded bias is unchanged;
        - the attention products' q, k (``InferQuantMatMul``) and v (``InferQuantMatMulPost``'s
          B) when each has one interval: symmetric, as for linear inputs.

        Not taken (kept as calibrated), as our format cannot express them: convolution inputs
        (a float offset ``a_bias``), the post-softmax split quantiser, per-chunk or per-block
        intervals, layers outside the image encoder (TinySAM also quantises the mask decoder),
        and any record whose path or bits do not match ``qenc``.
        """
        from .fake_quant import QConv2d, QLinear, quantize_weight
        from .tinyvit import QAttention

        body = dict(qenc.body.named_modules())
        report: Dict[str, str] = {}

        def one(t) -> Optional[float]:
            t = torch.as_tensor(t, dtype=torch.float32).flatten()
            return float(t[0]) if t.numel() and bool((t == t[0]).all()) else None

        def symmetric(quant, interval, bits) -> bool:
            value = one(interval)
            if quant is None or quant.kind != "uniform" or quant.bits != bits or value is None or value <= 0:
                return False
            quant.set_params({"scale": torch.tensor(value), "fine_scale": torch.tensor(value),
                              "zero_point": torch.tensor(2 ** (bits - 1), dtype=torch.int32)})
            return True

        for path, rec in sorted(self.intervals.items()):
            if not path.startswith("image_encoder."):
                report[path] = "not applied: outside the image encoder (only the encoder is quantised here)"
                continue
            sub = path[len("image_encoder."):]
            cls = rec.get("class")
            taken = []
            if cls in ("InferQuantLinear", "InferQuantLinearPost") and isinstance(body.get(sub), QLinear):
                layer, bits = body[sub], int(rec.get("w_bit", -1))
                w = self.state_dict[path + ".weight"].float()
                n_v, n_h = int(rec.get("n_V", 0)), int(rec.get("n_H", 0))
                if (bits == layer.bits and n_h == 1 and n_v > 0 and w.shape[0] % n_v == 0
                        and torch.as_tensor(rec.get("w_interval", [])).numel() == n_v):
                    scale = rec["w_interval"].float().reshape(n_v).repeat_interleave(w.shape[0] // n_v)
                    layer.weight_scale.copy_(scale)
                    layer.weight_int.copy_(quantize_weight(w, scale, bits))
                    taken.append("weights")
                a_bits, quant = int(rec.get("a_bit", -1)), layer.input_quant
                if cls == "InferQuantLinear" and symmetric(quant, rec.get("a_interval", []), a_bits):
                    taken.append("input")
                elif (cls == "InferQuantLinearPost" and quant is not None and quant.kind == "twin_gelu"
                      and quant.bits == a_bits and one(rec.get("a_interval", [])) and one(rec.get("a_neg_interval", []))):
                    quant.set_params({"scale": torch.tensor(one(rec["a_interval"])),
                                      "fine_scale": torch.tensor(one(rec["a_neg_interval"])),
                                      "zero_point": torch.tensor(0, dtype=torch.int32)})
                    taken.append("input (twin uniform)")
            elif cls == "InferQuantConv2d":
                owner = sub[: -len(".c")] if sub.endswith(".c") else sub
                layer, bits = body.get(owner), int(rec.get("w_bit", -1))
                w = self.state_dict[path + ".weight"].float()
                interval = rec.get("w_interval", torch.empty(0)).float().flatten()
                if isinstance(layer, QConv2d) and bits == layer.bits and interval.numel() in (1, w.shape[0]):
                    scale = interval.expand(w.shape[0]).clone()
                    gain = torch.ones_like(scale)
                    bn = [self.state_dict.get(f"image_encoder.{owner}.bn.{k}") for k in ("weight", "running_var")]
                    if owner != sub and all(t is not None for t in bn):  # a Conv2d_BN: fold its BatchNorm in
                        gain = bn[0].float() * torch.rsqrt(bn[1].float() + _BN_EPS)
                    if owner == sub or all(t is not None for t in bn):  # else <path>.c is not a Conv2d_BN's
                        # The folded scale keeps the factor's sign (a BatchNorm gamma can be
                        # negative; the int8 kernels take signed per-channel scales, tested); a
                        # zero factor zeroes the channel, stored as codes 0 with scale 1.
                        zero = gain == 0
                        codes = quantize_weight(w, scale, bits).masked_fill(zero.view(-1, *([1] * (w.ndim - 1))), 0)
                        layer.weight_int.copy_(codes)
                        layer.weight_scale.copy_(torch.where(zero, torch.ones_like(scale), scale * gain))
                        taken.append("weights (input calibrated: TinySAM's has a float offset)")
            elif cls in ("InferQuantMatMul", "InferQuantMatMulPost"):
                attn = body.get(sub.rpartition(".")[0])
                if isinstance(attn, QAttention) and attn.products:
                    a_bits, b_bits = int(rec.get("A_bit", -1)), int(rec.get("B_bit", -1))
                    if cls == "InferQuantMatMul":
                        if symmetric(attn.q_quant, rec.get("A_interval", []), a_bits):
                            taken.append("q")
                        if symmetric(attn.k_quant, rec.get("B_interval", []), b_bits):
                            taken.append("k")
                    elif symmetric(attn.v_quant, rec.get("B_interval", []), b_bits):
                        taken.append("v (softmax output calibrated: TinySAM's splits at a float point)")
            if taken:
                report[path] = "applied: " + ", ".join(taken)
            elif not any(isinstance(body.get(k), (QLinear, QConv2d, QAttention))
                         for k in (sub, sub.removesuffix(".c"), sub.rpartition(".")[0])):
                report[path] = f"not applied: our encoder has no quantised layer at {sub} (e.g. the unused classification head)"
            else:
                report[path] = "not applied: not expressible in our format"
        return report

    def metadata(self) -> Dict[str, str]:
        """Provenance for a file converted from this one: ``source`` and the released intervals
        as JSON (tensors as nested lists)."""

        def plain(v):
            return v.tolist() if isinstance(v, torch.Tensor) else v

        intervals = {p: {k: plain(v) for k, v in rec.items()} for p, rec in self.intervals.items()}
        return {"converted_from": "Q-TinySAM " + os.path.basename(self.source),
                "qtinysam_intervals": json.dumps(intervals, sort_keys=True)}


def _walk(obj: _Held, prefix: str, weights: Dict[str, torch.Tensor], intervals: Dict[str, Dict[str, Any]],
          seen: Optional[Set[int]] = None) -> None:
    """state_dict-like walk of the held module tree; quantised layers' other buffers to ``intervals``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:  # a pickle can make a module its own descendant; a model never is
        raise CheckpointError(f"module {prefix.rstrip('.') or 'root'} appears twice in the module tree (a cycle "
                              "or a shared module); not a model this reader converts")
    seen.add(id(obj))
    d = obj.__dict__
    params = d.get("_parameters") or {}
    buffers = d.get("_buffers") or {}
    skip = set(d.get("_non_persistent_buffers_set") or ())
    quant = obj._source.rsplit(".", 1)[0] == QUANT_LAYERS_MODULE
    for name, value in params.items():
        if value is not None:
            weights[prefix + name] = value
    record: Dict[str, Any] = {}
    for name, value in buffers.items():
        if value is None or name in skip:
            continue
        if quant:
            record[name] = value
        else:
            weights[prefix + name] = value
    if quant:
        record["class"] = type(obj).__name__
        for attr in ("w_bit", "a_bit", "A_bit", "B_bit", "mode", "bias_correction"):
            if attr in d and isinstance(d[attr], (int, float, str, bool)):
                record[attr] = d[attr]
        intervals[prefix.rstrip(".")] = record
    for name, child in (d.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _Held):
            raise CheckpointError(f"module {prefix + name} is a {type(child).__name__}, not a module record")
        _walk(child, f"{prefix}{name}.", weights, intervals, seen)


def read_qtinysam(path) -> QTinySAM:
    """Read a Q-TinySAM checkpoint (``torch.save`` of TinySAM's quantised model) safely.

    Arguments:
      path (str or os.PathLike): the ``.pth`` file.

    Returns:
      (QTinySAM): float weights (segment_anything layout, checked to be a ``vit_t`` SAM) and the
        released quantisation intervals per quantised layer.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside the allow-list (named in the
        message); nothing from the file was executed.
      CheckpointError: not a torch zip file, corrupt, or not a TinySAM vit_t model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Q-TinySAM file {path!r} does not exist")
    root = _unpickle(path)
    if isinstance(root, dict):  # {"model": Sam} and similar wrappers
        held = [v for v in root.values() if isinstance(v, _Held)]
        root = held[0] if len(held) == 1 else root
    if not isinstance(root, _Held) or not root._source.endswith(".Sam"):
        raise CheckpointError(f"{path!r} does not hold a pickled TinySAM model (found {type(root).__name__}); "
                              "for a plain state dict use sam_model_registry['vit_t'](checkpoint=...)")
    weights: Dict[str, torch.Tensor] = {}
    intervals: Dict[str, Dict[str, Any]] = {}
    _walk(root, "", weights, intervals)
    found = detect_model_type(weights)
    if found != "vit_t":
        raise CheckpointError(f"{path!r} holds a {found or 'non-standard'} SAM, not TinySAM's vit_t; the Q-TinySAM "
                              "reader converts vit_t models only")
    return QTinySAM(state_dict=weights, intervals=intervals, source=path)
