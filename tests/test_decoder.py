"""The mask decoder's fast paths and the predictor's per-image decoder cache.

modeling/_fast_decoder.py computes upstream's mathematics in another arrangement (image-side
projections split into an image part and a per-image positional part, block-diagonal image->token
attention, the transposed convolutions as matrix products, prompts in small groups);
modeling/image_decoder.py keeps its per-image part between predict calls;
modeling/_fast_postprocess.py upsamples only the kept region. Each path is compared with
segment_anything's modules on the same weights; tolerances as in compat_tests/test_parity.py
(IoU 1e-4, logits 1e-3; observed about 1e-6), and with this package's own reference path.
"""

import numpy as np
import pytest
import torch

import sam_drop_in
from sam_drop_in._errors import InputError
from sam_drop_in.testing import load_image, perturbed_state_dict, small_sam
from sam_drop_in.modeling import _fast_decoder

IOU_ATOL, LOGIT_ATOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def pair():
    ref = small_sam("segment_anything")
    sd = perturbed_state_dict(ref.state_dict(), seed=5)
    ref.load_state_dict(sd)
    ours = small_sam("sam_drop_in")
    ours.load_state_dict(sd)
    return ours, ref


def _decode(model, points=None, boxes=None, masks=None, multimask=True, embedding=None):
    g = torch.Generator().manual_seed(1)
    if embedding is None:
        embedding = torch.randn(1, 256, 64, 64, generator=g)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)


def _assert_decodes_match(a, b):
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=IOU_ATOL)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=LOGIT_ATOL)


def _points(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, 2, generator=g) * 1024, torch.randint(0, 2, (batch, n), generator=g)


@pytest.mark.parametrize("batch,n_points", [(1, 1), (5, 3), (3, 20)])
def test_decoder_matches_upstream(pair, batch, n_points, monkeypatch):
    """1 prompt; a batch decoded in groups (PROMPT_CHUNK); 20 points, where image->token
    attention has too many tokens for the block-diagonal form and takes the plain one."""
    ours, ref = pair
    points = _points(batch, n_points)
    queries = []  # query count of every plain attention call
    plain = _fast_decoder._attend_projected
    monkeypatch.setattr(_fast_decoder, "_attend_projected",
                        lambda attn, q, k, v: queries.append(q.shape[1]) or plain(attn, q, k, v))
    _assert_decodes_match(_decode(ours, points=points), _decode(ref, points=points))
    # Image->token attention has the 64x64 image tokens as queries: it went the plain way in the
    # 20-point case only (8 heads x 26 tokens > 128 channels), the block-diagonal way otherwise.
    assert (64 * 64 in queries) == (n_points == 20), queries


def test_decoder_with_mask_inputs_matches_upstream(pair):
    """Mask inputs make the image side differ per prompt (batch B, not 1)."""
    ours, ref = pair
    points = _points(4, 2, seed=2)
    masks = torch.randn(4, 1, 256, 256, generator=torch.Generator().manual_seed(3))
    _assert_decodes_match(_decode(ours, points=points, masks=masks, multimask=False),
                          _decode(ref, points=points, masks=masks, multimask=False))


def test_per_prompt_embeddings_match_upstream_one_by_one(pair):
    """One image embedding per prompt (BxCxHxW), which ours accepts; upstream decodes each."""
    ours, ref = pair
    emb = torch.randn(3, 256, 64, 64, generator=torch.Generator().manual_seed(4))
    boxes = torch.tensor([[10.0, 20, 500, 600], [100, 100, 900, 1000], [0, 0, 1023, 1023]])
    one_by_one = [_decode(ref, boxes=boxes[i : i + 1], embedding=emb[i : i + 1]) for i in range(3)]
    _assert_decodes_match(_decode(ours, boxes=boxes, embedding=emb),
                          tuple(torch.cat(parts) for parts in zip(*one_by_one)))


@pytest.mark.parametrize("layer,shared_pe", [(0, True), (1, True), (1, False)])
def test_attention_block_forward_matches_upstream(pair, layer, shared_pe):
    """TwoWayAttentionBlock.forward keeps upstream's signature and results when called alone."""
    ours, ref = pair
    g = torch.Generator().manual_seed(6)
    q, qpe = torch.randn(3, 7, 256, generator=g), torch.randn(3, 7, 256, generator=g)
    k, kpe = torch.randn(3, 4096, 256, generator=g), torch.randn(1 if shared_pe else 3, 4096, 256, generator=g)
    with torch.no_grad():
        a = ours.mask_decoder.transformer.layers[layer](q, k, qpe, kpe)
        b = ref.mask_decoder.transformer.layers[layer](q, k, qpe, kpe)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


def _decode_reference(model, **kw):
    """The same decode through the upstream-shaped modules: a forward hook on the transformer
    makes the decoder take its reference path (as distillation's token capture does)."""
    handle = model.mask_decoder.transformer.register_forward_hook(lambda *args: None)
    try:
        return _decode(model, **kw)
    finally:
        handle.remove()


@pytest.mark.parametrize("batch,n_points,with_masks", [(3, 2, False), (3, 20, False), (2, 1, True)])
def test_fast_path_equals_reference_path(pair, batch, n_points, with_masks):
    """_fast_decoder (split projections, folded attentions, transposed convolutions as matrix
    products, prompt groups) against this package's upstream-shaped modules on the same weights.
    Contract: float32 round-off of differently ordered sums, logits within 1e-5 and IoU within
    1e-5 (values O(1); observed about 1e-6)."""
    ours, _ = pair
    points = _points(batch, n_points, seed=7)
    masks = torch.randn(batch, 1, 256, 256, generator=torch.Generator().manual_seed(3)) if with_masks else None
    fast = _decode(ours, points=points, masks=masks)
    plain = _decode_reference(ours, points=points, masks=masks)
    torch.testing.assert_close(fast[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=1e-5)


def test_prompt_groups_do_not_change_results(pair, monkeypatch):
    ours, _ = pair
    points = _points(6, 1, seed=8)
    grouped = _decode(ours, points=points)
    monkeypatch.setattr(_fast_decoder, "PROMPT_CHUNK", 64)
    whole = _decode(ours, points=points)
    torch.testing.assert_close(grouped[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped[1], whole[1], rtol=0, atol=1e-6)


def test_transformer_hooks_see_the_whole_batch(pair):
    """Forward hooks on the transformer (distillation, feature capture) fire once per decoder
    call with every prompt: the decoder then takes its reference path, not the grouped one."""
    ours, _ = pair
    seen = []
    handle = ours.mask_decoder.transformer.register_forward_hook(lambda m, a, out: seen.append(out[0].shape))
    try:
        _decode(ours, points=_points(5, 1))
    finally:
        handle.remove()
    assert seen == [torch.Size([5, 7, 256])]


# -- the predictor keeps the decoder's per-image work between predict calls -------------------


@pytest.fixture()
def predictor():
    model = small_sam("sam_drop_in")
    model.load_state_dict(perturbed_state_dict(model.state_dict(), seed=9))
    p = sam_drop_in.SamPredictor(model)
    p.set_image(load_image("coffee.jpg"))
    return p


def _uncached(p, **prompt):
    """The same predict computed by the mask decoder without the predictor's cache."""
    t = p.transform
    coords = torch.as_tensor(t.apply_coords(prompt["point_coords"], p.original_size), dtype=torch.float)[None]
    labels = torch.as_tensor(prompt["point_labels"], dtype=torch.int)[None]
    with torch.no_grad():
        sparse, dense = p.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou = p.model.mask_decoder(p.features, p.model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    return low[0].numpy(), iou[0].numpy()


PROMPT = dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1]))


def _check_against_uncached(p):
    _, iou, low = p.predict(**PROMPT)
    low_u, iou_u = _uncached(p, **PROMPT)
    # Same operations on the same tensors and shapes (the cache only keeps prepare_image's
    # result, which the uncached call computes the same way): bit-for-bit, cached or not.
    np.testing.assert_array_equal(low, low_u)
    np.testing.assert_array_equal(iou, iou_u)
    return low


def test_cache_is_exact_and_reused(predictor):
    first = _check_against_uncached(predictor)
    decoder = predictor.image_decoder()
    side = decoder._side
    assert side is not None
    second = _check_against_uncached(predictor)
    assert predictor.image_decoder() is decoder and decoder._side is side  # reused, not recomputed
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("change", ["decoder_weight", "load_state_dict", "positional_matrix", "no_mask_embed"])
def test_cache_follows_weight_changes(predictor, change):
    before = _check_against_uncached(predictor)
    model = predictor.model
    with torch.no_grad():
        if change == "decoder_weight":
            model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
        elif change == "load_state_dict":
            model.load_state_dict(perturbed_state_dict(model.state_dict(), seed=10))
        elif change == "positional_matrix":
            model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(0.5)
        else:
            model.prompt_encoder.no_mask_embed.weight.add_(1.0)
    after = _check_against_uncached(predictor)
    assert not np.array_equal(before, after)


def test_cache_follows_the_image(predictor):
    before = _check_against_uncached(predictor)
    predictor.set_image(load_image("astronaut.jpg"))
    assert predictor._image_decoder is None
    after = _check_against_uncached(predictor)
    assert not np.array_equal(before, after)
    predictor.reset_image()
    assert predictor._image_decoder is None


def test_cache_follows_features_assigned_directly(predictor):
    """Tools that load precomputed embeddings assign predictor.features themselves."""
    before = _check_against_uncached(predictor)
    predictor.features = torch.randn(predictor.features.shape, generator=torch.Generator().manual_seed(12))
    after = _check_against_uncached(predictor)
    assert not np.array_equal(before, after)


def test_cache_follows_replaced_layers(predictor):
    """Replacing decoder layers (as a quantisation or fine-tuning tool does) after a predict
    takes effect."""
    before = _check_against_uncached(predictor)
    attn = predictor.model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    new = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features)
    with torch.no_grad():
        new.weight.copy_(attn.k_proj.weight * 1.5)
        new.bias.copy_(attn.k_proj.bias)
    attn.k_proj = new
    after = _check_against_uncached(predictor)
    assert not np.array_equal(before, after)


def test_mask_input_bypasses_the_cache(predictor):
    _, _, low = predictor.predict(**PROMPT)
    decoder = predictor.image_decoder()
    side = decoder._side
    m, iou, _ = predictor.predict(**PROMPT, mask_input=low[:1])
    assert predictor.image_decoder() is decoder and decoder._side is side and m.shape[0] == 3


def test_state_assigned_by_hand_predicts_the_same(predictor):
    """Caption-Anything sets features, original_size, input_size and is_image_set itself on a
    predictor that never saw the image, then calls predict: same results, bit for bit (same
    operations on the same tensors)."""
    expected = predictor.predict(**PROMPT)
    other = sam_drop_in.SamPredictor(predictor.model)
    other.features = predictor.features
    other.original_size = predictor.original_size
    other.input_size = predictor.input_size
    other.is_image_set = True
    for a, b in zip(other.predict(**PROMPT), expected):
        np.testing.assert_array_equal(a, b)


def test_set_embedding_commits_or_changes_nothing(predictor):
    """SamPredictor.set_embedding: the state of set_image, or a clear error and no change."""
    features, sizes = predictor.features, (predictor.original_size, predictor.input_size)
    expected = predictor.predict(**PROMPT)
    for bad in [dict(features=features[0]), dict(original_size=(400,)), dict(input_size="big")]:
        args = {**dict(features=features, original_size=sizes[0], input_size=sizes[1]), **bad}
        with pytest.raises(InputError):
            predictor.set_embedding(**args)
        assert predictor.features is features and predictor.is_image_set
    other = sam_drop_in.SamPredictor(predictor.model)
    other.set_embedding(features.clone(), *sizes)
    assert (other.orig_h, other.orig_w, other.input_h, other.input_w) == (*sizes[0], *sizes[1])
    for a, b in zip(other.predict(**PROMPT), expected):
        np.testing.assert_array_equal(a, b)


# -- postprocess_masks upsamples only the region it keeps --------------------------------------


def _postprocess_everything(masks, input_size, original_size):
    """Upstream's steps: upsample the whole padded square, crop, resize to the original size."""
    f = torch.nn.functional
    x = f.interpolate(masks, (1024, 1024), mode="bilinear", align_corners=False)[..., : input_size[0], : input_size[1]]
    return f.interpolate(x, original_size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("channels", [1, 3])
def test_postprocess_is_bit_identical_to_upsampling_everything(pair, channels):
    """Contract: exact. Bilinear resizing has no reduction: every output value is w0 * a + w1 * b
    per axis from two source values whose positions and weights depend only on the scale factor
    and the output index, which the crop-first path keeps the same; and it keeps whole blocks of
    16 output values, so each value comes out of the same vector or scalar code as before (the
    vector widths, 4/8/16 floats for NEON/AVX2/AVX-512, divide 16). Checked here with
    ATEN_CPU_CAPABILITY=avx2 and =default as well as AVX-512, 1 and 2 threads."""
    ours, _ = pair
    x = torch.randn(2, channels, 256, 256, generator=torch.Generator().manual_seed(11))
    sides = [1, 2, 5, 17, 255, 256, 341, 512, 683, 768, 1000, 1021, 1023, 1024]
    for side in sides:
        for input_size in ((side, 1024), (1024, side)):
            for original_size in (input_size, (input_size[0] + 3, input_size[1] + 5), (400, 600)):
                got = ours.postprocess_masks(x, input_size, original_size)
                assert torch.equal(got, _postprocess_everything(x, input_size, original_size)), (input_size, original_size)
