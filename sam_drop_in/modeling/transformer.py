"""SAM's two-way transformer (tokens <-> image), with the same state-dict keys as upstream.

Same mathematics as upstream, arranged for speed (results differ only by float rounding):

- The image side is kept token-major and contiguous (B x HW x C); upstream's transposed views
  made every add and projection stride through memory.
- Every projection of image tokens ``(keys + pe) @ W.T + b`` is split into ``keys @ W.T`` plus a
  prompt-independent term ``pe @ W.T + b``. The image tokens' three projections of a layer
  (token->image keys and values, image->token queries) then share one matrix product, and the
  positional terms are computed once per image (:meth:`TwoWayTransformer.prepare_image`).
- In the first layer the image tokens are the same for every prompt without a mask input, so their
  projections are part of the per-image work too; a caller that keeps the result
  (:class:`ImageSide`) pays for them once per image instead of once per call or per prompt.
- Image->token attention has a handful of keys (the prompt tokens). It is computed as two dense
  matrix products with a block-diagonal key matrix (one block per head) and the value and output
  projections folded together, instead of a fused kernel that is slow for so few keys.
- Token->image attention after the first layer (image tokens now differ per prompt) has a
  handful of queries: the queries are moved through the key projection instead of projecting
  4096 image tokens to keys and values (:meth:`Attention.attend_image`), about half the work.
- Prompts sharing an image are decoded a few at a time so that each one's image-side tensors
  (4 MB each) stay in cache.
"""

from typing import List, NamedTuple, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .common import MLPBlock, attention, eager_inference

# Prompts decoded together when they share the image side. Measured on a 2-core CPU with a 32 MB
# L3, whole decoder per prompt, groups of 1/2/4/8: 33.6/31.5/39.7/43.5 ms for 16 prompts and
# 35.4/30.8/32.2/39.8 ms for 64; larger groups spill the cache.
PROMPT_CHUNK = 2


def _weight(linear: nn.Module) -> Tensor:
    """A linear layer's float weight, also for dynamically quantised layers (int8 mode), whose
    ``weight`` is a method returning a quantised tensor: the fast paths below then compute with
    the dequantised weights (weight-only int8) instead of calling the layer."""
    w = linear.weight
    if callable(w):
        w = w()
    return w.dequantize() if w.is_quantized else w


def _bias(linear: nn.Module) -> Tensor:
    b = linear.bias
    return b() if callable(b) else b


def _project(x: Tensor, linears: List[nn.Module], bias: Tensor) -> Tensor:
    """``x`` (B x N x C) through several linear layers at once, side by side in one product, plus
    ``bias`` (broadcast to B x N x sum of widths: the layers' biases and any positional term)."""
    weight = torch.cat([_weight(linear) for linear in linears]) if len(linears) > 1 else _weight(linears[0])
    return torch.matmul(x, weight.t()).add_(bias)


class ImageSide(NamedTuple):
    """Prompt-independent work of a :class:`TwoWayTransformer` for one image side.

    keys: B' x HW x C image tokens (B' = 1 when shared by every prompt).
    first: B' x HW x 3Ci projections of ``keys`` for layer 0 (token->image keys, values;
        image->token queries), or None when the transformer has no layers.
    biases: per layer 1.., 1 x HW x 3Ci: positional term plus bias of the same projections.
    final_bias: 1 x HW x 2Ci, the same for the final token->image attention's keys and values.
    """

    keys: Tensor
    first: Optional[Tensor]
    biases: List[Tensor]
    final_bias: Tensor


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

    def prepare_image(self, image_embedding: Tensor, image_pe: Tensor) -> ImageSide:
        """
        The work that does not depend on the prompts.

        Arguments:
          image_embedding (torch.Tensor): B' x C x H x W image embedding (plus dense prompt
            embedding); B' = 1 when every prompt shares it.
          image_pe (torch.Tensor): 1 x C x H x W positional encoding.

        Returns:
          (ImageSide): reusable for any prompts on this image side, as long as the weights and
            these inputs do not change.
        """
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        biases = [layer.image_bias(pe) for layer in self.layers]
        final_bias = self.final_attn_token_to_image.keys_values_bias(pe)
        first = self.layers[0].project_image(keys, biases[0]) if self.depth else None
        return ImageSide(keys=keys, first=first, biases=biases[1:], final_bias=final_bias)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor, *, image_side: Optional[ImageSide] = None
    ) -> Tuple[Tensor, Tensor]:
        """
        Arguments:
          image_embedding (torch.Tensor): B' x C x H x W, with B' = B or 1 (shared by every prompt).
          image_pe (torch.Tensor): 1 x C x H x W (or B' x C x H x W) positional encoding.
          point_embedding (torch.Tensor): B x N_tokens x C.
          image_side (ImageSide or None): :meth:`prepare_image` of these two inputs, computed
            earlier; computed here when None.

        Returns:
          (torch.Tensor): processed tokens, B x N_tokens x C.
          (torch.Tensor): processed image tokens, B x HW x C.
        """
        if image_side is None:
            image_side = self.prepare_image(image_embedding, image_pe)
        b = point_embedding.shape[0]
        shared = image_side.keys.shape[0] == 1
        if not shared and image_side.keys.shape[0] != b:
            raise ValueError(f"image side has batch {image_side.keys.shape[0]} but there are {b} prompts")
        step = PROMPT_CHUNK if shared and eager_inference() else max(b, 1)
        if b <= step:
            return self._decode(image_side, point_embedding)
        queries, keys = zip(*(self._decode(image_side, point_embedding[i : i + step]) for i in range(0, b, step)))
        return torch.cat(queries), torch.cat(keys)

    def _decode(self, image: ImageSide, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        queries, keys = point_embedding, image.keys
        for i, layer in enumerate(self.layers):
            if i == 0:
                queries, keys = layer.attend(queries, point_embedding, keys, image.first)
            elif layer.cross_attn_token_to_image.folds(point_embedding.shape[1]):
                bias = image.biases[i - 1]
                queries, keys = layer.attend(queries, point_embedding, keys, layer.project_image_queries(keys, bias),
                                             image_bias=bias)
            else:
                queries, keys = layer.attend(queries, point_embedding, keys, layer.project_image(keys, image.biases[i - 1]))
        final = self.final_attn_token_to_image
        q = queries + point_embedding
        if final.folds(q.shape[1]):
            attn_out = final.attend_image(q, keys, image.final_bias)
        else:
            kv = final.project_keys_values(keys, image.final_bias)
            ci = final.internal_dim
            attn_out = final.attend_projected(final.q_proj(q), kv[..., :ci], kv[..., ci:])
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

    def image_bias(self, pe: Tensor) -> Tensor:
        """P x HW x 3Ci: what the positional encoding ``pe`` (P x HW x C) and the biases add to
        the image tokens' projections (the value projection sees no positional encoding)."""
        return torch.cat([self.cross_attn_token_to_image.keys_values_bias(pe), self.cross_attn_image_to_token.q_proj(pe)], dim=2)

    def project_image(self, keys: Tensor, bias: Tensor) -> Tensor:
        """B x HW x 3Ci projections of image tokens ``keys`` (B x HW x C), given ``image_bias``."""
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return _project(keys, [t2i.k_proj, t2i.v_proj, i2t.q_proj], bias)

    def project_image_queries(self, keys: Tensor, bias: Tensor) -> Tensor:
        """B x HW x Ci: only the image->token queries of :meth:`project_image`."""
        ci = self.cross_attn_image_to_token.internal_dim
        return _project(keys, [self.cross_attn_image_to_token.q_proj], bias[..., 2 * ci :])

    def attend(
        self, queries: Tensor, query_pe: Tensor, keys: Tensor, proj: Tensor, image_bias: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """
        One block given the image tokens' projections ``proj``: all three (from
        :meth:`project_image`), or, with ``image_bias`` (from :meth:`image_bias`), only the
        image->token queries (:meth:`project_image_queries`), token->image attention then being
        computed without projecting the image tokens (:meth:`Attention.attend_image`).
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        t2i = self.cross_attn_token_to_image
        ci = t2i.internal_dim
        if image_bias is not None:
            image_q = proj
            t2i_out = t2i.attend_image(queries + query_pe, keys, image_bias[..., : 2 * ci])
        else:
            k, v, image_q = proj[..., :ci], proj[..., ci : 2 * ci], proj[..., 2 * ci :]
            t2i_out = t2i.attend_projected(t2i.q_proj(queries + query_pe), k, v)
        queries = self.norm2(queries + t2i_out)
        queries = self.norm3(queries + self.mlp(queries))

        # From here on the image side differs per prompt (keys: B x HW x C).
        i2t_out = self.cross_attn_image_to_token.attend_tokens(image_q, queries + query_pe, queries)
        keys = self.norm4(keys + i2t_out)
        return queries, keys

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Arguments:
          queries (torch.Tensor): B x N_tokens x C prompt tokens; query_pe the same shape.
          keys (torch.Tensor): B' x HW x C image tokens; key_pe (1 or B') x HW x C.
        """
        keys = keys.contiguous()
        return self.attend(queries, query_pe, keys, self.project_image(keys, self.image_bias(key_pe.contiguous())))


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

    def keys_values_bias(self, pe: Tensor) -> Tensor:
        """P x N x 2Ci: what positional encoding ``pe`` (P x N x C) and the biases add to the keys
        and values of tokens (the values see no positional encoding)."""
        return torch.cat([self.k_proj(pe), _bias(self.v_proj).expand(*pe.shape[:2], -1)], dim=2)

    def project_keys_values(self, x: Tensor, bias: Tensor) -> Tensor:
        """B x N x 2Ci: keys and values of ``x`` (B x N x C), ``bias`` holding the keys'
        positional term and both biases (as :meth:`TwoWayTransformer.prepare_image` makes it)."""
        return _project(x, [self.k_proj, self.v_proj], bias)

    def attend_projected(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention and output projection of already projected q (Bq x Nq x Ci), k, v (Bk x Nk x Ci)."""
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

    def _head_blocks(self, x: Tensor) -> Tensor:
        """B x T x Ci (heads side by side) -> B x (heads*T) x Ci block-diagonal: row h*T+t holds
        head h's part of x[:, t] in columns h*d..(h+1)*d and exact zeros elsewhere, so one matrix
        product computes every head's dot products at once."""
        b, t, ci = x.shape
        heads, d = self.num_heads, ci // self.num_heads
        # A product with the identity rather than an indexed write: exportable to ONNX.
        eye = torch.eye(heads, dtype=x.dtype, device=x.device).view(1, heads, 1, heads, 1)
        blocks = x.view(b, t, heads, d).transpose(1, 2).unsqueeze(3) * eye
        return blocks.reshape(b, heads * t, ci)

    def folds(self, tokens: int) -> bool:
        """Whether attention between ``tokens`` prompt tokens and the image is cheaper computed
        per head on the image tokens themselves (:meth:`attend_image`, :meth:`attend_tokens`)
        than by projecting the image tokens (2*Ci*C per image token)."""
        return self.num_heads * tokens * (2 * self.embedding_dim + self.internal_dim) < 2 * self.internal_dim * self.embedding_dim

    def attend_image(self, q: Tensor, keys: Tensor, bias: Tensor) -> Tensor:
        """
        Few queries on many image tokens, without projecting the image tokens.

        Scores are q_h . (W_k,h x + p_h) = (q_h W_k,h) . x + q_h . p_h and, as attention weights
        sum to one, outputs are (sum_n a_n x_n) W_v,h^T + b_v,h: two products of size
        heads*T x C x HW instead of projecting HW image tokens to keys and values.

        Arguments:
          q (torch.Tensor): B x T x C token queries (not yet projected).
          keys (torch.Tensor): B' x N x C image tokens (B' = 1 when shared).
          bias (torch.Tensor): P x N x 2Ci (P = 1 or B'), from :meth:`keys_values_bias`.

        Returns:
          (torch.Tensor): B x T x C, as ``forward(q, keys + pe, keys)``.
        """
        q = self.q_proj(q)
        b, t, ci = q.shape
        heads, d = self.num_heads, ci // self.num_heads
        c, n = keys.shape[2], keys.shape[1]
        q = q * d**-0.5
        w_k = _weight(self.k_proj).view(heads, d, c)
        q_keys = torch.einsum("bthd,hdc->bhtc", q.view(b, t, heads, d), w_k).reshape(b, heads * t, c)
        blocks = self._head_blocks(q)
        pos = bias[..., :ci]
        if pos.shape[0] == 1:
            scores = torch.matmul(blocks.view(b * heads * t, ci), pos[0].t()).view(b, heads * t, n)
        else:
            scores = torch.matmul(blocks, pos.transpose(1, 2))
        if keys.shape[0] == 1:
            scores = torch.addmm(scores.view(b * heads * t, n), q_keys.view(b * heads * t, c), keys[0].t())
            probs = scores.softmax(dim=-1)
            pooled = torch.matmul(probs, keys[0]).view(b, heads, t, c)
        else:
            probs = torch.baddbmm(scores, q_keys, keys.transpose(1, 2)).softmax(dim=-1)
            pooled = torch.bmm(probs, keys).view(b, heads, t, c)
        w_v = _weight(self.v_proj).view(heads, d, c)
        out = torch.einsum("bhtc,hdc->bthd", pooled, w_v).reshape(b, t, ci) + _bias(self.v_proj)
        return self.out_proj(out)

    def attend_tokens(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """
        Many queries on few keys: image tokens attending to prompt tokens.

        Arguments:
          q (torch.Tensor): B' x N x Ci projected image queries (B' = 1 when shared).
          k, v (torch.Tensor): B x T x C token keys and values (not yet projected).

        Returns:
          (torch.Tensor): B x N x C, as ``out_proj(attention(q, k_proj(k), v_proj(v)))``.
        """
        k, v = self.k_proj(k), self.v_proj(v)
        b, t, ci = k.shape
        heads, d = self.num_heads, ci // self.num_heads
        n = q.shape[1]
        if heads * t > ci:  # many tokens: the block-diagonal form would cost more than it saves
            return self.attend_projected(q, k, v)
        # Scores of every head at once: q (N x Ci) times the block-diagonal key matrix.
        blocks = self._head_blocks(k * d**-0.5)
        if q.shape[0] == 1:
            scores = torch.matmul(blocks.view(b * heads * t, ci), q[0].t()).view(b, heads, t, n)
        else:
            scores = torch.matmul(blocks, q.transpose(1, 2)).view(b, heads, t, n)
        # Softmax over the T keys; the token axis is not the last one, where it would be slow.
        probs = scores.softmax(dim=2).view(b, heads * t, n)
        # Values and output projection folded: row h*T+t holds v[t, head h] @ W_out[:, head h].T.
        w_out = _weight(self.out_proj).view(-1, heads, d)
        values_out = torch.einsum("bthd,chd->bhtc", v.view(b, t, heads, d), w_out).reshape(b, heads * t, -1)
        return torch.baddbmm(_bias(self.out_proj), probs.transpose(1, 2), values_out)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend_projected(self.q_proj(q), self.k_proj(k), self.v_proj(v))
