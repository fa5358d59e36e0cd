"""SAM's two-way transformer (tokens <-> image), with the same state-dict keys as upstream.

The image side may have batch 1 while the prompts have batch B: the image tokens' projections
are then computed once for all prompts instead of once per prompt copy. That is the common case
(every prompt of one image without a mask input shares image embedding, dense embedding and
positional encoding), and the arithmetic per prompt is the same as upstream's.
"""

from typing import Tuple, Type

import torch
from torch import Tensor, nn

from .common import MLPBlock, attention


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        """
        Arguments:
          depth (int): number of two-way attention blocks.
          embedding_dim (int): channel width of tokens and image embedding.
          num_heads (int): attention heads (must divide the attention's internal width).
          mlp_dim (int): hidden width of the token MLP.
          activation (nn.Module): activation of the token MLP.
          attention_downsample_rate (int): internal width divisor of the cross attentions.
        """
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Arguments:
          image_embedding (torch.Tensor): B' x C x H x W, with B' = B or 1 (shared by every prompt).
          image_pe (torch.Tensor): 1 x C x H x W (or B' x C x H x W) positional encoding.
          point_embedding (torch.Tensor): B x N_tokens x C.

        Returns:
          (torch.Tensor): processed tokens, B x N_tokens x C.
          (torch.Tensor): processed image tokens, B x HW x C.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        if keys.shape[0] != queries.shape[0]:  # depth 0 with a shared image side
            keys = keys.expand(queries.shape[0], -1, -1)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, token MLP, image->token (four LayerNorms)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        # From here on the image side differs per prompt (keys: B x HW x C).
        attn_out = self.cross_attn_image_to_token(q=k, k=queries + query_pe, v=queries)
        keys = self.norm4(keys + attn_out)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention with an optional internal width reduction (downsample_rate).

    ``q`` and ``k``/``v`` may differ in batch size when one side is shared (batch 1): the shared
    side is projected once.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate.")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B x heads x N x c

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, h, n, c = x.shape
        return x.transpose(1, 2).reshape(b, n, h * c)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self.q_proj(q)
        k = self.k_proj(k)
        v = self.v_proj(v)
        bq, nq, _ = q.shape
        bk = k.shape[0]
        if bk == 1 and bq > 1:
            # Shared keys: fold the prompt batch into the query axis. Each query row's softmax
            # runs over the same keys as before, so this is one large attention, same maths.
            out = attention(self._separate_heads(q.reshape(1, bq * nq, -1)), self._separate_heads(k),
                            self._separate_heads(v))
            return self.out_proj(self._recombine_heads(out).reshape(bq, nq, -1))
        if bq == 1 and bk > 1:
            q = q.expand(bk, -1, -1)
        out = attention(self._separate_heads(q), self._separate_heads(k), self._separate_heads(v))
        return self.out_proj(self._recombine_heads(out))
