"""TinyViT image encoder of MobileSAM and TinySAM (``vit_t``).

Module names and state-dict keys are those of MobileSAM's ``tiny_vit_sam.py`` so that its
published checkpoints (and TinySAM's, which share the layout) load strictly, and so that code
that builds ``TinyViT(...)`` by hand with MobileSAM's keyword arguments keeps working.

Differences from the reference that do not change results:
- the attention bias table is gathered on every forward instead of being cached in a buffer
  that goes stale when the model is built in eval mode and then loaded (the reference needs a
  second ``eval()`` after loading; this module is right without it);
- attention runs through ``scaled_dot_product_attention``;
- at inference, BatchNorm is folded into its convolution, and the stage-0 blocks, the first
  merge and the token MLPs work in cache-sized pieces with GELU in place (see common.STRIP_BYTES);
- at bf16 inference on CPU the blocks hand over to ``_fast_tinyvit`` (oneDNN kernels with the
  bias, GELU and residual fused, activations kept channels-last): same mathematics, rounded to
  bf16 fewer times; that module's docstring says what differs and how it is tested.
"""

import itertools
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils import checkpoint as activation_checkpoint

from . import _fast_tinyvit, common
from .common import LayerNorm2d, activate_, attention, cache_pieces, eager_inference, in_strips, strip_rows


class Conv2d_BN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (keys ``c.*`` and ``bn.*``)."""

    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the convolution with the BatchNorm statistics folded in (inference)."""
        c, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` (with bias) computing this module's inference output: the weight
        and bias of :meth:`folded`, in new parameters on this module's device and dtype (this
        module is unchanged). MobileSAM's ``Conv2d_BN.fuse`` has the same name and result."""
        c = self.c
        weight, bias = self.folded()
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         bias=True, padding_mode=c.padding_mode, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv

    def forward(self, x):
        if self.training:
            return self.bn(self.c(x))
        # Inference: fold the BatchNorm statistics into the convolution (one pass over the
        # activations instead of two). Folded every call from the live parameters, so it can
        # never go stale after load_state_dict; distance to MobileSAM unchanged (~7e-6, tolerance 1e-4).
        c = self.c
        weight, bias = self.folded()
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


def _padded_conv(conv: Conv2d_BN):
    """``spatial`` for common.in_strips: ``conv`` (BatchNorm folded) on a strip, the strip first
    zero-padded by the rows it is given (at the image's border) and the convolution's width
    padding."""
    weight, bias = conv.folded()
    c = conv.c
    pw = c.padding[1]
    return lambda h, top, bottom: F.conv2d(F.pad(h, (pw, pw, top, bottom)), weight, bias, c.stride, 0, c.dilation,
                                           c.groups)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: Bx3xSxS -> Bx(embed_dim)x(S/4)x(S/4)."""

    def __init__(self, in_chans, embed_dim, resolution, activation):
        super().__init__()
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.patches_resolution = (size[0] // 4, size[1] // 4)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1),
            activation(),
            Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x):
        if _fast_tinyvit.applies(x, self.training, self.seq[1]):
            return _fast_tinyvit.patch_embed(self, x)
        conv1, act, conv2 = self.seq
        return conv2(activate_(act, conv1(x)))


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project), BxCxHxW."""

    def __init__(self, in_chans, out_chans, expand_ratio, activation, drop_path):
        super().__init__()
        self.in_chans = in_chans
        self.hidden_chans = int(in_chans * expand_ratio)
        self.out_chans = out_chans
        self.conv1 = Conv2d_BN(in_chans, self.hidden_chans, ks=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(self.hidden_chans, self.hidden_chans, ks=3, stride=1, pad=1, groups=self.hidden_chans)
        self.act2 = activation()
        # Zero-initialised last BN: each block starts as the identity.
        self.conv3 = Conv2d_BN(self.hidden_chans, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = activation()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        if _fast_tinyvit.applies(x, self.training, self.act1, self.act2, self.act3):
            return _fast_tinyvit.mbconv(self, x)
        if not self.training and cache_pieces():
            rows = strip_rows(x, self.hidden_chans)
            if x.shape[2] > rows and self.conv2.c.stride == (1, 1):
                return self._forward_strips(x, rows)
        shortcut = x
        # activate_: GELU in place when no gradient is recorded (fresh tensors here).
        x = activate_(self.act1, self.conv1(x))
        x = activate_(self.act2, self.conv2(x))
        x = self.drop_path(self.conv3(x))
        return activate_(self.act3, x + shortcut)

    def _forward_strips(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        (w1, b1), (w3, b3) = self.conv1.folded(), self.conv3.folded()
        return in_strips(
            x, rows, self.conv2.c,
            before=lambda part: activate_(self.act1, F.conv2d(part, w1, b1)),
            spatial=_padded_conv(self.conv2),
            after=lambda h, r0, r1: activate_(self.act3, F.conv2d(activate_(self.act2, h), w3, b3).add_(x[:, :, r0:r1])),
        )


class PatchMerging(nn.Module):
    """Downsampling between stages; input BxLxC tokens or BxCxHxW, output Bx(L')x(out_dim).

    ``stride`` is 2 except for the merge into SAM's last stage, which keeps the 64x64 grid.
    """

    def __init__(self, input_resolution, dim, out_dim, activation, stride=2):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.out_dim = out_dim
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x):
        if _fast_tinyvit.applies(x, self.training, self.act):
            return _fast_tinyvit.patch_merging(self, x)
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        rows = strip_rows(x, self.out_dim)
        if not self.training and cache_pieces() and x.shape[2] > 2 * rows:
            (w1, b1), (w3, b3) = self.conv1.folded(), self.conv3.folded()
            x = in_strips(
                x, rows, self.conv2.c,
                before=lambda part: activate_(self.act, F.conv2d(part, w1, b1)),
                spatial=_padded_conv(self.conv2),
                after=lambda h, r0, r1: F.conv2d(activate_(self.act, h), w3, b3),
            )
        else:
            x = activate_(self.act, self.conv1(x))
            x = activate_(self.act, self.conv2(x))
            x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on BxCxHxW, then an optional PatchMerging."""

    def __init__(self, dim, input_resolution, depth, activation, drop_path=0.0, downsample=None,
                 use_checkpoint=False, out_dim=None, conv_expand_ratio=4.0, downsample_stride=2):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            MBConv(dim, dim, conv_expand_ratio, activation, drop_path[i] if isinstance(drop_path, list) else drop_path)
            for i in range(depth)
        )
        self.downsample = (
            downsample(input_resolution, dim=dim, out_dim=out_dim, activation=activation, stride=downsample_stride)
            if downsample is not None
            else None
        )

    def forward(self, x):
        for blk in self.blocks:
            x = activation_checkpoint.checkpoint(blk, x, use_reentrant=False) if self.use_checkpoint else blk(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    """Pre-norm MLP of the TinyViT block (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        if self.training or not cache_pieces() or x.numel() <= common.ROW_GROUP * x.shape[-1]:
            return self.drop(self.fc2(self.drop(activate_(self.act, self.fc1(self.norm(x))))))
        return common.in_row_groups(lambda part: self.fc2(activate_(self.act, self.fc1(self.norm(part)))),
                                    x, self.fc2.out_features)


class Attention(nn.Module):
    """Window attention with a learned bias per head and per |dy|, |dx| offset.

    Input Bx(N)xC with N = resolution[0] * resolution[1]; LayerNorm is applied inside.
    """

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=(14, 14)):
        super().__init__()
        if not (isinstance(resolution, tuple) and len(resolution) == 2):
            raise ValueError(f"resolution must be a (h, w) tuple, got {resolution!r}")
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.attn_ratio = attn_ratio
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * self.nh_kd)
        self.proj = nn.Linear(self.dh, dim)

        # One learned scalar per head for each distinct (|dy|, |dx|); offsets are numbered in
        # the order they are first met scanning query-major, key-minor, as in the checkpoints.
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        n = len(points)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(n, n), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        x = self.norm(x)
        # Per head the qkv output is laid out [q (key_dim), k (key_dim), v (d)].
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # Gathered every call (a few hundred thousand floats at most): never stale.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = attention(q, k, v, bias=bias.unsqueeze(0), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Window attention, 3x3 depthwise local convolution, MLP; tokens BxLxC on an HxW grid."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, mlp_ratio=4.0, drop=0.0,
                 drop_path=0.0, local_conv_size=3, activation=nn.GELU):
        super().__init__()
        if window_size <= 0:
            raise ValueError("window_size must be greater than 0")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn = Attention(dim, dim // num_heads, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=activation, drop=drop)
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim)

    def forward(self, x):
        h, w = self.input_resolution
        b, L, c = x.shape
        if L != h * w:
            raise ValueError(f"TinyViTBlock expected {h}x{w}={h * w} tokens, got {L}")
        if _fast_tinyvit.applies(x, self.training, self.mlp.act):
            return _fast_tinyvit.tinyvit_block(self, x.contiguous())
        attn_out = common.in_windows(self.attn, x, (h, w), self.window_size)
        x = x + self.drop_path(attn_out)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.view(b, c, L).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, mlp_ratio={self.mlp_ratio}")


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on BxLxC tokens, then an optional PatchMerging."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0, drop=0.0,
                 drop_path=0.0, downsample=None, use_checkpoint=False, local_conv_size=3,
                 activation=nn.GELU, out_dim=None, downsample_stride=2):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, drop=drop,
                         drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                         local_conv_size=local_conv_size, activation=activation)
            for i in range(depth)
        )
        self.downsample = (
            downsample(input_resolution, dim=dim, out_dim=out_dim, activation=activation, stride=downsample_stride)
            if downsample is not None
            else None
        )

    def forward(self, x):
        for blk in self.blocks:
            x = activation_checkpoint.checkpoint(blk, x, use_reentrant=False) if self.use_checkpoint else blk(x)
        return self.downsample(x) if self.downsample is not None else x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"


class TinyViT(nn.Module):
    """TinyViT-5M adapted to SAM: Bx3x1024x1024 normalised image -> Bx256x64x64 embedding.

    Arguments (MobileSAM's, so that hand-built models keep working):
      img_size (int): input side (1024 for SAM). in_chans (int): 3.
      num_classes (int): size of the unused classification head kept for checkpoint compatibility.
      embed_dims, depths, num_heads, window_sizes (lists of 4): per-stage width, blocks, heads, window.
      mlp_ratio, drop_rate, drop_path_rate: MLP ratio, dropout, stochastic depth (training only).
      use_checkpoint (bool): activation checkpointing while training.
      mbconv_expand_ratio (float), local_conv_size (int): stage-0 expansion and local conv kernel.
      layer_lr_decay (float): sets ``lr_scale`` on parameters, for layer-wise learning-rate decay.
    """

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dims=[96, 192, 384, 768],
                 depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                 drop_rate=0.0, drop_path_rate=0.1, use_checkpoint=False, mbconv_expand_ratio=4.0,
                 local_conv_size=3, layer_lr_decay=1.0):
        super().__init__()
        self.img_size = img_size
        self.num_classes = num_classes
        self.depths = list(depths)
        self.num_layers = len(depths)
        self.mlp_ratio = mlp_ratio
        activation = nn.GELU

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dims[0], resolution=img_size,
                                      activation=activation)
        res = self.patch_embed.patches_resolution
        self.patches_resolution = res
        # Stochastic depth rising linearly over blocks (plain floats: works on the meta device).
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        # Stages run at S/4, S/8, S/16, S/16: the merge into the last stage keeps the resolution
        # so that the embedding is S/16 like SAM's ViT.
        self.layers = nn.ModuleList()
        last = self.num_layers - 1
        for i in range(self.num_layers):
            scale = 2 ** min(i, last - 1)
            kwargs = dict(
                dim=embed_dims[i],
                input_resolution=(res[0] // scale, res[1] // scale),
                depth=depths[i],
                drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])],
                downsample=PatchMerging if i < last else None,
                downsample_stride=1 if i == last - 1 else 2,
                use_checkpoint=use_checkpoint,
                out_dim=embed_dims[min(i + 1, last)],
                activation=activation,
            )
            if i == 0:
                layer = ConvLayer(conv_expand_ratio=mbconv_expand_ratio, **kwargs)
            else:
                layer = BasicLayer(num_heads=num_heads[i], window_size=window_sizes[i], mlp_ratio=mlp_ratio,
                                   drop=drop_rate, local_conv_size=local_conv_size, **kwargs)
            self.layers.append(layer)
        self.out_resolution = self.layers[-1].input_resolution

        # Classification head of the ImageNet TinyViT: unused by SAM, kept so checkpoints load.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        self.set_layer_lr_decay(layer_lr_decay)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def set_layer_lr_decay(self, layer_lr_decay: float) -> None:
        """Attach ``lr_scale`` = decay ** (distance from the last block) to every parameter."""
        depth = sum(self.depths)
        scales = [layer_lr_decay ** (depth - i - 1) for i in range(depth)]

        def _set(module, scale):
            for p in module.parameters():
                p.lr_scale = scale

        _set(self.patch_embed, scales[0])
        i = 0
        for layer in self.layers:
            for block in layer.blocks:
                _set(block, scales[i])
                i += 1
            if layer.downsample is not None:
                _set(layer.downsample, scales[i - 1])
        _set(self.norm_head, scales[-1])
        _set(self.head, scales[-1])

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"attention_biases"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # At inference the convolutional stem and stage 0 run ~15% faster on CPU in channels-last
        # layout (later stages work on token tensors and are unaffected). Not in training mode:
        # CPU BatchNorm with batch statistics is far less accurate on channels-last float32
        # (1e-2 against float64 instead of 1e-5), and that error would reach outputs and gradients.
        if not self.training and eager_inference():
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        h, w = self.out_resolution
        x = x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        if _fast_tinyvit.applies(x, self.training) and _fast_tinyvit.is_sam_neck(self.neck):
            return _fast_tinyvit.neck(self.neck, x)
        return self.neck(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Bx3xSxS normalised image -> Bx256x(S/16)x(S/16) image embedding."""
        return self.forward_features(x)
