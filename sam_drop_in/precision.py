"""One switch for reduced precision, quantisation and compilation of a built SAM model.

    from sam_drop_in import sam_model_registry, SamPredictor
    from sam_drop_in.precision import optimize

    sam = optimize(sam_model_registry["vit_t"](checkpoint="mobile_sam.pt"), mode="int8",
                   calibration="calib_images/")   # int8 via torchao when images given (else ONNX Runtime)
    predictor = SamPredictor(sam)   # same API, same output dtypes as in fp32

Modes:
  - ``"fp32"``: nothing changes (the exact fast paths are always on).
  - ``"bf16"``: the image encoder and mask decoder run in bfloat16 (CUDA, or a CPU with
    AVX-512 BF16 / AMX; on other CPUs bf16 is emulated and slower than fp32, and a warning says so).
  - ``"fp16"``: float16 on CUDA only.
  - ``"int8"``: real int8 execution of the image encoder, CPU only, by one of two runtimes
    (``int8_runtime=``):

    - ``"torchao"``: torchao's PT2E static quantisation with the x86 Inductor quantiser,
      compiled by Inductor to oneDNN int8 convolutions and linears (``quantization/pt2e_int8.py``;
      needs the ``quant`` extra, a C++ compiler and ``calibration=`` images). The compile runs
      inside ``optimize`` (tens of seconds to minutes).
    - ``"onnxruntime"``: the encoder exported to ONNX and quantised by ONNX Runtime
      (``quantization/onnx_int8.py``; needs the ``onnx`` extra): static QDQ with ``calibration=``
      images, dynamic without; its linears run in int8, the convolutions in float.
    - ``"auto"`` (default): ``"torchao"`` when calibration images are given and torchao imports,
      else ``"onnxruntime"``. Why: measured on an AMX CPU (docs/quantization.md) the PT2E route
      is the faster one, and the ONNX Runtime route is the one that works without images.

    A model whose image encoder is already quantised -- loaded from a file written by
    ``sam-drop-in quantize`` / ``quantization.save_quantized``, or after ``mode="w8a8"`` /
    ``"w6a6"`` -- takes ``"int8"`` without images: the torchao route runs its searched integer
    weights and activation scales (w6a6 as 6-bit codes in the int8 kernels), so calibration runs
    once, when the file is made, and loading costs only the compile.

    The mask decoder stays float32: it is small (4M parameters, a few ms per prompt) and its
    outputs are the masks themselves.
  - ``"w8a8"`` / ``"w6a6"``: the calibrated *simulated* ("fake-quant") encoder of
    ``sam_drop_in.quantization.calibrate`` (needs ``calibration=``): integer-exact values
    computed in float32, for accuracy studies; slower than fp32, not faster.

Every mode keeps the public API of upstream ``segment_anything``: the model still takes and
returns float32 tensors at its module boundaries (the image encoder's embedding, the mask
decoder's logits and IoU scores), so ``SamPredictor`` returns bool masks and float32 scores and
logits, and ``get_image_embedding()`` is float32. The reduced precision lives inside the image
encoder and the mask decoder; the prompt encoder (under 0.1% of the work) stays float32.
"""

import inspect
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

import torch
from torch import nn

from .modeling._running import inside, running_parts
from .quantization import calibrate
from .quantization.onnx_int8 import int8_image_encoder
from .quantization.pt2e_int8 import pt2e_int8_encoder, torchao_available

__all__ = ["MODES", "optimize", "cpu_has_native_bf16"]

MODES = ("fp32", "bf16", "fp16", "int8", "w8a8", "w6a6")
_SIMULATED = ("w8a8", "w6a6")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ATTR = "_sam_drop_in_precision"
_INT8_RUNTIMES = ("auto", "torchao", "onnxruntime")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX-512 BF16 or AMX).

    Returns:
      (bool): True when oneDNN reports native bf16 support.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def optimize(
    model: nn.Module,
    mode: str = "fp32",
    compile: bool = False,
    *,
    calibration: Optional[Union[str, Path, Sequence[np.ndarray]]] = None,
    int8_runtime: str = "auto",
) -> nn.Module:
    """Prepares a built SAM model for fast inference in the chosen precision, in place.

    Move the model to its device first (``model.to("cuda")``), then call this; the model is
    meant for inference afterwards (an int8 or w8a8/w6a6 model's image encoder is replaced by a
    quantised one, whose state dict is not the float encoder's: keep the float checkpoint for
    saving).

    Arguments:
      model (Sam): a model from ``sam_model_registry`` / ``build_sam_*`` (any image encoder for
        the float modes and int8; w8a8/w6a6 need an encoder ``quantization.calibrate`` knows).
      mode (str): "fp32", "bf16", "fp16" (CUDA only), "int8" (CPU only), "w8a8" or "w6a6".
      compile (bool): also ``torch.compile`` the image encoder and mask decoder in place (state
        dict keys unchanged). The first call then takes a while to compile; on CPU it needs a
        C++ compiler. An int8 encoder is compiled already (torchao) or runs in ONNX Runtime, and
        is left out of compilation.
      calibration (str, Path, list of np.ndarray or None): keyword only; a folder of images or
        HxWx3 uint8 RGB arrays (a handful of photographs like the ones you will segment). int8:
        static quantisation calibrated on them (without: dynamic quantisation). w8a8/w6a6:
        required. Refused (ValueError) with the float modes, which would not use it.
      int8_runtime (str): keyword only, mode "int8" only: "auto" (default), "torchao" or
        "onnxruntime" (see Modes above).

    Returns:
      (Sam): the same model object, in eval mode, with float32 inputs and outputs at the module
        boundaries whatever the mode.

    Raises ValueError (with what to do instead) for an unknown mode, fp16 off CUDA, int8 or
    w8a8/w6a6 on CUDA, w8a8/w6a6 without calibration images, calibration images with a float
    mode, a model already optimised, an unknown int8_runtime or one given with another mode,
    int8_runtime="torchao" without calibration images for a float model; for a model whose
    encoder is already quantised: calibration images or int8_runtime="onnxruntime" with "int8",
    and any mode but "fp32" and "int8"; ImportError naming the extra when the
    chosen int8 runtime is not installed; RuntimeError when Inductor cannot compile the torchao
    int8 encoder (the model is then unchanged).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    if int8_runtime not in _INT8_RUNTIMES:
        raise ValueError(f"int8_runtime must be one of {list(_INT8_RUNTIMES)}, got {int8_runtime!r}.")
    if int8_runtime != "auto" and mode != "int8":
        raise ValueError(f"int8_runtime applies to mode='int8' only, not mode={mode!r}; drop it.")
    quantized = _has_quantized_encoder(model)
    if int8_runtime == "torchao" and calibration is None and not quantized:
        raise ValueError(
            "int8_runtime='torchao' is static quantisation and needs calibration images: pass "
            "calibration='a_folder_of_images/' or a list of HxWx3 uint8 arrays, or use "
            "int8_runtime='onnxruntime' (dynamic quantisation without images)."
        )
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        if not isinstance(getattr(model, name, None), nn.Module):
            raise ValueError(f"optimize() expects a SAM model with an `{name}` submodule, got {type(model).__name__}.")
    done = getattr(model, _ATTR, None)
    # A simulated model (w8a8/w6a6, for accuracy) may go on to real int8 with the same scales.
    if done is not None and not (mode == "int8" and done[0] in _SIMULATED and quantized):
        if done == (mode, compile):
            return model
        raise ValueError(
            f"this model was already optimised with mode={done[0]!r}, compile={done[1]}; "
            "build (or load) a fresh model to choose another mode."
        )
    device = next(model.parameters()).device
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(
            f"mode='fp16' needs a CUDA device but the model is on {device.type}: move it first with "
            "model.to('cuda'), or on CPU use mode='bf16' (CPUs with AVX-512 BF16) or mode='int8'."
        )
    if mode == "int8" and device.type != "cpu":
        raise ValueError(
            f"mode='int8' runs the encoder on CPU only (oneDNN or ONNX Runtime int8 kernels) but the model is on {device.type}; "
            "on CUDA use mode='bf16' or mode='fp16'."
        )
    if quantized and mode == "int8":
        if calibration is not None:
            raise ValueError(
                "this model's image encoder is already quantised (a quantised file, or mode='w8a8'/'w6a6'): "
                "mode='int8' runs its scales without calibration images; drop calibration=, or build a float "
                "model to calibrate anew."
            )
        if int8_runtime == "onnxruntime":
            raise ValueError(
                "int8_runtime='onnxruntime' quantises a float encoder; this model's encoder is already quantised. "
                "Use int8_runtime='auto' or 'torchao' (which run its scales), or load the float checkpoint."
            )
    elif quantized and mode != "fp32":
        raise ValueError(
            f"this model's image encoder is quantised (simulated); mode={mode!r} needs a float model: load the "
            "float checkpoint, or use mode='int8' to run the quantised encoder's scales on int8 kernels."
        )
    elif mode in _SIMULATED:
        if calibration is None:
            raise ValueError(
                f"mode={mode!r} calibrates a simulated quantised encoder and needs images: pass "
                f"calibration='a_folder_of_images/' or calibration=[HxWx3 uint8 arrays] (a handful of "
                "photographs like the ones you will segment)."
            )
        if device.type != "cpu":
            raise ValueError(
                f"mode={mode!r} (simulated quantisation, for accuracy studies) is set up on CPU here but the "
                f"model is on {device.type}; calibrate on CPU, or on CUDA use mode='bf16' or mode='fp16'."
            )
    elif calibration is not None and mode != "int8":
        raise ValueError(
            f"calibration images are used by modes 'int8', 'w8a8' and 'w6a6', not by mode={mode!r}; "
            "drop the calibration argument or choose one of those modes."
        )
    model.eval()
    if mode == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 is emulated and slower than fp32 "
            "here; prefer mode='int8' or mode='fp32' on this machine.",
            RuntimeWarning,
            stacklevel=2,
        )
    if mode in _DTYPES:
        _reduce_precision(model, _DTYPES[mode])
    elif mode == "int8":
        # Built from the float encoder before it is replaced; a failure leaves the model as it was.
        if quantized or _int8_runtime(int8_runtime, calibration) == "torchao":
            model.image_encoder = pt2e_int8_encoder(model, calibration)
        else:
            model.image_encoder = int8_image_encoder(model, calibration)
    elif mode in _SIMULATED:
        model.image_encoder = calibrate(model, calibration, mode).eval()
    if compile:
        _compile_parts(model, mode, device)
    setattr(model, _ATTR, (mode, compile))
    return model


def _has_quantized_encoder(model: nn.Module) -> bool:
    """Whether ``model.image_encoder`` is a simulated quantised encoder (QuantizedTinyViT /
    QuantizedViT): from a quantised file, or ``mode="w8a8"``/``"w6a6"``."""
    from .quantization.io import _is_quantized_encoder

    return _is_quantized_encoder(getattr(model, "image_encoder", None))


def _int8_runtime(requested: str, calibration: Any) -> str:
    """The int8 runtime ``optimize`` uses: the requested one, or for "auto" torchao's PT2E route
    when calibration images are given and torchao imports, else ONNX Runtime."""
    if requested != "auto":
        return requested
    if calibration is None:
        return "onnxruntime"
    return "torchao" if torchao_available() else "onnxruntime"


def _reduce_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """The bf16/fp16 modes without optimize()'s device checks: the image encoder and mask decoder
    hold ``dtype`` weights, and every entry point of them takes and returns float32.

    Tests call this directly to run the fp16 path on CPU (slow there, but correct), which the
    public ``optimize`` refuses because it is no use to anyone off CUDA.
    """
    for part in (model.image_encoder, model.mask_decoder):
        part.to(dtype)
        _cast_at_boundary(part, dtype)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """``x`` with every floating tensor in it cast to ``dtype``: tensors, and tuples (named ones
    too), lists and dicts of them, recursively. Anything else is
    returned as it is."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point() or x.dtype == dtype:
            return x
        if x.ndim > 0 and x.shape[0] > 1 and x.stride(0) == 0:
            # A batch-expanded view (the shared 'no mask' embedding): cast one copy and expand
            # again, so the decoder still sees it as shared and computes the image side once.
            return x[:1].to(dtype).expand(x.shape)
        return x.to(dtype)
    if isinstance(x, tuple):
        items = [_cast(v, dtype) for v in x]
        # A NamedTuple's constructor takes its fields as separate arguments, a plain tuple one iterable.
        return type(x)(*items) if hasattr(type(x), "_fields") else type(x)(items)
    if isinstance(x, list):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _cast(v, dtype)) for k, v in x.items())
    return x


class _Boundary:
    """Stands in for one method of a module inside a reduced-precision part (the image encoder
    or the mask decoder): a call from outside the part gets its floating inputs cast to the
    part's dtype and its floating outputs cast to float32; a call made by the part's own code,
    already in the part's dtype, runs unchanged (its results feed more reduced-precision work).

    A plain object rather than a closure, so that a model survives ``copy.deepcopy`` (the copy's
    boundaries point at the copy) and pickling.
    """

    def __init__(self, module: nn.Module, name: str, part: nn.Module, dtype: torch.dtype) -> None:
        self.module, self.name, self.part, self.dtype = module, name, part, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        method = getattr(type(self.module), self.name)
        if id(self.part) in running_parts():  # called by the part's own code: already in dtype
            return method(self.module, *args, **kwargs)
        with inside(self.part):
            out = method(self.module, *_cast(args, self.dtype), **_cast(kwargs, self.dtype))
        return _cast(out, torch.float32)


def entry_points(module: nn.Module) -> List[str]:
    """The methods of ``module`` that reduced precision puts a float32 boundary on: ``forward``
    (when the module has one) and every public method that its classes below PyTorch's own
    define (``predict_masks`` of the mask decoder, for example).
    Methods that ``nn.Module`` itself has (``train``, ``state_dict``, ...) are left alone.

    Arguments:
      module (nn.Module): any module inside an image encoder or mask decoder.

    Returns:
      (list of str): method names, sorted.
    """
    names = set()
    if type(module).forward is not nn.Module.forward:
        names.add("forward")
    for cls in type(module).__mro__:
        if cls.__module__.split(".")[0] == "torch" or cls is object:
            break  # PyTorch's own classes (nn.Linear, nn.Sequential, ...): only their forward
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and not name.startswith("_") and not hasattr(nn.Module, name):
                names.add(name)
    return sorted(names)


def _cast_at_boundary(part: nn.Module, dtype: torch.dtype) -> None:
    """Puts a :class:`_Boundary` on every entry point of every module in ``part``.

    Any module's methods, not only the part's ``forward``: callers may use a decoder method or
    a head (``iou_prediction_head``) directly, and a new method or submodule is covered the
    moment it exists, with no list here to keep up to date. The fast decoder
    (``modeling.image_decoder.ImageDecoder``) works on the weights directly and casts its own
    inputs to the decoder's dtype, returning float32, so it needs no boundary.
    """
    for module in part.modules():
        for name in entry_points(module):
            # Instance attributes shadow the class's methods; nn.Module calls self.forward.
            module.__dict__[name] = _Boundary(module, name, part, dtype)


def _compile_parts(model: nn.Module, mode: str, device: torch.device) -> None:
    """``torch.compile`` of the image encoder and mask decoder for ``optimize(compile=True)``.

    On CPU in a float mode the encoder is compiled with Inductor's freezing: at its first call
    under ``torch.no_grad()`` (as ``SamPredictor.set_image`` calls it) the weights become
    constants of the compiled code, so the BatchNorms fold once, weights are prepacked for
    oneDNN and GELUs fuse into the matrix products and convolutions. Measured on a shared,
    heavily loaded 2-core AMX CPU, vit_t at 1024 px, bf16 (docs/speed.md): the bare encoder
    compiled 2.2-2.8x faster than eager with freezing and 1.1-1.4x without; through optimize()
    no gain was seen: freezing was not applied there (see _compile_frozen), which is fixed.
    The price: weights changed after that first call are not seen by the compiled encoder
    (load weights before calling optimize), and a new process compiled again in those runs
    (AOTAutograd does not cache frozen graphs). With gradients enabled Inductor does not
    freeze, and the compiled encoder reads the live weights.
    The int8 mode's packed weights and CUDA (not measured) get a plain compile.
    """
    # Dynamo guards on whether this thread's running-part set exists yet (_Boundary reads it):
    # creating it now spares a second compile at the second call on this thread.
    running_parts()
    if device.type == "cpu" and mode in ("fp32", "bf16", "fp16"):
        _compile_frozen(model.image_encoder)
    else:
        model.image_encoder.compile()
    model.mask_decoder.compile()


class _FreezingCall:
    """The compiled call of a module, made with Inductor's ``freezing`` set globally.

    Dynamo decides while tracing whether parameters become constants of the graph or inputs of
    it, and it reads the *global* ``torch._inductor.config.freezing`` to do so; the per-compile
    ``options={"freezing": True}`` reaches Inductor only after that decision. With the option
    alone, every weight stayed a graph input and Inductor had nothing to freeze: the generated
    code for vit_t in bf16 held 40 ``addmm`` and 29 plain convolutions and no frozen parameter
    (docs/speed.md). Setting the flag around each call makes the first call under
    ``torch.no_grad()`` trace with frozen weights; later calls run the compiled code (the flag
    is restored after each call, so nothing else in the process is affected).
    A plain object rather than a closure, like ``_Boundary``."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def _compile_frozen(module: nn.Module) -> None:
    """``module.compile()`` with Inductor freezing that takes effect (see :class:`_FreezingCall`)."""
    module.compile(options={"freezing": True})
    # nn.Module.compile keeps the compiled call here and __call__ uses it.
    module._compiled_call_impl = _FreezingCall(module._compiled_call_impl)


def reduce_precision(model: nn.Module, mode: str) -> nn.Module:
    """``optimize(model, mode)`` for mode "bf16" or "fp16" (str) without its device checks (fp16 on
    a CPU is slow but correct), so that tests and benchmarks run that path anywhere. Returns
    ``model`` (Sam), changed in place."""
    _reduce_precision(model, _DTYPES[mode])
    return model
