from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn


class MLPBlock(nn.Module):
    """Two linear layers with an activation between: the ViT and two-way transformer MLP."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cache_pieces() or x.numel() <= ROW_GROUP * x.shape[-1]:
            return self.lin2(activate_(self.act, self.lin1(x)))
        # Inference on many tokens (ViT: 4096-4900 per image): groups of rows keep the 4x-wide
        # hidden activations in cache (vit_b block MLP 277 -> 234 ms on 2 cores), same values.
        return in_row_groups(lambda part: self.lin2(activate_(self.act, self.lin1(part))), x, self.lin2.out_features)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a BxCxHxW tensor (parameters ``weight``, ``bias``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Biased variance over channels, as in SAM's checkpoints' training code.
        mean = x.mean(1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(1, keepdim=True)
        x = centred * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias=None, scale=None) -> torch.Tensor:
    """Softmax attention through PyTorch's fused kernel. q: ...xLxE, k: ...xSxE, v: ...xSxEv."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def eager_inference() -> bool:
    """True when running eagerly without recording gradients: the only time the cache-sized
    piecewise paths are taken. They loop over sizes known when the code runs, so a graph traced
    for export or compilation would bake those sizes in (a dynamic batch would then be wrong)."""
    # is_compiling() first: under torch.compile the other checks are not traceable by Dynamo
    # (each would be a graph break), and the answer is already known.
    return not (
        torch.compiler.is_compiling()
        or torch.is_grad_enabled()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


# The encoders' cache-sized piecewise paths (strips, row groups) run only with at most this many
# intra-op threads. Each operation on a piece is a parallel region that ends when its slowest
# thread does; pieces multiply the regions (about 5x in TinyViT at 1024 px). On one thread there
# are no regions and the pieces' cache reuse is pure gain. With two threads, as soon as another
# process holds one core, every region waits for the thread that shares it. vit_t set_image on
# 2 threads, x faster than MobileSAM in one run (shared machine, load average 13-14): pieces
# 0.85x, whole-tensor ops 1.64x; with a busy loop pinned to the second core as well, pieces
# 0.68x, whole-tensor ops 1.56x (docs/speed.md). Whole-tensor ops keep the folded BatchNorm
# and in-place GELU.
PIECES_MAX_THREADS = 1


def cache_pieces() -> bool:
    """Whether the encoders' cache-sized piecewise inference paths run: when eager_inference()
    holds and torch uses at most PIECES_MAX_THREADS intra-op threads."""
    # eager_inference() first: torch.get_num_threads() breaks a torch.compile graph.
    return eager_inference() and torch.get_num_threads() <= PIECES_MAX_THREADS


def activate_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, overwriting ``x`` when ``act`` is a plain GELU and no gradient is recorded:
    at inference this saves allocating (and the kernel zeroing) a fresh buffer per activation,
    which on large tensors costs as much as the GELU itself."""
    if type(act) is nn.GELU and not torch.is_grad_enabled():
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


# Rows (tokens) per group for per-token computations at inference; see in_row_groups.
ROW_GROUP = 2048


def in_row_groups(fn, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """``fn`` (row-wise: each output row depends only on its input row) applied to ROW_GROUP rows
    of ``x`` (... x C) at a time, so that its intermediates stay in cache; returns ... x out_features.
    Each row meets the same kernels as in one call on the whole tensor."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], out_features)
    for i in range(0, flat.shape[0], ROW_GROUP):
        out[i : i + ROW_GROUP] = fn(flat[i : i + ROW_GROUP])
    return out.view(*x.shape[:-1], out_features)


# Inference on one thread (cache_pieces) works on pieces whose intermediates stay in cache:
# TinyViT's stage-0 blocks and first merge in strips of rows (their 4x-expanded hidden tensor is
# 64 MB in fp32, 32 MB in bf16 at 1024 px), the token MLPs in groups of ROW_GROUP tokens.
# Every output value is computed from the same inputs by the same kernels, and the results are
# bit-identical to the whole-image computation (tested; strips of 1-2 rows made oneDNN pick other
# kernels, ~5e-6 apart, hence the minimum). Measured on 2 cores: an fp32 MBConv block 189 -> 85 ms,
# a stage-1 MLP 66 -> 39 ms. (The fused bf16 path has its own strip size and rule:
# _fast_tinyvit.STRIP_BYTES.)
STRIP_BYTES = 4 << 20
MIN_STRIP_ROWS = 8


def strip_rows(x: torch.Tensor, channels: int, strip_bytes: Optional[int] = None) -> int:
    """Rows per strip so that a strip of ``channels`` channels at x's batch, width and dtype is
    ``strip_bytes`` (default STRIP_BYTES). x: B x C x H x W."""
    size = STRIP_BYTES if strip_bytes is None else strip_bytes
    return max(MIN_STRIP_ROWS, size // (x.element_size() * x.shape[0] * x.shape[3] * channels))


def in_strips(x: torch.Tensor, rows: int, conv: nn.Conv2d, before, spatial, after) -> torch.Tensor:
    """
    ``after(spatial(before(x)))`` at inference, computed in strips of ``rows`` output rows, where
    ``before`` and ``after`` work pixel by pixel and ``spatial`` is the one k x k, stride-s
    convolution, of the geometry of ``conv`` (only its kernel size, stride and padding are read):
    each strip reads the input rows its kernel window covers, and zero rows are added only at the
    image's own border, so every output value is what the whole-image computation gives.

    ``spatial(h, top, bottom)`` convolves strip h after adding ``top`` / ``bottom`` zero rows
    (non-zero only for the first / last strip) and the convolution's own width padding, with no
    other row padding. ``after(h, r0, r1)`` receives the convolved strip of output rows r0..r1.
    x: B x C x H x W (any memory format); the output keeps the pieces' layout (channels-last
    pieces give a channels-last tensor).
    """
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    height = x.shape[2]
    out_h = (height + 2 * p - k) // s + 1
    out = None
    for r0 in range(0, out_h, rows):
        r1 = min(out_h, r0 + rows)
        a, b = r0 * s - p, (r1 - 1) * s - p + k  # input rows read, before clipping to the image
        h = before(x[:, :, max(a, 0) : min(b, height)])
        piece = after(spatial(h, max(-a, 0), max(b - height, 0)), r0, r1)
        if out is None:
            channels_last = piece.is_contiguous(memory_format=torch.channels_last) and not piece.is_contiguous()
            out = torch.empty((piece.shape[0], piece.shape[1], out_h, piece.shape[3]), dtype=piece.dtype,
                              device=piece.device,
                              memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out[:, :, r0:r1] = piece
    return out


def in_windows(fn, x: torch.Tensor, size, window: int) -> torch.Tensor:
    """``fn`` applied to tokens x (B, H*W, C) on an H x W grid (``size``), cut into window x window
    windows (B * windows, window * window, C), the grid zero-padded at the bottom and right to
    whole windows first (the padded tokens take part as keys, as in the trained model). Returns
    the tokens (B, H*W, C) of fn's output, padding dropped. A grid of exactly one window is
    passed to ``fn`` as it is."""
    h, w = size
    b, n, c = x.shape
    if h == window and w == window:
        return fn(x)
    grid = x.view(b, h, w, c)
    pad_b, pad_r = (window - h % window) % window, (window - w % window) % window
    if pad_b or pad_r:
        grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // window, (w + pad_r) // window
    windows = grid.view(b, nh, window, nw, window, c).transpose(2, 3).reshape(b * nh * nw, window * window, c)
    out = fn(windows)
    grid = out.view(b, nh, nw, window, window, c).transpose(2, 3).reshape(b, h + pad_b, w + pad_r, c)
    return grid[:, :h, :w].reshape(b, n, c)
