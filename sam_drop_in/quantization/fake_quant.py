"""Simulated ("fake-quant") layers: every value an integer kernel would see is computed exactly.

Quantise-dequantise uses ``torch.round`` (round half to even) and clamps to the integer range of
the bit width, so each dequantised value is ``integer * scale`` exactly as an integer kernel's
operand times its scale; the results equal integer execution up to float accumulation order.

Formulas (b bits, n = 2**(b-1)):
- weights, symmetric per output channel c: q = clamp(round(w / s_c), -n, n-1), w^ = q * s_c.
- plain activations, asymmetric per tensor: q = clamp(round(x / s) + z, 0, 2**b-1), x^ = (q - z) * s.
- post-softmax (x in [0, 1]), twin uniform: coarse step d2 = 1 / n (covers [0, 1)), fine step
  d1 = d2 / 2**m; x^ = clamp(round(x / d1), 0, n-1) * d1 when round(x / d1) <= n-1, else
  clamp(round(x / d2), 0, n-1) * d2 (one bit picks the range, b-1 bits the code).
- post-GELU, twin uniform: positives with step d_pos, negatives (GELU >= -0.17) with a finer
  step d_neg = d_pos / 2**m: x^ = clamp(round(x / d_neg), -(n-1), 0) * d_neg for x < 0, else
  clamp(round(x / d_pos), 0, n-1) * d_pos. m is the largest integer with (n-1) * d_neg still
  covering the most negative calibration value.
The power-of-two ratio between the two steps lets an integer kernel align the ranges by a shift
(PTQ4ViT's twin uniform quantisation).
"""

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8) of ``w`` (out x ...) with per-output-channel ``scale`` (out,)."""
    n = 2 ** (bits - 1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return torch.clamp(torch.round(w / scale.view(shape)), -n, n - 1).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` with ``scale`` (out,) broadcast over q's output-channel dim 0."""
    return q.to(torch.float32) * scale.view((-1,) + (1,) * (q.ndim - 1))


def weight_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale for a clipped max |w| per channel; a channel of zeros gets scale 1."""
    n = 2 ** (bits - 1)
    return torch.where(amax > 0, amax / (n - 1), torch.ones_like(amax))


def fake_quant_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-tensor quantise-dequantise to [0, 2**bits - 1]."""
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, 0, 2**bits - 1) - z) * scale


def fake_quant_twin_softmax(x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, bits: int) -> torch.Tensor:
    """Twin uniform quantise-dequantise of post-softmax values (see the module docstring)."""
    top = 2 ** (bits - 1) - 1
    c1 = torch.round(x / fine)
    c2 = torch.clamp(torch.round(x / coarse), 0, top)
    return torch.where(c1 <= top, torch.clamp(c1, 0, top) * fine, c2 * coarse)


def fake_quant_twin_gelu(x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, bits: int) -> torch.Tensor:
    """Twin uniform quantise-dequantise of post-GELU values (see the module docstring)."""
    top = 2 ** (bits - 1) - 1
    neg = torch.clamp(torch.round(x / fine), -top, 0) * fine
    pos = torch.clamp(torch.round(x / coarse), 0, top) * coarse
    return torch.where(x < 0, neg, pos)


KINDS = ("uniform", "twin_softmax", "twin_gelu")


class ActQuant(nn.Module):
    """Per-tensor activation quantiser: observes during calibration, quantises afterwards.

    Buffers: ``scale`` (the coarse step for twin kinds), ``zero_point`` (int32, uniform kind
    only; 0 otherwise), ``fine_scale`` (twin kinds; equals ``scale`` for the uniform kind).
    """

    def __init__(self, bits: int, kind: str = "uniform", sample_rows: int = 4096):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.bits = bits
        self.kind = kind
        self.sample_rows = sample_rows
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("fine_scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observing = False
        self.calibrated = False
        self.lo = math.inf
        self.hi = -math.inf

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}"

    def observe(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.calibrated:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor, params: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        p = params if params is not None else {"scale": self.scale, "fine_scale": self.fine_scale,
                                               "zero_point": self.zero_point}
        if self.kind == "uniform":
            return fake_quant_affine(x, p["scale"], p["zero_point"], self.bits)
        if self.kind == "twin_softmax":
            return fake_quant_twin_softmax(x, p["fine_scale"], p["scale"], self.bits)
        return fake_quant_twin_gelu(x, p["fine_scale"], p["scale"], self.bits)

    def candidates(self, ratios, softmax_shifts) -> List[Dict[str, torch.Tensor]]:
        """Parameter settings to search, from the observed range."""
        if self.lo > self.hi:
            raise RuntimeError("activation quantiser saw no calibration data")
        bits, out = self.bits, []
        if self.kind == "uniform":
            lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)  # zero exactly representable
            for r in ratios:
                span = (hi - lo) * r
                scale = torch.tensor(span / (2**bits - 1) if span > 0 else 1.0)
                zp = torch.clamp(torch.round(torch.tensor(-lo * r) / scale), 0, 2**bits - 1).to(torch.int32)
                out.append({"scale": scale, "fine_scale": scale, "zero_point": zp})
        elif self.kind == "twin_softmax":
            coarse = torch.tensor(1.0 / 2 ** (bits - 1))
            for m in softmax_shifts:
                out.append({"scale": coarse, "fine_scale": coarse / 2**m, "zero_point": torch.tensor(0, dtype=torch.int32)})
        else:
            top = 2 ** (bits - 1) - 1
            for r in ratios:
                hi = max(self.hi, 0.0) * r
                coarse = torch.tensor(hi / top if hi > 0 else 1.0)
                neg = -min(self.lo, 0.0)
                m = max(0, math.floor(math.log2(top * float(coarse) / neg))) if neg > 0 else 0
                out.append({"scale": coarse, "fine_scale": coarse / 2**m, "zero_point": torch.tensor(0, dtype=torch.int32)})
        return out

    def set_params(self, p: Dict[str, torch.Tensor]) -> None:
        self.scale.copy_(p["scale"])
        self.fine_scale.copy_(p["fine_scale"])
        self.zero_point.copy_(p["zero_point"])
        self.calibrated = True


def _keep_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Up to ``rows`` evenly spaced rows of x (... x C) as a 2-D tensor, for the search."""
    flat = x.detach().reshape(-1, x.shape[-1])
    step = max(1, flat.shape[0] // rows)
    return flat[::step][:rows].clone()


def _keep_crop(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """A centred spatial crop of x (B x C x H x W) of at most ``pixels`` positions per image."""
    side = max(1, int(math.isqrt(max(1, pixels // x.shape[0]))))
    h, w = x.shape[-2:]
    t, l = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return x.detach()[:, :, t : t + side, l : l + side].contiguous().clone()


class QuantLayer(nn.Module):
    """The base of QLinear and QConv2d (shared by every quantised encoder): int8 weight codes, per-channel scales, input quantiser."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, act_bits: int,
                 act_kind: str, quantize_input: bool, sample_rows: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("weight_int", torch.zeros(weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight.shape[0]))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.input_quant = ActQuant(act_bits, act_kind, sample_rows) if quantize_input else None
        self.sample_rows = sample_rows
        # Float weight and calibration samples live only until finalize(); plain attributes so
        # they are never part of the state dict.
        self.float_weight: Optional[torch.Tensor] = weight.detach().clone().float()
        self.samples: List[torch.Tensor] = []
        self.observing = False

    def _apply_weight(self, x, w, bias):  # pragma: no cover - overridden
        raise NotImplementedError

    def _keep(self, x):  # pragma: no cover - overridden
        raise NotImplementedError

    def _channel_mse(self, err: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        """Weight used in the forward: float before finalize(), dequantised codes after."""
        if self.float_weight is not None:
            return self.float_weight
        return dequantize_weight(self.weight_int, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.samples.append(self._keep(x))
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._apply_weight(x, self.weight(), self.bias)

    @torch.no_grad()
    def search(self, recipe) -> None:
        """Per-channel weight scales, then the input quantiser, each by output MSE against float."""
        w = self.float_weight
        xs = self.samples
        if not xs:
            raise RuntimeError("layer saw no calibration data")
        amax = w.abs().reshape(w.shape[0], -1).amax(1)
        best, best_err = None, None
        for r in recipe.weight_search:
            s = weight_scale(amax * r, self.bits)
            dw = dequantize_weight(quantize_weight(w, s, self.bits), s) - w
            err = sum(self._channel_mse(self._apply_weight(x, dw, None)) for x in xs)
            if best is None:
                best, best_err = s.clone(), err
            else:
                better = err < best_err
                best = torch.where(better, s, best)
                best_err = torch.where(better, err, best_err)
        self.weight_scale.copy_(best)
        self.weight_int.copy_(quantize_weight(w, best, self.bits))
        if self.input_quant is not None:
            wq = dequantize_weight(self.weight_int, self.weight_scale)
            refs = [self._apply_weight(x, w, self.bias) for x in xs]
            errs = []
            cands = self.input_quant.candidates(recipe.act_search, recipe.softmax_fine_shifts)
            for p in cands:
                errs.append(sum(float((self._apply_weight(self.input_quant.quantize(x, p), wq, self.bias) - ref)
                                      .pow(2).mean()) for x, ref in zip(xs, refs)))
            self.input_quant.set_params(cands[min(range(len(errs)), key=errs.__getitem__)])

    def finalize(self) -> None:
        """Drop the float weight and samples: from now on the forward uses the integer codes."""
        self.float_weight = None
        self.samples = []
        self.observing = False


class QLinear(QuantLayer):
    """Fake-quant ``nn.Linear`` (input ... x in, output ... x out)."""

    def _apply_weight(self, x, w, bias):
        return F.linear(x, w, bias)

    def _keep(self, x):
        return _keep_rows(x, self.sample_rows)

    def _channel_mse(self, err):
        return err.pow(2).mean(0)


class QConv2d(QuantLayer):
    """Fake-quant 2-D convolution (weight out x in/groups x k x k), BxCxHxW."""

    def __init__(self, weight, bias, stride, padding, dilation, groups, **kwargs):
        super().__init__(weight, bias, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def extra_repr(self) -> str:
        return f"{tuple(self.weight_int.shape)}, stride={self.stride}, padding={self.padding}, groups={self.groups}"

    def _apply_weight(self, x, w, bias):
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _keep(self, x):
        return _keep_crop(x, self.sample_rows)

    def _channel_mse(self, err):
        return err.pow(2).mean((0, 2, 3))


class QuantizedEncoder(nn.Module):
    """The shell shared by the quantised encoders (QuantizedTinyViT, QuantizedViT): ``body`` is a
    copy of the float encoder whose layers were swapped for their fake-quant forms; a subclass
    names its attention module types in ``attention_types``.
    """

    attention_types: Tuple[type, ...] = ()

    def __init__(self, encoder: nn.Module, recipe, arch: Dict) -> None:
        super().__init__()
        self.recipe = recipe
        self.arch = arch
        self.img_size = encoder.img_size
        body = copy.deepcopy(encoder).eval()  # the float encoder passed in is left unchanged
        body.requires_grad_(False)
        self._substitute(body, recipe)
        self.body = body

    def _substitute(self, body: nn.Module, recipe) -> None:  # pragma: no cover - overridden
        """Swap ``body``'s layers (in place) for their fake-quant forms."""
        raise NotImplementedError

    def quant_modules(self) -> List[nn.Module]:
        """Every module with quantisation parameters to search (layers and attentions)."""
        return [m for m in self.modules() if isinstance(m, (QuantLayer,) + self.attention_types)]

    def set_observing(self, on: bool) -> None:
        """Switch calibration observation (ranges and search samples) on or off everywhere."""
        for m in self.modules():
            if isinstance(m, (QuantLayer, ActQuant) + self.attention_types):
                m.observing = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gradient mode on (nothing in the copy requires a gradient, so nothing is recorded):
        # this keeps the encoder off its inference-only piecewise paths (TinyViT's strips call
        # the float Conv2d_BN.folded() directly; the ViT MLP's row groups would hand the
        # substituted linears one piece at a time), so every substituted module sees whole inputs.
        with torch.enable_grad():
            return self.body(x)
