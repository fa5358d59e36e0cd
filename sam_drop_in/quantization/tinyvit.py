"""Conversion of the TinyViT (``vit_t``) image encoder into its fake-quant form."""

import json
from typing import Dict

import torch
from torch import nn

from ..modeling import tiny_vit
from .fake_quant import ActQuant, QConv2d, QLinear, QuantizedEncoder
from .recipe import QuantRecipe


class QAttention(nn.Module):
    """TinyViT window attention with both matrix products written out so that their inputs
    (q, k, the softmax output and v) can be quantised; otherwise as ``tiny_vit.Attention``."""

    def __init__(self, attn: "tiny_vit.Attention", recipe: QuantRecipe, quantize_inputs: bool, products: bool):
        super().__init__()
        self.num_heads, self.key_dim, self.d, self.dh, self.scale = attn.num_heads, attn.key_dim, attn.d, attn.dh, attn.scale
        self.norm = attn.norm
        self.qkv = _linear(attn.qkv, recipe, "uniform", quantize_inputs)
        self.proj = _linear(attn.proj, recipe, "uniform", quantize_inputs)
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        bits = recipe.act_bits
        self.products = products
        if products:
            self.q_quant = ActQuant(bits, "uniform")
            self.k_quant = ActQuant(bits, "uniform")
            self.attn_quant = ActQuant(bits, "twin_softmax")
            self.v_quant = ActQuant(bits, "uniform")
        self.observing = False
        self.samples = []
        self.max_windows = max(1, recipe.max_search_rows // 49)

    def forward(self, x):
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        if self.products:
            q, k = self.q_quant(q), self.k_quant(k)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale + bias, dim=-1)
        if self.products:
            attn, v = self.attn_quant(attn), self.v_quant(v)
            if self.observing:
                keep = slice(0, self.max_windows)
                self.samples.append(tuple(t[keep].detach().clone() for t in (q, k, attn, v)))
        out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))

    @torch.no_grad()
    def search(self, recipe: QuantRecipe) -> None:
        """Each product input's range by the MSE of the product, the other operand kept float."""
        if not self.products:
            return
        if not self.samples:
            raise RuntimeError("attention saw no calibration data")

        def pick(quant, fn, refs):
            # fn(sample, quantise) -> the product with one operand quantised; refs: float products.
            cands = quant.candidates(recipe.act_search, recipe.softmax_fine_shifts)
            errs = [sum(float((fn(s, lambda t: quant.quantize(t, p)) - ref).pow(2).mean()) for s, ref in zip(self.samples, refs))
                    for p in cands]
            quant.set_params(cands[min(range(len(errs)), key=errs.__getitem__)])

        scores = [q @ k.transpose(-2, -1) for q, k, _, _ in self.samples]
        outs = [a @ v for _, _, a, v in self.samples]
        pick(self.q_quant, lambda s, f: f(s[0]) @ s[1].transpose(-2, -1), scores)
        pick(self.k_quant, lambda s, f: s[0] @ f(s[1]).transpose(-2, -1), scores)
        pick(self.attn_quant, lambda s, f: f(s[2]) @ s[3], outs)
        pick(self.v_quant, lambda s, f: s[2] @ f(s[3]), outs)

    def finalize(self) -> None:
        self.samples = []
        self.observing = False


def _linear(lin: nn.Linear, recipe: QuantRecipe, kind: str, quantize_inputs: bool) -> nn.Module:
    if "linear" not in recipe.layers:
        return lin
    return QLinear(lin.weight, lin.bias, bits=recipe.weight_bits, act_bits=recipe.act_bits, act_kind=kind,
                   quantize_input=quantize_inputs, sample_rows=recipe.max_search_rows)


def _conv(conv: nn.Module, recipe: QuantRecipe, kind: str) -> nn.Module:
    if "conv" not in recipe.layers:
        return conv
    if isinstance(conv, tiny_vit.Conv2d_BN):
        conv = conv.fuse()  # BatchNorm folded in, as at inference: the integer weight is the folded one
    return QConv2d(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                   bits=recipe.weight_bits, act_bits=recipe.act_bits, act_kind=kind, quantize_input=True, sample_rows=recipe.max_search_rows)


def architecture(encoder: "tiny_vit.TinyViT") -> Dict:
    """TinyViT constructor arguments read back from a built encoder (recorded in saved files)."""
    if not isinstance(encoder, tiny_vit.TinyViT):
        raise TypeError(f"expected a TinyViT (vit_t) image encoder, got {type(encoder).__name__}")
    stages = encoder.layers
    first_mb = stages[0].blocks[0]
    block = stages[1].blocks[0]
    return {
        "kind": "tiny_vit",
        "img_size": encoder.img_size,
        "in_chans": encoder.patch_embed.in_chans,
        "embed_dims": [layer.dim for layer in stages],
        "depths": list(encoder.depths),
        # Stage 0 is convolutional: its heads and window size are unused placeholders.
        "num_heads": [2] + [layer.blocks[0].num_heads for layer in stages[1:]],
        "window_sizes": [7] + [layer.blocks[0].window_size for layer in stages[1:]],
        "mlp_ratio": encoder.mlp_ratio,
        "mbconv_expand_ratio": first_mb.hidden_chans / first_mb.in_chans,
        "local_conv_size": block.local_conv.c.kernel_size[0],
    }


class QuantizedTinyViT(QuantizedEncoder):
    """A TinyViT image encoder with simulated (fake-quant) convolutions, linears and attention
    products. Forward: Bx3xSxS float32 normalised image -> Bx256x(S/16)x(S/16) float32 embedding.

    Built by ``quantization.calibrate`` or ``quantization.load_quantized``.
    """

    def __init__(self, encoder: "tiny_vit.TinyViT", recipe: QuantRecipe):
        super().__init__(encoder, recipe, architecture(encoder))

    def _substitute(self, body: nn.Module, recipe: QuantRecipe) -> None:
        # The classification head is unused by SAM: dropped, not quantised, not saved.
        body.norm_head = nn.Identity()
        body.head = nn.Identity()
        _replace(body, recipe)

    attention_types = (QAttention,)


def _replace(body: nn.Module, recipe: QuantRecipe) -> None:
    """Swap every convolution, linear and attention of ``body`` (in place) for its fake-quant form.

    Inputs that come straight out of a GELU (post-GELU, twin uniform): MBConv conv2/conv3,
    PatchMerging conv2/conv3, the stem's second convolution and the MLP's fc2.
    """
    for module in list(body.modules()):
        if isinstance(module, tiny_vit.PatchEmbed):
            conv1, act, conv2 = module.seq
            module.seq = nn.Sequential(_conv(conv1, recipe, "uniform"), act, _conv(conv2, recipe, "twin_gelu"))
        elif isinstance(module, (tiny_vit.MBConv, tiny_vit.PatchMerging)):
            module.conv1 = _conv(module.conv1, recipe, "uniform")
            module.conv2 = _conv(module.conv2, recipe, "twin_gelu")
            module.conv3 = _conv(module.conv3, recipe, "twin_gelu")
        elif isinstance(module, tiny_vit.TinyViTBlock):
            module.local_conv = _conv(module.local_conv, recipe, "uniform")
            module.attn = QAttention(module.attn, recipe, quantize_inputs=True, products="attention" in recipe.layers)
        elif isinstance(module, tiny_vit.Mlp):
            module.fc1 = _linear(module.fc1, recipe, "uniform", True)
            module.fc2 = _linear(module.fc2, recipe, "twin_gelu", True)
    neck = body.neck
    for i, m in enumerate(neck):
        if isinstance(m, nn.Conv2d):
            neck[i] = _conv(m, recipe, "uniform")


def arch_json(arch: Dict) -> str:
    return json.dumps(arch, sort_keys=True)


def build_from_arch(arch: Dict, recipe: QuantRecipe) -> QuantizedTinyViT:
    """An uncalibrated QuantizedTinyViT of the given architecture (weights to be loaded); a
    missing ``kind`` means tiny_vit (files written before the ViT encoders were supported)."""
    return QuantizedTinyViT(float_from_arch(arch), recipe)


def float_from_arch(arch: Dict) -> "tiny_vit.TinyViT":
    """A float TinyViT of the given architecture (``architecture()``'s dict; ``kind``, when
    present, must be "tiny_vit"), random weights, eval mode."""
    arch = dict(arch)
    kind = arch.pop("kind", "tiny_vit")
    if kind != "tiny_vit":
        raise ValueError(f"quantization.tinyvit rebuilds 'tiny_vit' encoders, got kind {kind!r}")
    return tiny_vit.TinyViT(num_classes=0, drop_path_rate=0.0, **arch).eval()

