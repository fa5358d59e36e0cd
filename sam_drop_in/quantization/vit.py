"""Conversion of SAM's ViT image encoders (``vit_b`` / ``vit_l`` / ``vit_h``) into their fake-quant form.

Quantised (with their input activations): the patch-embedding convolution, every block's attention
qkv and output projection, the MLP's lin1 and lin2 (lin2's input comes out of a GELU: twin uniform),
the inputs of both attention products (q and k of ``q @ k^T``; the softmax output, twin uniform, and
v of ``attn @ v``) and the neck's 1x1 and 3x3 convolutions. Float32: LayerNorms (the blocks' and the
neck's LayerNorm2d), GELU, softmax, residual additions, the absolute position embedding, and the
decomposed relative-position terms, which are computed from the float (unquantised) queries and
added to the dequantised ``q @ k^T`` logits, as an integer kernel's float epilogue would.
"""

import math
from functools import partial
from typing import Dict, Tuple

import torch
from torch import nn

from ..modeling import image_encoder
from .fake_quant import ActQuant, QConv2d, QLinear, QuantizedEncoder
from .recipe import QuantRecipe
from .tinyvit import QAttention

# Global attention runs a few grid rows of queries at a time so that the logits (and the fake-quant
# temporaries of the softmax output) stay near this size instead of B x heads x N x N at once
# (805 MB per temporary for vit_b at 1024 px). Softmax and quantisation act per query row with
# fixed parameters, so the pieces give the same values as the whole.
_CHUNK_BYTES = 16 << 20

# Attention calibration samples: at most max_search_rows query rows per forward, and at most
# max_search_rows * _SAMPLE_KEYS logits per head (a 14x14 window's worth of keys per row), so that a
# global block (4096 keys at 1024 px) keeps fewer query rows rather than hundreds of MB of logits.
_SAMPLE_KEYS = 196


class QViTAttention(nn.Module):
    """``image_encoder.Attention`` with both matrix products written out so that their inputs
    (q, k, the softmax output and v) can be quantised. Input and output: BxHxWxC float32 (B counts
    windows for windowed blocks). The relative-position parameters keep their names
    (``rel_pos_h``, ``rel_pos_w``), so the state dict reads like the float encoder's."""

    def __init__(self, attn: "image_encoder.Attention", recipe: QuantRecipe):
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        self.qkv = _linear(attn.qkv, recipe, "uniform")
        self.proj = _linear(attn.proj, recipe, "uniform")
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        bits = recipe.act_bits
        self.products = "attention" in recipe.layers
        if self.products:
            self.q_quant = ActQuant(bits, "uniform")
            self.k_quant = ActQuant(bits, "uniform")
            self.attn_quant = ActQuant(bits, "twin_softmax")
            self.v_quant = ActQuant(bits, "uniform")
        self.observing = False
        self.samples = []
        self.max_rows = recipe.max_search_rows

    # The products' search and the cleanup are TinyViT's, unchanged: each sample is (q rows, k,
    # softmax rows, v) and each product input's range is chosen by the MSE of its product.
    search = QAttention.search
    finalize = QAttention.finalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B x heads x N x hd, float
        qq, kq = q, k
        if self.products:
            qq, kq, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        kt = kq.transpose(-2, -1)
        keep = self._sample_plan(b, n) if self.observing and self.products else None
        kept = []
        rows = max(1, _CHUNK_BYTES // (b * self.num_heads * w * n * 4))
        out = torch.empty_like(v)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            part = slice(r0 * w, r1 * w)
            logits = (qq[:, :, part] @ kt) * self.scale
            if self.use_rel_pos:
                logits = logits + image_encoder.decomposed_rel_pos_bias(
                    q[:, :, part], self.rel_pos_h, self.rel_pos_w, (h, w), (h, w), rows=(r0, r1))
            attn = torch.softmax(logits, dim=-1)
            if self.products:
                attn = self.attn_quant(attn)
            out[:, :, part] = attn @ v
            if keep is not None:
                windows, queries = keep
                sel = queries[(queries >= part.start) & (queries < part.stop)]
                kept.append((qq[windows][:, :, sel], attn[windows][:, :, sel - part.start]))
        if keep is not None:
            windows = keep[0]
            self.samples.append((torch.cat([s[0] for s in kept], 2).clone(), kq[windows].clone(),
                                 torch.cat([s[1] for s in kept], 2).clone(), v[windows].clone()))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def _sample_plan(self, b: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Windows and, within them, query rows to keep for the search, spread from first to last
        (a stride of b // nw would pick one column of a row-major window grid)."""
        nw = min(b, max(1, self.max_rows // n))
        nq = min(n, max(1, self.max_rows * _SAMPLE_KEYS // (nw * n)))
        windows = torch.linspace(0, b - 1, nw).round().long()
        queries = torch.linspace(0, n - 1, nq).round().long()
        return windows, queries


class QPatchConv2d(QConv2d):
    """The patch-embedding QConv2d: its calibration crop is counted in output positions (patches),
    not input pixels, and aligned to the patch grid, so the weight search sees as many output rows
    as the other layers instead of a few patches."""

    def _keep(self, x):
        sh, sw = self.stride
        side = math.isqrt(max(1, self.sample_rows // x.shape[0]))
        h, w = x.shape[-2] // sh, x.shape[-1] // sw
        t, l = max(0, (h - side) // 2) * sh, max(0, (w - side) // 2) * sw
        return x.detach()[:, :, t : t + side * sh, l : l + side * sw].contiguous().clone()


def _linear(lin: nn.Linear, recipe: QuantRecipe, kind: str) -> nn.Module:
    if "linear" not in recipe.layers:
        return lin
    return QLinear(lin.weight, lin.bias, bits=recipe.weight_bits, act_bits=recipe.act_bits, act_kind=kind,
                   quantize_input=True, sample_rows=recipe.max_search_rows)


def _conv(conv: nn.Conv2d, recipe: QuantRecipe, cls=QConv2d) -> nn.Module:
    if "conv" not in recipe.layers:
        return conv
    return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, bits=recipe.weight_bits,
               act_bits=recipe.act_bits, act_kind="uniform", quantize_input=True, sample_rows=recipe.max_search_rows)


def architecture(encoder: "image_encoder.ImageEncoderViT") -> Dict:
    """ImageEncoderViT constructor arguments read back from a built encoder (recorded in saved
    files), with ``"kind": "vit"``; ``norm_eps`` and ``gelu_approximate`` stand for the norm and
    activation layer classes (the quantised encoder supports nn.LayerNorm and nn.GELU only)."""
    if not isinstance(encoder, image_encoder.ImageEncoderViT):
        raise TypeError(f"expected an ImageEncoderViT (vit_b / vit_l / vit_h) image encoder, got {type(encoder).__name__}")
    blocks = list(encoder.blocks)
    first = blocks[0]
    if type(first.norm1) is not nn.LayerNorm or type(first.mlp.act) is not nn.GELU:
        raise TypeError("QuantizedViT supports ImageEncoderViT with nn.LayerNorm norms and nn.GELU activations, got "
                        f"{type(first.norm1).__name__} and {type(first.mlp.act).__name__}")
    proj = encoder.patch_embed.proj
    embed_dim = proj.out_channels
    window_size = max(blk.window_size for blk in blocks)
    return {
        "kind": "vit",
        "img_size": encoder.img_size,
        "patch_size": proj.kernel_size[0],
        "in_chans": proj.in_channels,
        "embed_dim": embed_dim,
        "depth": len(blocks),
        "num_heads": first.attn.num_heads,
        "mlp_ratio": first.mlp.lin1.out_features / embed_dim,
        "out_chans": encoder.neck[0].out_channels,
        "qkv_bias": first.attn.qkv.bias is not None,
        "use_abs_pos": encoder.pos_embed is not None,
        "use_rel_pos": first.attn.use_rel_pos,
        "window_size": window_size,
        "global_attn_indexes": [i for i, blk in enumerate(blocks) if blk.window_size == 0] if window_size else [],
        "norm_eps": first.norm1.eps,
        "gelu_approximate": first.mlp.act.approximate,
    }


class QuantizedViT(QuantizedEncoder):
    """A ViT image encoder (vit_b / vit_l / vit_h) with simulated (fake-quant) convolutions,
    linears and attention products. Forward: Bx3xSxS float32 normalised image -> Bx(out_chans)x
    (S/16)x(S/16) float32 embedding, computed like ``ImageEncoderViT.forward`` (absolute position
    embedding, windowed and global blocks with window padding, neck).

    Built by ``quantization.calibrate`` or from a file's architecture by ``build_from_arch``.
    Before calibration every quantiser is the identity and the weights are the float ones.
    """

    def __init__(self, encoder: "image_encoder.ImageEncoderViT", recipe: QuantRecipe):
        super().__init__(encoder, recipe, architecture(encoder))

    def _substitute(self, body: nn.Module, recipe: QuantRecipe) -> None:
        _replace(body, recipe)

    attention_types = (QViTAttention,)


def _replace(body: "image_encoder.ImageEncoderViT", recipe: QuantRecipe) -> None:
    """Swap the encoder's convolutions, linears and attentions (in place) for their fake-quant forms."""
    body.patch_embed.proj = _conv(body.patch_embed.proj, recipe, QPatchConv2d)
    for blk in body.blocks:
        blk.attn = QViTAttention(blk.attn, recipe)
        blk.mlp.lin1 = _linear(blk.mlp.lin1, recipe, "uniform")
        blk.mlp.lin2 = _linear(blk.mlp.lin2, recipe, "twin_gelu")
    for i, m in enumerate(body.neck):
        if isinstance(m, nn.Conv2d):
            body.neck[i] = _conv(m, recipe)


def build_from_arch(arch: Dict, recipe: QuantRecipe) -> QuantizedViT:
    """An uncalibrated QuantizedViT of the given architecture (``architecture()``'s dict), for
    loading a saved state dict into.

    Arguments:
      arch (dict): as returned by ``architecture``; ``kind`` must be "vit" when present.
      recipe (QuantRecipe): the recipe the weights were calibrated with.

    Returns:
      (QuantizedViT): zero weight codes and identity quantisers until a state dict is loaded and
        the layers finalised.
    """
    return QuantizedViT(float_from_arch(arch), recipe)


def float_from_arch(arch: Dict) -> "image_encoder.ImageEncoderViT":
    """A float ImageEncoderViT of the given architecture (``architecture()``'s dict; ``kind``,
    when present, must be "vit"), random weights, eval mode."""
    arch = dict(arch)
    kind = arch.pop("kind", "vit")
    if kind != "vit":
        raise ValueError(f"quantization.vit rebuilds 'vit' encoders, got kind {kind!r}")
    eps, approximate = arch.pop("norm_eps"), arch.pop("gelu_approximate")
    arch["global_attn_indexes"] = tuple(arch["global_attn_indexes"])
    return image_encoder.ImageEncoderViT(norm_layer=partial(nn.LayerNorm, eps=eps),
                                         act_layer=partial(nn.GELU, approximate=approximate), **arch).eval()


__all__ = ["QPatchConv2d", "QViTAttention", "QuantizedViT", "architecture", "build_from_arch", "float_from_arch"]
