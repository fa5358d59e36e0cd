"""Public names, module paths and signatures: sam_drop_in exposes what segment_anything does."""

import importlib
import inspect

import pytest

PUBLIC = {
    "": ["build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "sam_model_registry",
         "SamPredictor", "SamAutomaticMaskGenerator"],
    ".modeling": ["Sam", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "TwoWayTransformer"],
    ".modeling.common": ["LayerNorm2d", "MLPBlock"],
    ".utils.transforms": ["ResizeLongestSide"],
    ".utils.amg": ["MaskData", "is_box_near_crop_edge", "box_xyxy_to_xywh", "batch_iterator",
                   "mask_to_rle_pytorch", "rle_to_mask", "area_from_rle", "calculate_stability_score",
                   "build_point_grid", "build_all_layer_point_grids", "generate_crop_boxes",
                   "uncrop_boxes_xyxy", "uncrop_points", "uncrop_masks", "remove_small_regions",
                   "coco_encode_rle", "batched_mask_to_box"],
    ".utils.onnx": ["SamOnnxModel"],
}
PUBLIC_ITEMS = [(path, name) for path, names in PUBLIC.items() for name in names]


@pytest.mark.parametrize("path,name", PUBLIC_ITEMS, ids=[f"{p or '.'}:{n}" for p, n in PUBLIC_ITEMS])
def test_public_name_exists(impl, path, name):
    module = importlib.import_module(impl.__name__ + path)
    assert hasattr(module, name), f"{impl.__name__}{path} has no {name}"


def test_registry_keys(impl):
    assert {"default", "vit_h", "vit_l", "vit_b"} <= set(impl.sam_model_registry)
    assert impl.sam_model_registry["default"] is impl.build_sam_vit_h
    assert impl.build_sam is impl.build_sam_vit_h


def test_vit_t_in_registry():
    import mobile_sam
    import sam_drop_in

    assert sam_drop_in.sam_model_registry["vit_t"] is sam_drop_in.build_sam_vit_t
    assert hasattr(sam_drop_in.modeling, "TinyViT")
    assert _params(inspect.signature(sam_drop_in.build_sam_vit_t)) == _params(
        inspect.signature(mobile_sam.build_sam_vit_t)
    )


def _params(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def assert_compatible_signature(ours, theirs, what):
    """Upstream's parameters in the same order, kinds and defaults; additions keyword-only, after."""
    o = list(inspect.signature(ours).parameters.values())
    t = list(inspect.signature(theirs).parameters.values())
    assert _params_of(o[: len(t)]) == _params_of(t), f"{what}: {inspect.signature(ours)} != {inspect.signature(theirs)}"
    extra = o[len(t):]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), f"{what}: additions must be keyword-only"
    assert all(p.default is not inspect.Parameter.empty for p in extra), f"{what}: additions need defaults"


def _params_of(params):
    return [(p.name, p.kind, p.default) for p in params]


def _callables(module_path: str, name: str):
    """(qualified name, object) pairs for a public name and, for a class, its public methods."""
    up = getattr(importlib.import_module("segment_anything" + module_path), name)
    ours = getattr(importlib.import_module("sam_drop_in" + module_path), name)
    if not inspect.isclass(up):
        return [(name, ours, up)]
    pairs = [(name + ".__init__", ours.__init__, up.__init__)]
    for attr, value in vars(up).items():
        if attr.startswith("_") and attr not in ("__call__",):
            continue
        if inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)):
            pairs.append((f"{name}.{attr}", getattr(ours, attr), getattr(up, attr)))
    return pairs


SIGNATURE_ITEMS = [
    pair
    for path, names in PUBLIC.items()
    for name in names
    if name != "sam_model_registry"
    for pair in [(path, name)]
]


@pytest.mark.parametrize("path,name", SIGNATURE_ITEMS, ids=[f"{p or '.'}:{n}" for p, n in SIGNATURE_ITEMS])
def test_signatures_match_upstream(path, name):
    for what, ours, theirs in _callables(path, name):
        assert_compatible_signature(ours, theirs, what)


def test_sam_and_predictor_attributes():
    import segment_anything
    import sam_drop_in

    for cls in ("Sam",):
        up = getattr(segment_anything.modeling, cls)
        ours = getattr(sam_drop_in.modeling, cls)
        assert ours.mask_threshold == up.mask_threshold == 0.0
        assert ours.image_format == up.image_format == "RGB"


def test_tinyvit_signature_matches_mobile_sam():
    import mobile_sam
    import sam_drop_in

    assert_compatible_signature(sam_drop_in.modeling.TinyViT.__init__, mobile_sam.modeling.TinyViT.__init__, "TinyViT")
