"""The mask decoder at inference: MaskDecoder.predict_masks' mathematics, arranged for speed.

What it computes differently from ``MaskDecoder.predict_masks`` / ``TwoWayTransformer.forward``
(the same function; results differ by float32 round-off only):

- The image side is kept token-major and contiguous (B x HW x C) instead of transposed views.
- Every projection of image tokens ``(keys + pe) @ W.T + b`` is split into ``keys @ W.T`` plus a
  prompt-independent term ``pe @ W.T + b``; a block's three image-token projections (token->image
  keys and values, image->token queries) share one matrix product, and the positional terms are
  computed once per image (:func:`prepare`, an :class:`ImageSide`).
- In the first block the image tokens are the same for every prompt without a mask input (the
  dense embedding is one learned vector), so their projections are per-image work too: a caller
  that keeps the :class:`ImageSide` pays for them once per image, and the shared image is never
  copied per prompt (upstream's ``repeat_interleave``).
- Image->token attention has a handful of keys (the prompt tokens): two dense products with a
  block-diagonal key matrix (one block per head), value and output projections folded together,
  the output bias shared out over the heads' value rows (each head's weights sum to one) and the
  residual image tokens passed in as the product's addend.
- Token->image attention after the first block has a handful of queries: they are moved through
  the key projection instead of projecting 4096 image tokens to keys and values (about half the
  work) when that is cheaper (:func:`_folds`).
- The two 2x2 stride-2 transposed convolutions of ``output_upscaling`` are matrix products on the
  image tokens as they come out of the transformer, biases added inside the products; the
  sub-pixel layout is put in place once, on the final logits (:func:`decode_filtered`: only on
  the kept masks' logits).
- Prompts sharing an image are decoded PROMPT_CHUNK at a time so that each one's image-side
  tensors (4 MB each) stay in cache.

When it is chosen (:func:`applies`): eager inference without gradients
(``common.eager_inference()``: not training, tracing, exporting or compiling), on this package's
TwoWayTransformer / TwoWayAttentionBlock / Attention with nn.Linear projections (not subclasses),
with the standard ``output_upscaling`` layout and no forward hooks in the transformer (hooks, e.g.
distillation's token capture, see upstream's calls). ``MaskDecoder.predict_masks`` takes this path
itself; ``ImageDecoder`` (image_decoder.py) calls :func:`decode` with a kept :class:`ImageSide`.

Proven equal to segment_anything's modules on the same perturbed weights by tests/test_decoder.py
(one prompt, prompt groups, 20-point prompts, mask inputs, per-prompt embeddings; IoU within
1e-4, logits within 1e-3, float32 round-off of differently ordered sums) and
compat_tests/test_parity.py; to this package's own reference path by
tests/test_decoder.py::test_fast_path_equals_reference_path.
"""

from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .common import LayerNorm2d, activate_, attention, eager_inference
from .transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

# Prompts decoded together when they share the image side, in float32. Measured on a 2-core CPU
# with a 32 MB L3, whole decoder per prompt, groups of 1/2/4/8: 33.6/31.5/39.7/43.5 ms for 16
# prompts and 35.4/30.8/32.2/39.8 ms for 64; larger groups spill the cache. Two-byte dtypes
# (bf16, fp16) take twice as many for the same bytes: on an AMX CPU in bf16, one thread, groups
# of 2/4/8 cost the same per prompt (20.6/22.5/20.8 ms, a shared machine), while with 2 threads
# and the machine loaded, groups of 4 were 1.4-3.6x faster than 2 (half as many parallel
# regions, each waiting for the slowest thread).
PROMPT_CHUNK = 2


class ImageSide(NamedTuple):
    """Prompt-independent work of the decoder for one image side.

    keys: B' x HW x C image tokens plus dense prompt embedding (B' = 1 when shared by every prompt).
    first: B' x HW x 3Ci projections of ``keys`` for block 0 (token->image keys, values;
        image->token queries), or None when the transformer has no blocks.
    biases: per block 1.., 1 x HW x 3Ci: positional term plus bias of the same projections.
    final_bias: 1 x HW x 2Ci, the same for the final token->image attention's keys and values.
    grid: (H, W) of the embedding.
    """

    keys: Tensor
    first: Optional[Tensor]
    biases: List[Tensor]
    final_bias: Tensor
    grid: Tuple[int, int]


def applies(decoder: nn.Module) -> bool:
    """Whether ``decoder``'s inference may take this path (see the module docstring)."""
    transformer = decoder.transformer
    if not eager_inference() or type(transformer) is not TwoWayTransformer or not _upscaling_is_standard(decoder):
        return False
    for m in transformer.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return all(type(layer) is TwoWayAttentionBlock for layer in transformer.layers) and all(
        type(m) is Attention and all(type(p) is nn.Linear for p in m.children())
        for m in transformer.modules() if isinstance(m, Attention)
    )


def _upscaling_is_standard(decoder: nn.Module) -> bool:
    mods = list(decoder.output_upscaling)
    if len(mods) != 5 or type(mods[1]) is not LayerNorm2d:
        return False
    return all(
        type(c) is nn.ConvTranspose2d and c.kernel_size == (2, 2) and c.stride == (2, 2)
        and c.padding == (0, 0) and c.output_padding == (0, 0) and c.dilation == (1, 1)
        and c.groups == 1 and c.bias is not None
        for c in (mods[0], mods[3])
    )


def predict_masks(
    decoder: nn.Module, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor
) -> Tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` (same arguments, same results): every mask token's logits
    Bx4x(4H)x(4W) and quality scores Bx4."""
    side = prepare(decoder, image_embeddings, image_pe, dense)
    return decode(decoder, side, sparse)


def prepare(decoder: nn.Module, image_embeddings: Tensor, image_pe: Tensor, dense: Tensor) -> ImageSide:
    """
    The work that does not depend on the sparse prompts.

    Arguments:
      decoder (MaskDecoder): the decoder.
      image_embeddings (torch.Tensor): 1xCxHxW or BxCxHxW.
      image_pe (torch.Tensor): 1xCxHxW positional encoding.
      dense (torch.Tensor): BxCxHxW dense prompt embeddings; the prompt encoder's 'no mask'
        embedding is one vector expanded over the batch (stride 0), which keeps the image side
        shared (B' = 1).

    Returns:
      (ImageSide): valid for any sparse prompts with these inputs, as long as the weights do not
        change.
    """
    if dense.shape[0] > 1 and dense.stride(0) == 0:
        dense = dense[:1]
    src = image_embeddings + dense
    transformer = decoder.transformer
    keys = src.flatten(2).transpose(1, 2).contiguous()
    pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    biases = [_block_bias(layer, pe) for layer in transformer.layers]
    final_bias = _keys_values_bias(transformer.final_attn_token_to_image, pe)
    first = _project_image(transformer.layers[0], keys, biases[0]) if transformer.depth else None
    return ImageSide(keys, first, biases[1:], final_bias, (src.shape[2], src.shape[3]))


def decode(decoder: nn.Module, side: ImageSide, sparse: Tensor) -> Tuple[Tensor, Tensor]:
    """
    Every mask token's logits Bx4x(4H)x(4W) and quality scores Bx4 for ``sparse`` (BxNxC)
    prompts on ``side`` (from :func:`prepare`).
    """
    masks, ious = [], []
    for tokens, keys in _groups(decoder, side, sparse):
        masks.append(_mask_logits(decoder, tokens, keys, side.grid))
        ious.append(decoder.iou_prediction_head(tokens[:, 0, :]))
    return torch.cat(masks), torch.cat(ious)


def decode_filtered(
    decoder: nn.Module, side: ImageSide, sparse: Tensor, mask_slice: slice, iou_thresh: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    :func:`decode`, keeping only the masks of ``mask_slice`` whose predicted IoU exceeds
    ``iou_thresh`` (all when it is 0 or less): mask logits are computed only for prompts that
    keep at least one mask.

    Returns:
      (torch.Tensor): Kx(4H)x(4W) logits of the K kept masks, prompt-major order.
      (torch.Tensor): their K predicted IoUs.
      (torch.Tensor): BxM bool, which masks are kept (M masks in ``mask_slice``).
    """
    lows, ious, keeps = [], [], []
    for tokens, keys in _groups(decoder, side, sparse):
        iou = decoder.iou_prediction_head(tokens[:, 0, :])[:, mask_slice].float()  # thresholds compare in float32
        keep = iou > iou_thresh if iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
        prompts = keep.any(dim=1)
        if not bool(prompts.all()):
            tokens, keys, keep_p = tokens[prompts], keys[prompts], keep[prompts]
        else:
            keep_p = keep
        if tokens.shape[0]:
            # Every mask of the slice from the upscaled features (one product, memory-bound on
            # the features), but the sub-pixel layout copy only for the kept ones.
            hyper_in = _hyper_in(decoder, tokens)[:, mask_slice]
            raw = torch.matmul(_upscaled(decoder, keys, side.grid), hyper_in.transpose(1, 2))
            lows.append(_subpixel(raw.transpose(1, 2)[keep_p], side.grid))
        ious.append(iou[keep])
        keeps.append(keep)
    h, w = side.grid
    low = torch.cat(lows) if lows else sparse.new_zeros(0, 4 * h, 4 * w)
    return low, torch.cat(ious), torch.cat(keeps)


def _groups(decoder: nn.Module, side: ImageSide, sparse: Tensor) -> Iterator[Tuple[Tensor, Tensor]]:
    """Output tokens (b x T x C) and image tokens (b x HW x C) of the transformer, a group of
    prompts at a time (one empty group when there are none)."""
    b = sparse.shape[0]
    shared = side.keys.shape[0] == 1
    if not shared and side.keys.shape[0] != b:
        raise ValueError(f"image side has batch {side.keys.shape[0]} but there are {b} prompts")
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    step = max(1, PROMPT_CHUNK * 4 // sparse.element_size()) if shared else max(b, 1)
    for i in range(0, max(b, 1), step):
        part = side if shared else side._replace(keys=side.keys[i : i + step],
                                                 first=None if side.first is None else side.first[i : i + step])
        yield _transformer(decoder.transformer, part, tokens[i : i + step])


def _transformer(transformer: TwoWayTransformer, side: ImageSide, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
    """TwoWayTransformer.forward on a prepared image side."""
    queries, keys = point_embedding, side.keys
    for i, layer in enumerate(transformer.layers):
        if i == 0:
            queries, keys = _block(layer, queries, point_embedding, keys, side.first)
            continue
        bias = side.biases[i - 1]
        if _folds(layer.cross_attn_token_to_image, point_embedding.shape[1]):
            # Project only the image->token queries; token->image attention folds (_attend_image).
            i2t = layer.cross_attn_image_to_token
            proj = _project(keys, [i2t.q_proj], bias[..., 2 * i2t.internal_dim :])
            queries, keys = _block(layer, queries, point_embedding, keys, proj, image_bias=bias)
        else:
            queries, keys = _block(layer, queries, point_embedding, keys, _project_image(layer, keys, bias))
    final = transformer.final_attn_token_to_image
    q = queries + point_embedding
    if _folds(final, q.shape[1]):
        attn_out = _attend_image(final, q, keys, side.final_bias)
    else:
        kv = _project(keys, [final.k_proj, final.v_proj], side.final_bias)
        ci = final.internal_dim
        attn_out = _attend_projected(final, final.q_proj(q), kv[..., :ci], kv[..., ci:])
    queries = transformer.norm_final_attn(queries + attn_out)
    if keys.shape[0] != queries.shape[0]:  # depth 0 with a shared image side
        keys = keys.expand(queries.shape[0], -1, -1)
    return queries, keys


def _block(
    layer: TwoWayAttentionBlock, queries: Tensor, query_pe: Tensor, keys: Tensor, proj: Tensor,
    image_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """
    TwoWayAttentionBlock.forward given the image tokens' projections ``proj``: all three (from
    :func:`_project_image`), or, with ``image_bias`` (from :func:`_block_bias`), only the
    image->token queries, token->image attention then being computed without projecting the
    image tokens (:func:`_attend_image`).
    """
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)

    t2i = layer.cross_attn_token_to_image
    ci = t2i.internal_dim
    if image_bias is not None:
        image_q = proj
        t2i_out = _attend_image(t2i, queries + query_pe, keys, image_bias[..., : 2 * ci])
    else:
        k, v, image_q = proj[..., :ci], proj[..., ci : 2 * ci], proj[..., 2 * ci :]
        t2i_out = _attend_projected(t2i, t2i.q_proj(queries + query_pe), k, v)
    queries = layer.norm2(queries + t2i_out)
    queries = layer.norm3(queries + layer.mlp(queries))

    # From here on the image side differs per prompt (keys: B x HW x C).
    keys = layer.norm4(_attend_tokens(layer.cross_attn_image_to_token, image_q, queries + query_pe, queries, keys))
    return queries, keys


# -- projections of the image tokens ----------------------------------------------------------


def _project(x: Tensor, linears: List[nn.Module], bias: Tensor) -> Tensor:
    """``x`` (B x N x C) through several linear layers at once, side by side in one product, plus
    ``bias`` (broadcast to B x N x sum of widths: the layers' biases and any positional term)."""
    weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
    return torch.matmul(x, weight.t()).add_(bias)


def _keys_values_bias(attn: Attention, pe: Tensor) -> Tensor:
    """P x N x 2Ci: what positional encoding ``pe`` (P x N x C) and the biases add to the keys
    and values of image tokens (the values see no positional encoding)."""
    return torch.cat([attn.k_proj(pe), attn.v_proj.bias.expand(*pe.shape[:2], -1)], dim=2)


def _block_bias(layer: TwoWayAttentionBlock, pe: Tensor) -> Tensor:
    """P x HW x 3Ci: the positional and bias terms of :func:`_project_image`."""
    return torch.cat([_keys_values_bias(layer.cross_attn_token_to_image, pe), layer.cross_attn_image_to_token.q_proj(pe)], dim=2)


def _project_image(layer: TwoWayAttentionBlock, keys: Tensor, bias: Tensor) -> Tensor:
    """B x HW x 3Ci projections of image tokens ``keys`` (B x HW x C), given :func:`_block_bias`."""
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    return _project(keys, [t2i.k_proj, t2i.v_proj, i2t.q_proj], bias)


# -- attention in three arrangements ----------------------------------------------------------


def _heads(attn: Attention, x: Tensor) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2)  # B x heads x N x c


def _merge_heads(x: Tensor) -> Tensor:
    b, heads, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * c)


def _attend_projected(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention and output projection of already projected q (Bq x Nq x Ci), k, v (Bk x Nk x Ci)."""
    bq, nq, _ = q.shape
    bk = k.shape[0]
    if bk == 1 and bq > 1:
        # Shared keys: fold the prompt batch into the query axis. Each query row's softmax runs
        # over the same keys as before, so this is one large attention, same maths.
        out = attention(_heads(attn, q.reshape(1, bq * nq, -1)), _heads(attn, k), _heads(attn, v))
        return attn.out_proj(_merge_heads(out).reshape(bq, nq, -1))
    if bq == 1 and bk > 1:
        q = q.expand(bk, -1, -1)
    return attn.out_proj(_merge_heads(attention(_heads(attn, q), _heads(attn, k), _heads(attn, v))))


def _head_blocks(attn: Attention, x: Tensor) -> Tensor:
    """B x T x Ci (heads side by side) -> B x (heads*T) x Ci block-diagonal: row h*T+t holds
    head h's part of x[:, t] in columns h*d..(h+1)*d and exact zeros elsewhere, so one matrix
    product computes every head's dot products at once."""
    b, t, ci = x.shape
    heads, d = attn.num_heads, ci // attn.num_heads
    eye = torch.eye(heads, dtype=x.dtype, device=x.device).view(1, heads, 1, heads, 1)
    blocks = x.view(b, t, heads, d).transpose(1, 2).unsqueeze(3) * eye
    return blocks.reshape(b, heads * t, ci)


def _folds(attn: Attention, tokens: int) -> bool:
    """Whether attention between ``tokens`` prompt tokens and the image is cheaper computed per
    head on the image tokens themselves (:func:`_attend_image`) than by projecting the image
    tokens (2*Ci*C per image token)."""
    return attn.num_heads * tokens * (2 * attn.embedding_dim + attn.internal_dim) < 2 * attn.internal_dim * attn.embedding_dim


def _attend_image(attn: Attention, q: Tensor, keys: Tensor, bias: Tensor) -> Tensor:
    """
    Few queries on many image tokens, without projecting the image tokens.

    Scores are q_h . (W_k,h x + p_h) = (q_h W_k,h) . x + q_h . p_h and, as attention weights sum
    to one, outputs are (sum_n a_n x_n) W_v,h^T + b_v,h: two products of size heads*T x C x HW
    instead of projecting HW image tokens to keys and values.

    Arguments:
      q (torch.Tensor): B x T x C token queries (not yet projected).
      keys (torch.Tensor): B' x N x C image tokens (B' = 1 when shared).
      bias (torch.Tensor): P x N x 2Ci (P = 1 or B'), from :func:`_keys_values_bias`.

    Returns:
      (torch.Tensor): B x T x C, as ``attn(q, keys + pe, keys)``.
    """
    q = attn.q_proj(q)
    b, t, ci = q.shape
    heads, d = attn.num_heads, ci // attn.num_heads
    c, n = keys.shape[2], keys.shape[1]
    q = q * d**-0.5
    w_k = attn.k_proj.weight.view(heads, d, c)
    q_keys = torch.einsum("bthd,hdc->bhtc", q.view(b, t, heads, d), w_k).reshape(b, heads * t, c)
    blocks = _head_blocks(attn, q)
    pos = bias[..., :ci]
    if pos.shape[0] == 1:
        scores = torch.matmul(blocks.view(b * heads * t, ci), pos[0].t()).view(b, heads * t, n)
    else:
        scores = torch.matmul(blocks, pos.transpose(1, 2))
    if keys.shape[0] == 1:
        scores = torch.addmm(scores.view(b * heads * t, n), q_keys.view(b * heads * t, c), keys[0].t())
        pooled = torch.matmul(scores.softmax(dim=-1), keys[0]).view(b, heads, t, c)
    else:
        probs = torch.baddbmm(scores, q_keys, keys.transpose(1, 2)).softmax(dim=-1)
        pooled = torch.bmm(probs, keys).view(b, heads, t, c)
    w_v = attn.v_proj.weight.view(heads, d, c)
    out = torch.einsum("bhtc,hdc->bthd", pooled, w_v).reshape(b, t, ci) + attn.v_proj.bias
    return attn.out_proj(out)


def _attend_tokens(attn: Attention, q: Tensor, k: Tensor, v: Tensor, residual: Tensor) -> Tensor:
    """
    Many queries on few keys: image tokens attending to prompt tokens, plus a residual.

    Arguments:
      q (torch.Tensor): B' x N x Ci projected image queries (B' = 1 when shared).
      k, v (torch.Tensor): B x T x C token keys and values (not yet projected).
      residual (torch.Tensor): B' x N x C image tokens the attention's output is added to.

    Returns:
      (torch.Tensor): B x N x C, as ``residual + out_proj(attention(q, k_proj(k), v_proj(v)))``.
    """
    k, v = attn.k_proj(k), attn.v_proj(v)
    b, t, ci = k.shape
    heads, d = attn.num_heads, ci // attn.num_heads
    n = q.shape[1]
    if heads * t > ci:  # many tokens: the block-diagonal form would cost more than it saves
        return residual + _attend_projected(attn, q, k, v)
    # Scores of every head at once: q (N x Ci) times the block-diagonal key matrix.
    blocks = _head_blocks(attn, k * d**-0.5)
    if q.shape[0] == 1:
        scores = torch.matmul(blocks.view(b * heads * t, ci), q[0].t()).view(b, heads, t, n)
    else:
        scores = torch.matmul(blocks, q.transpose(1, 2)).view(b, heads, t, n)
    # Softmax over the T keys; the token axis is not the last one, where it would be slow.
    probs = scores.softmax(dim=2).view(b, heads * t, n)
    # Values and output projection folded: row h*T+t holds v[t, head h] @ W_out[:, head h].T,
    # plus the output bias / heads: each head's weights sum to one over its T rows, so the
    # weighted sum adds the bias once. The residual comes in as the product's addend: no
    # separate pass over the B x N x C result.
    w_out = attn.out_proj.weight.view(-1, heads, d)
    values_out = torch.einsum("bthd,chd->bhtc", v.view(b, t, heads, d), w_out).reshape(b, heads * t, -1)
    values_out = values_out.add_(attn.out_proj.bias / heads)
    return torch.baddbmm(residual, probs.transpose(1, 2), values_out)


# -- upscaling and mask logits ----------------------------------------------------------------


def _mask_logits(decoder: nn.Module, hs: Tensor, keys: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Bx4x(4H)x(4W) mask logits from the transformer's output tokens ``hs`` (BxTxC) and image
    tokens ``keys`` (BxHWxC)."""
    hyper_in = _hyper_in(decoder, hs)
    logits = torch.matmul(_upscaled(decoder, keys, grid), hyper_in.transpose(1, 2))  # B x N x K
    (b, _, k), (h, w) = logits.shape, grid
    # The sub-pixel layout of every mask in one copy.
    return logits.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, k, 4 * h, 4 * w)


def _hyper_in(decoder: nn.Module, hs: Tensor) -> Tensor:
    """B x K x C2: each mask token's hypernetwork output (K = num_mask_tokens)."""
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    return torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)


def _upscaled(decoder: nn.Module, keys: Tensor, grid: Tuple[int, int]) -> Tensor:
    """B x N x C2 upscaled image features, N = H*W*16 in the order (h, w, di, dj, di2, dj2).

    A 2x2 stride-2 transposed convolution writes each input pixel's 2x2 output block and nothing
    else, so it is one matrix product per pixel: channels-last input rows times a
    C_in x (2*2*C_out) matrix, with the bias repeated for the four output pixels (added inside the
    product). Both upscaling steps run that way on the image tokens as they come out of the
    transformer (no transposes), the LayerNorm over the last axis; the sub-pixel blocks are put
    in place by :func:`_subpixel`, on the small final logits.
    """
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    b, (h, w) = keys.shape[0], grid
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, conv1.in_channels)  # (di, dj, cout) x cin
    x = nn.functional.linear(keys, w1, conv1.bias.repeat(4)).view(b, h * w * 4, c1)
    x = activate_(act1, nn.functional.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
    return activate_(act2, nn.functional.linear(x, w2, conv2.bias.repeat(4)).view(b, h * w * 16, c2))


def _subpixel(logits: Tensor, grid: Tuple[int, int]) -> Tensor:
    """K x (4H) x (4W) masks from K x N logits in :func:`_upscaled`'s order."""
    (h, w), k = grid, logits.shape[0]
    return logits.reshape(k, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(k, 4 * h, 4 * w)
