"""SAM's two-way transformer (prompt tokens <-> image tokens), as upstream writes it.

Same classes, state-dict keys and mathematics as segment_anything's. At inference the mask
decoder runs the same mathematics in another arrangement (``_fast_decoder.py``); this module is
the reference it is tested against and the path taken for training, export and compilation.
"""

from typing import Tuple, Type

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
        A transformer decoder that attends to an image with prompt tokens as queries.

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
          image_embedding (torch.Tensor): B x C x H x W image to attend to.
          image_pe (torch.Tensor): positional encoding, the shape of ``image_embedding``.
          point_embedding (torch.Tensor): B x N_tokens x C prompt tokens (their own positional
            encoding: added to the queries in every attention).

        Returns:
          (torch.Tensor): processed prompt tokens, B x N_tokens x C.
          (torch.Tensor): processed image tokens, B x HW x C.
        """
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)  # B x HW x C
        image_pe = image_pe.flatten(2).permute(0, 2, 1)

        queries = point_embedding
        keys = image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)

        q = queries + point_embedding
        k = keys + image_pe
        attn_out = self.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm_final_attn(queries)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        """
        Four layers: (1) self-attention of the prompt tokens, (2) token->image cross attention,
        (3) MLP on the tokens, (4) image->token cross attention; each followed by a LayerNorm.

        Arguments:
          embedding_dim (int): channel width of the embeddings.
          num_heads (int): heads of every attention layer.
          mlp_dim (int): hidden width of the MLP.
          activation (nn.Module): activation of the MLP.
          attention_downsample_rate (int): internal width divisor of the cross attentions.
          skip_first_layer_pe (bool): the first block's self-attention sees no positional
            encoding and has no residual connection.
        """
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
        """
        Arguments:
          queries (torch.Tensor): B x N_tokens x C prompt tokens; query_pe the same shape.
          keys (torch.Tensor): B x HW x C image tokens; key_pe B x HW x C (or 1 x HW x C).

        Returns:
          (torch.Tensor, torch.Tensor): the updated queries and keys, shapes unchanged.
        """
        # Self-attention of the tokens.
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            attn_out = self.self_attn(q=q, k=q, v=queries)
            queries = queries + attn_out
        queries = self.norm1(queries)

        # Tokens attend to the image.
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm2(queries)

        # MLP on the tokens.
        mlp_out = self.mlp(queries)
        queries = queries + mlp_out
        queries = self.norm3(queries)

        # The image attends to the tokens.
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = keys + attn_out
        keys = self.norm4(keys)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose internal width may be reduced (``downsample_rate``) after the
    query, key and value projections."""

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

    def _separate_heads(self, x: Tensor, num_heads: int) -> Tensor:
        b, n, c = x.shape
        x = x.reshape(b, n, num_heads, c // num_heads)
        return x.transpose(1, 2)  # B x heads x N x C_per_head

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, n_heads, n_tokens, c_per_head = x.shape
        x = x.transpose(1, 2)
        return x.reshape(b, n_tokens, n_heads * c_per_head)  # B x N x C

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self.q_proj(q)
        k = self.k_proj(k)
        v = self.v_proj(v)

        q = self._separate_heads(q, self.num_heads)
        k = self._separate_heads(k, self.num_heads)
        v = self._separate_heads(v, self.num_heads)

        # softmax(q k^T / sqrt(C_per_head)) v, in PyTorch's fused kernel.
        out = attention(q, k, v)
        out = self._recombine_heads(out)
        return self.out_proj(out)
