from typing import Type

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
        return self.lin2(self.act(self.lin1(x)))


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


def activate_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, overwriting ``x`` when ``act`` is a plain GELU and no gradient is recorded:
    at inference this saves allocating (and the kernel zeroing) a fresh buffer per activation,
    which on large tensors costs as much as the GELU itself."""
    if type(act) is nn.GELU and not torch.is_grad_enabled():
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)
