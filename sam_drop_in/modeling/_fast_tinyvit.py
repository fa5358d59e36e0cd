"""Fused inference path of the TinyViT encoder (``vit_t``) for reduced precision on CPU.

The modules in ``tiny_vit.py`` call these functions instead of their own forward when
:func:`applies` holds: eager inference (no gradient, eval mode, not tracing or compiling) on a
CPU tensor in bfloat16. With bf16 matrix units (AMX, AVX-512 BF16) the matrix products are
nearly free and the encoder's time goes to passes over memory; this path makes fewer of them.
It computes the same mathematics as the reference forward, differently in these ways:

- Convolutions and linear layers run through oneDNN's fused primitives (the ones Inductor uses
  with freezing): the bias, the GELU that follows, and the residual add are applied to each
  output tile while it is in registers, instead of by separate passes (``addmm`` also copies the
  bias into its output before the product). The sum is rounded to bf16 once instead of once
  per step.
- Activations stay token-major / channels-last: a token tensor (B, H*W, C) viewed as
  (B, H, W, C).permute(0, 3, 1, 2) *is* a channels-last NCHW tensor, so the depthwise local
  convolution reads and writes tokens directly (oneDNN's NHWC depthwise kernels), with no
  NCHW copy before it and no transpose copy after it.
- The window-attention residual is added in window layout by the output projection's epilogue,
  so windows are un-partitioned once (reference: un-partition, then add).
- BatchNorm is folded into each convolution, and the attention-bias table is gathered once per
  weights version and dtype and kept (:func:`attention_bias`).
- Stage 0's MBConv blocks and the first merge run in strips of rows (``common.in_strips``, see
  :data:`STRIP_BYTES`): the 32 MB hidden tensors at 1024 px become 8 MB strips that stay in cache
  and, being under glibc's 32 MB mmap threshold, are not mapped fresh from the system (page
  faults) at every call.

Proof of equality: every output element is the same function of the same inputs; only rounding
differs (fp32 accumulation everywhere, bf16 rounding at fewer points than the reference). Tests
(tests/test_fast_tinyvit.py) run this path in fp32 too, where oneDNN's fused ops run on every
x86 CPU, against the reference path at K * eps (a reordering bound), and in bf16 require it to be
no farther from the fp32 encoder than the reference bf16 path is.

Where oneDNN cannot run bf16 (CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, or a build
without oneDNN) the same layout is kept and the fused steps are done by plain PyTorch ops
(:func:`_onednn` is False); tests force that branch on every CPU.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, eager_inference, in_strips, in_windows, strip_rows

# ENABLED = False runs the reference path everywhere (tests and benchmarks compare the two in
# one process); USE_ONEDNN = False runs this path's plain-PyTorch branch on a CPU where oneDNN
# could run (tests).
ENABLED = True
USE_ONEDNN = True

# Strips of stage 0 (and the first merge) of this many bytes of hidden activations, at every
# thread count (unlike the float32 reference path's pieces, common.cache_pieces: one thread only).
# Measured on the AMX machine, bf16 vit_t encoder at 1024 px, whole feature map / strips, medians
# of 9 alternating calls in one process: 2 threads quiet 1.15x (4 MB strips 1.17x), 2 threads with
# the second core kept busy by a pinned loop 1.07x (4 MB strips 0.99x: more parallel regions to
# wait in), 1 thread 1.16x (4 MB); outputs bit-identical. More than 2 threads: not measured (the
# regions added are a few dozen per image). A value of 1 << 40 turns strips off (tests).
STRIP_BYTES = 8 << 20


def applies(x: torch.Tensor, training: bool, *activations: nn.Module) -> bool:
    """Whether a TinyViT module takes this fused path for input ``x``: bf16 on CPU, eager
    inference (see ``common.eager_inference``), module in eval mode, and its ``activations``
    exact GELUs (the fused kernels apply erf-GELU; a module built with another activation keeps
    its own forward)."""
    return (ENABLED and not training and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and all(type(a) is nn.GELU and a.approximate == "none" for a in activations) and eager_inference())


# The fused primitives are PyTorch-internal ops (Inductor's lowering targets, present since torch
# 2.0 on oneDNN builds); a build or a future release without them takes the plain-PyTorch branch.
_FUSED_OPS = ("_linear_pointwise", "_convolution_pointwise", "_is_mkldnn_bf16_supported")


def _onednn(x: torch.Tensor) -> bool:
    if not (USE_ONEDNN and torch.backends.mkldnn.is_available()
            and all(hasattr(torch.ops.mkldnn, name) for name in _FUSED_OPS)):
        return False
    if x.dtype == torch.bfloat16:
        # oneDNN's bf16 primitives refuse CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT.
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool = False,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias``, then GELU (``gelu``) or ``+ residual`` (same shape as the output),
    in one pass over the output. x: ... x in_features, contiguous."""
    flat = x.reshape(-1, x.shape[-1])
    out_shape = (*x.shape[:-1], weight.shape[0])
    if _onednn(x):
        if residual is not None:
            y = torch.ops.mkldnn._linear_pointwise.binary(flat, residual.reshape(flat.shape[0], -1), weight, bias, "add")
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        return y.view(out_shape)
    y = F.linear(flat, weight, bias)
    if gelu:
        y = torch.ops.aten.gelu_(y)
    if residual is not None:
        y = y.add_(residual.reshape(y.shape))
    return y.view(out_shape)


def folded(module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``module.folded()`` of a ``Conv2d_BN``, computed once and kept until one of its
    parameters or statistics changes (see _cached): folding costs a
    handful of small kernels per convolution per call otherwise."""
    tensors = (module.c.weight, module.bn.weight, module.bn.bias, module.bn.running_mean, module.bn.running_var)
    return _cached(module, "_fast_folded", tensors, module.folded)


def _cached(module: nn.Module, name: str, sources: Tuple[torch.Tensor, ...], compute):
    """``compute()``, kept in ``module.__dict__[name]`` (not a buffer: out of state_dict and
    ``.to()``) while ``sources`` are the same tensor objects at the same version counters: a
    ``load_state_dict`` (in-place copy), ``.to()`` / ``assign=True`` (new tensors) or any in-place
    change makes the next call compute it again."""
    versions = tuple(t._version for t in sources)
    cached = module.__dict__.get(name)
    if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], sources)):
        with torch.no_grad():
            cached = (sources, versions, compute())
        module.__dict__[name] = cached
    return cached[2]


def conv(x: torch.Tensor, module, gelu: bool = False, residual: Optional[torch.Tensor] = None,
         padding: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``Conv2d_BN`` ``module`` at inference (BatchNorm folded) on channels-last ``x``, then
    ``+ residual`` and/or GELU (in that order), in one pass over the output; channels-last out.
    ``padding`` (rows, columns) replaces the convolution's own (strips pad rows themselves)."""
    c = module.c
    padding = c.padding if padding is None else padding
    weight, bias = folded(module)
    x = x.contiguous(memory_format=torch.channels_last)
    if _onednn(x):
        args = (list(padding), list(c.stride), list(c.dilation), c.groups)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
            # oneDNN fuses only ReLU after a binary post-op: the GELU is a separate in-place pass.
            y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args, "add", None,
                                                               None, [], None)
            return torch.ops.aten.gelu_(y) if gelu else y
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "gelu" if gelu else "none", [],
                                                       "none" if gelu else "")
    y = F.conv2d(x, weight, bias, c.stride, padding, c.dilation, c.groups)
    if residual is not None:
        y = y.add_(residual)
    return torch.ops.aten.gelu_(y) if gelu else y


def attention_bias(attn) -> torch.Tensor:
    """The per-head (heads x N x N) bias table of ``tiny_vit.Attention`` ``attn``, gathered from
    ``attention_biases`` once and kept until those weights change (see _cached)."""
    p, idxs = attn.attention_biases, attn.attention_bias_idxs
    return _cached(attn, "_fast_bias", (p, idxs), lambda: p[:, idxs].unsqueeze(0))


def _strip_conv(module, gelu: bool):
    """``spatial`` for common.in_strips: the fused ``conv`` of ``module`` on a strip, with the
    strip's border rows added as zeros and the convolution's own padding kept for the width."""
    def spatial(h, top, bottom):
        if top or bottom:
            h = F.pad(h, (0, 0, top, bottom))
        return conv(h, module, gelu=gelu, padding=(0, module.c.padding[1]))
    return spatial


def mbconv(block, x: torch.Tensor) -> torch.Tensor:
    """``tiny_vit.MBConv`` at inference: three fused convolutions, the last with the residual.
    In strips of rows when the 4x-wide hidden tensor is larger than STRIP_BYTES (stage 0): the
    same operations on the same values, the hidden strips cache-sized."""
    rows = strip_rows(x, block.hidden_chans, STRIP_BYTES)
    if x.shape[2] > rows and block.conv2.c.stride == (1, 1):
        return in_strips(x, rows, block.conv2.c,
                         before=lambda part: conv(part, block.conv1, gelu=True),
                         spatial=_strip_conv(block.conv2, gelu=True),
                         after=lambda h, r0, r1: conv(h, block.conv3, gelu=True, residual=x[:, :, r0:r1]))
    h = conv(x, block.conv1, gelu=True)
    h = conv(h, block.conv2, gelu=True)
    return conv(h, block.conv3, gelu=True, residual=x)


def patch_embed(embed, x: torch.Tensor) -> torch.Tensor:
    conv1, _, conv2 = embed.seq
    return conv(conv(x, conv1, gelu=True), conv2)


def patch_merging(merge, x: torch.Tensor) -> torch.Tensor:
    """``tiny_vit.PatchMerging`` at inference: tokens (or channels-last NCHW) in, tokens out."""
    if x.ndim == 3:
        h, w = merge.input_resolution
        x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # channels-last view of the tokens
    rows = strip_rows(x, merge.out_dim, STRIP_BYTES)
    if x.shape[2] > 2 * rows:  # the first merge (stride 2: output rows are half the input's)
        x = in_strips(x, rows, merge.conv2.c,
                      before=lambda part: conv(part, merge.conv1, gelu=True),
                      spatial=_strip_conv(merge.conv2, gelu=True),
                      after=lambda h, r0, r1: conv(h, merge.conv3))
    else:
        x = conv(x, merge.conv1, gelu=True)
        x = conv(x, merge.conv2, gelu=True)
        x = conv(x, merge.conv3)
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])  # a view: x is channels-last


def tinyvit_block(block, x: torch.Tensor) -> torch.Tensor:
    """``tiny_vit.TinyViTBlock`` at inference on tokens x (B, H*W, C), contiguous."""
    h, w = block.input_resolution
    b, L, c = x.shape
    x = in_windows(lambda t: _window_attention(block.attn, t, residual=True), x, (h, w), block.window_size)
    # The local convolution on a channels-last view of the tokens; its output is tokens again.
    y = conv(x.view(b, h, w, c).permute(0, 3, 1, 2), block.local_conv)
    x = y.permute(0, 2, 3, 1).reshape(b, L, c)
    mlp = block.mlp
    hidden = F.layer_norm(x, mlp.norm.normalized_shape, mlp.norm.weight, mlp.norm.bias, mlp.norm.eps)
    hidden = linear(hidden, mlp.fc1.weight, mlp.fc1.bias, gelu=True)
    return linear(hidden, mlp.fc2.weight, mlp.fc2.bias, residual=x)


def _window_attention(attn, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """``attn(x)`` (+ x when ``residual``) for windows x (B', N, C)."""
    b, n, _ = x.shape
    y = F.layer_norm(x, attn.norm.normalized_shape, attn.norm.weight, attn.norm.bias, attn.norm.eps)
    q, k, v = linear(y, attn.qkv.weight, attn.qkv.bias).view(b, n, attn.num_heads, -1).split(
        [attn.key_dim, attn.key_dim, attn.d], dim=3)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attention_bias(attn).to(q.dtype), scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, n, attn.dh)
    return linear(out, attn.proj.weight, attn.proj.bias, residual=x if residual else None)


def is_sam_neck(neck_seq) -> bool:
    """Whether ``neck_seq`` is the neck TinyViT builds (a model may replace it)."""

    kinds = [type(m) for m in neck_seq] if isinstance(neck_seq, nn.Sequential) else []
    return kinds == [nn.Conv2d, LayerNorm2d, nn.Conv2d, LayerNorm2d] and neck_seq[0].bias is None \
        and neck_seq[2].bias is None


def neck(neck_seq, x: torch.Tensor) -> torch.Tensor:
    """The encoder's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) on channels-last x:
    the channel LayerNorms as one ``layer_norm`` over the last axis of the (B, H, W, C) view
    (the reference computes mean, variance and the affine map in separate passes). Returns a
    contiguous NCHW tensor, as the reference does."""
    conv1, norm1, conv2, norm2 = neck_seq

    def norm(y, ln):
        z = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), ln.weight, ln.bias, ln.eps)
        return z.permute(0, 3, 1, 2)

    y = norm(conv1(x.contiguous(memory_format=torch.channels_last)), norm1)
    return norm(conv2(y).contiguous(memory_format=torch.channels_last), norm2).contiguous()
