"""`sam-drop-in serve`'s JSON/HTTP API, against a real server on a loopback port.

Every bad-input case must come back as a 4xx with a message (never a 500), and the server must
keep answering afterwards. Masks must be those of SamPredictor / the generators on the same
model and image: the server runs the same code on the same shapes in the same process, so
masks are compared exactly and scores to 1e-6.
"""

import json

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve-test]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve-test]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e '.[serve-test]'")
mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (serve extra)")

from sam_drop_in.serve import create_app  # noqa: E402
from sam_drop_in.utils.amg import rle_to_mask  # noqa: E402

from _serve_support import encode, random_vit_t, running_server, sample_image  # noqa: E402

UPLOAD_LIMIT = 300_000
PIXEL_LIMIT = 400 * 400
SMALL_GRID = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def sam():
    return random_vit_t()


@pytest.fixture(scope="module")
def server(sam, tmp_path_factory):
    app = create_app(sam, checkpoint="random weights", max_sessions=2,
                     max_upload_bytes=UPLOAD_LIMIT, max_pixels=PIXEL_LIMIT,
                     cache_dir=tmp_path_factory.mktemp("decoder-cache"))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def session(server):
    img = sample_image()
    r = server.post("/api/embed", content=encode(img), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["session_id"], img


def _bad(response, status):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and len(message) > 10
    return message


def test_info(server):
    info = server.get("/api/info").json()
    assert info["model_type"] == "vit_t" and info["random_weights"] is True
    assert info["max_upload_bytes"] == UPLOAD_LIMIT


def test_page_and_assets(server):
    page = server.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert server.get(asset).status_code == 200, asset


def test_embed_reports_size_and_session(session, server):
    sid, img = session
    st = server.get(f"/api/session/{sid}").json()
    assert (st["height"], st["width"]) == img.shape[:2]
    assert st["embed_seconds"] > 0 and st["everything_running"] is False


def test_embed_multipart_jpeg(server):
    img = sample_image(90, 70, seed=1)
    r = server.post("/api/embed", files={"image": ("x.jpg", encode(img, "JPEG"), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert (r.json()["height"], r.json()["width"]) == (90, 70)


def test_predict_point_matches_predictor(server, session, sam):
    from sam_drop_in.predictor import SamPredictor

    sid, img = session
    r = server.post("/api/predict", json={"session_id": sid, "points": [[50, 40]], "labels": [1]})
    assert r.status_code == 200, r.text
    masks = r.json()["masks"]
    # One point and no box: multimask output by default, best first.
    assert len(masks) == 3
    p = SamPredictor(sam)
    p.set_image(img)
    ref_masks, ref_scores, _ = p.predict(np.array([[50.0, 40.0]]), np.array([1]), multimask_output=True)
    order = np.argsort(-ref_scores, kind="stable")
    for got, i in zip(masks, order):
        decoded = rle_to_mask(got["segmentation"])
        assert decoded.shape == img.shape[:2]
        np.testing.assert_array_equal(decoded, ref_masks[i])
        assert got["area"] == int(ref_masks[i].sum())
        assert abs(got["score"] - float(ref_scores[i])) < 1e-6


def test_predict_box_and_points_best_only(server, session):
    sid, img = session
    body = {"session_id": sid, "points": [[50, 40], [120, 90]], "labels": [1, 0], "box": [10, 10, 150, 110],
            "best_only": True}
    r = server.post("/api/predict", json=body)
    assert r.status_code == 200, r.text
    (mask,) = r.json()["masks"]
    assert mask["segmentation"]["size"] == list(img.shape[:2])
    # Uncompressed RLE: the counts add up to every pixel of the image.
    assert sum(mask["segmentation"]["counts"]) == img.shape[0] * img.shape[1]


@pytest.mark.parametrize("body, status, words", [
    ({"points": [[1, 2]], "labels": [1]}, 400, "session_id"),
    ({"session_id": "no-such-session", "points": [[1, 2]], "labels": [1]}, 404, "unknown session_id"),
    ({"session_id": 7, "points": [[1, 2]], "labels": [1]}, 404, "unknown session_id"),
    ({"points": [[1]], "labels": [1]}, 400, "Nx2"),
    ({"points": [[1, 2]], "labels": [1, 1]}, 400, "label"),
    ({"points": [[1, 2]]}, 400, "label"),
    ({"points": "here", "labels": [1]}, 400, "list of numbers"),
    ({"points": [[1, 2], [3]], "labels": [1, 1]}, 400, "list of numbers"),
    ({"points": [["a", "b"]], "labels": [1]}, 400, "list of numbers"),
    ({"points": [[1, 2]], "labels": [2]}, 400, "foreground"),
    ({"box": [1, 2, 3]}, 400, "box"),
    ({}, 400, "needs 'points'"),
    ({"points": [[1, 2]], "labels": [1], "multimask_output": "yes"}, 400, "true or false"),
    ({"points": [[1, 2]], "labels": [1], "colour": "red"}, 400, "unknown field"),
])
def test_predict_bad_prompts_are_4xx(server, session, body, status, words):
    sid, _ = session
    if words != "session_id" and "session_id" not in body:
        body = {"session_id": sid, **body}
    message = _bad(server.post("/api/predict", json=body), status)
    assert words.lower() in message.lower()


@pytest.mark.parametrize("content, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"\xff\xfe", 400, "not valid JSON"),
])
def test_predict_bad_bodies_are_4xx(server, content, status, words):
    message = _bad(server.post("/api/predict", content=content, headers={"Content-Type": "application/json"}), status)
    assert words.lower() in message.lower()


@pytest.mark.parametrize("content, status, words", [
    (b"", 400, "empty"),
    (b"hello, not an image", 400, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400, "image"),   # a PNG signature, then garbage
])
def test_embed_bad_uploads_are_4xx(server, content, status, words):
    message = _bad(server.post("/api/embed", content=content, headers={"Content-Type": "image/png"}), status)
    assert words.lower() in message.lower()


def test_embed_upload_beyond_limit_is_413(server):
    big = b"\0" * (UPLOAD_LIMIT + 1)
    assert "at most" in _bad(server.post("/api/embed", content=big), 413)

    # Without a Content-Length (chunked), the server counts while reading and stops at the limit.
    def chunks():
        for _ in range(UPLOAD_LIMIT // 65536 + 2):
            yield b"\0" * 65536

    assert "limit" in _bad(server.post("/api/embed", content=chunks()), 413)


def test_embed_too_many_pixels_is_413(server):
    # A flat 500x500 PNG is a few kB (under the byte limit) but over the pixel limit.
    img = np.zeros((500, 500, 3), np.uint8)
    assert "megapixels" in _bad(server.post("/api/embed", content=encode(img)), 413)


def test_multipart_without_image_field_is_400(server):
    r = server.post("/api/embed", files={"picture": ("x.png", encode(sample_image()), "image/png")})
    assert "'image'" in _bad(r, 400)


def test_wrong_method_and_unknown_route(server):
    assert server.get("/api/predict").status_code == 405
    assert server.get("/api/nothing-here").status_code == 404


def test_embedding_endpoint_is_the_predictors(server, session, sam):
    from sam_drop_in.predictor import SamPredictor

    sid, img = session
    r = server.get(f"/api/session/{sid}/embedding")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert (r.headers["x-shape"], r.headers["x-dtype"]) == ("1,256,64,64", "float32")
    got = np.frombuffer(r.content, "<f4").reshape(1, 256, 64, 64)
    p = SamPredictor(sam)
    p.set_image(img)
    # Contract: the same encoder code on the same shapes in the same process: bit-identical.
    np.testing.assert_array_equal(got, p.get_image_embedding().numpy())
    assert server.get(f"/api/session/{sid}").json()["input_size"] == list(p.input_size)
    assert "unknown session_id" in _bad(server.get("/api/session/nope/embedding"), 404)


def test_decoder_model_endpoint_decodes_like_the_predictor(server, session, sam):
    """The ONNX decoder the page runs, fed as the page feeds it (SamOnnxModel's prompt encoding:
    coordinates in the resized frame, a -1 padding point, no mask input)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (onnx extra)")
    pytest.importorskip("onnx", reason="onnx is not installed (serve extra)")
    from sam_drop_in.predictor import SamPredictor

    sid, img = session
    r = server.get("/api/decoder.onnx")
    assert r.status_code == 200, r.text
    dec = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in dec.get_inputs()] == ["image_embeddings", "point_coords", "point_labels", "mask_input",
                                                   "has_mask_input", "orig_im_size"]
    emb = np.frombuffer(server.get(f"/api/session/{sid}/embedding").content, "<f4").reshape(1, 256, 64, 64)
    ih, iw = server.get(f"/api/session/{sid}").json()["input_size"]
    h, w = img.shape[:2]
    p = SamPredictor(sam)
    p.set_image(img)
    for xy in ([50.0, 40.0], [130.5, 95.0]):
        feeds = {
            "image_embeddings": emb,
            "point_coords": np.array([[[xy[0] * iw / w, xy[1] * ih / h], [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[1.0, -1.0]], np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([h, w], np.float32),
        }
        masks, scores, _ = dec.run(None, feeds)
        assert masks.shape == (1, 1, h, w) and scores.shape == (1, 1)
        ref_masks, ref_scores, _ = p.predict(np.array([xy]), np.array([1]), multimask_output=True)
        best = int(np.argmax(ref_scores))
        # Contract: ONNX Runtime's and PyTorch's float32 kernels differ by rounding, which can
        # flip pixels whose logit is within rounding of 0: mask IoU >= 0.99, score within 1e-4.
        got = masks[0, 0] > 0
        union = np.logical_or(got, ref_masks[best]).sum()
        assert np.logical_and(got, ref_masks[best]).sum() / max(union, 1) >= 0.99
        assert abs(float(scores[0, 0]) - float(ref_scores[best])) < 1e-4


def test_browser_runtime_off_and_isolation_headers(server):
    info = server.get("/api/info").json()
    assert info["decoder"] == "server" and info["browser_decoder"] is None
    assert "browser decoding is off" in _bad(server.get("/ort/ort.wasm.bundle.min.mjs"), 404)
    # Cross-origin isolation (COOP/COEP) on every response: onnxruntime-web may use threads.
    page = server.get("/")
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"


def test_everything_reports_batches_while_running(server, session):
    import threading
    import time

    sid, _ = session
    result = {}
    options = {"points_per_side": 8, "points_per_batch": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    job = threading.Thread(target=lambda: result.setdefault(
        "r", server.post("/api/everything", json={"session_id": sid, "options": options})))
    job.start()
    seen = []
    while job.is_alive():
        st = server.get(f"/api/session/{sid}").json()
        if st["everything_running"] and st["everything_progress"] is not None:
            seen.append(st["everything_progress"])
        time.sleep(0.05)
    job.join()
    assert result["r"].status_code == 200, result["r"].text
    assert seen, "no progress seen while the job ran"
    # 8x8 points in batches of 4: 16 batches on the one crop; the fraction never goes back.
    assert all(p["total"] == 16 and 0 <= p["done"] <= 16 for p in seen)
    fractions = [p["fraction"] for p in seen]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)
    assert server.get(f"/api/session/{sid}").json()["everything_progress"] is None


def _records_equal(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g["segmentation"]["counts"] == (r["segmentation"]["counts"].decode()
                                               if isinstance(r["segmentation"]["counts"], bytes)
                                               else r["segmentation"]["counts"])
        assert g["segmentation"]["size"] == list(r["segmentation"]["size"])
        assert g["area"] == r["area"] and g["bbox"] == list(r["bbox"])
        assert abs(g["predicted_iou"] - r["predicted_iou"]) < 1e-6


@pytest.mark.parametrize("hierarchical", [False, True])
def test_everything_matches_generator(server, session, sam, hierarchical):
    from sam_drop_in.automatic_mask_generator import SamAutomaticMaskGenerator
    from sam_drop_in.hierarchical_mask_generator import SamHierarchicalMaskGenerator

    sid, img = session
    r = server.post("/api/everything", json={"session_id": sid, "hierarchical": hierarchical, "options": SMALL_GRID})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == len(out["records"]) > 0 and out["hierarchical"] is hierarchical
    # The record format of `sam-drop-in everything --convert-to-rle`.
    for rec in out["records"]:
        assert set(rec) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                            "crop_box"}
        assert mask_utils.decode(rec["segmentation"]).sum() == rec["area"]
    gen_cls = SamHierarchicalMaskGenerator if hierarchical else SamAutomaticMaskGenerator
    ref = gen_cls(sam, output_mode="coco_rle", **SMALL_GRID).generate(img)
    _records_equal(out["records"], json.loads(json.dumps(ref, default=lambda o: o.item() if hasattr(o, "item") else o.decode())))
    assert server.get(f"/api/session/{sid}").json()["everything_seconds"] > 0


@pytest.mark.parametrize("body, words", [
    ({"options": {"points_per_sid": 4}}, "unknown everything option"),
    ({"options": {"points_per_side": 1000}}, "between"),
    ({"options": {"points_per_side": "4"}}, "must be a number"),
    ({"options": {"points_per_side": 4.5}}, "must be an integer"),
    ({"options": {"high_score_thresh": 8.0}}, "unknown everything option"),
    ({"options": [4]}, "JSON object"),
    ({"hierarchical": "yes"}, "true or false"),
    ({"mode": "fast"}, "unknown field"),
])
def test_everything_bad_options_are_400(server, session, body, words):
    sid, _ = session
    message = _bad(server.post("/api/everything", json={"session_id": sid, **body}), 400)
    assert words.lower() in message.lower()


def test_sessions_do_not_cross_talk_and_old_ones_are_dropped(server, session):
    sid, img = session
    other = sample_image(64, 96, seed=3)
    r = server.post("/api/embed", content=encode(other))
    sid2 = r.json()["session_id"]
    assert sid2 != sid
    # Each session answers with masks of its own image's size.
    for s, im in ((sid, img), (sid2, other)):
        m = server.post("/api/predict", json={"session_id": s, "points": [[5, 5]], "labels": [1]}).json()["masks"][0]
        assert m["segmentation"]["size"] == list(im.shape[:2])
    # max_sessions=2: two more uploads drop both (least recently used first).
    newer = [server.post("/api/embed", content=encode(other)).json()["session_id"] for _ in range(2)]
    assert "embed again" in _bad(server.post("/api/predict", json={"session_id": sid2, "box": [0, 0, 9, 9]}), 404)
    assert server.post("/api/predict", json={"session_id": newer[-1], "box": [0, 0, 9, 9]}).status_code == 200
    assert server.delete(f"/api/session/{newer[-1]}").status_code == 204
    _bad(server.get(f"/api/session/{newer[-1]}"), 404)
