"""End-to-end: the `sam-drop-in serve` page in headless Chromium, driven by Playwright.

Debian's chromium (/usr/bin/chromium, `apt-get install chromium`) is started by Playwright with
the flags a closed network needs; Playwright's own browser download is never used. Without
that binary the tests skip and say why. The model has random weights: the tests check that the
page does its job (masks drawn on the canvas, downloads in the documented formats, the same
records as the server), not what the masks look like.

Set SAM_DROP_IN_SCREENSHOTS=DIR to also save the README's screenshots there.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve-test]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve-test]'")
mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (serve extra)")

from _serve_support import random_vit_t, running_server  # noqa: E402

from sam_drop_in.serve import create_app  # noqa: E402

CHROMIUM = os.environ.get("SAM_DROP_IN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's services,
# which a closed network refuses; Playwright gives every launch a new, empty profile directory.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "images" / "chelsea.jpg"
TIMEOUT_MS = int(os.environ.get("SAM_DROP_IN_BROWSER_TIMEOUT_MS", "300000"))   # an embedding or everything run on a loaded 2-core CI machine


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's package: apt-get install -y chromium); "
                    "the browser tests need it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url():
    app = create_app(random_vit_t(), checkpoint="random weights")
    with running_server(app) as base:
        yield base


@pytest.fixture()
def page(browser, url):
    context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(url)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _wait_state(page, *states):
    cond = " || ".join(f"document.body.dataset.state === '{s}'" for s in states)
    page.wait_for_function(cond, timeout=TIMEOUT_MS)


def _open_image(page):
    page.set_input_files("#file", str(IMAGE))
    _wait_state(page, "ready")


def _overlay_colours(page):
    """Counts of the overlay canvas's pixels by RGBA colour (only non-transparent ones)."""
    return page.evaluate("""() => {
        const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const counts = {};
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] === 0) continue;
            const k = d[i] + ',' + d[i + 1] + ',' + d[i + 2] + ',' + d[i + 3];
            counts[k] = (counts[k] || 0) + 1;
        }
        return counts;
    }""")


def _canvas_point(page, fx, fy):
    box = page.locator("#overlay").bounding_box()
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def _shot(page, name):
    folder = os.environ.get("SAM_DROP_IN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def _mask_pixels(colours):
    """Pixels of the page's prompt-mask colour, RGBA (30, 144, 255, 140) in app.js; the canvas
    stores premultiplied alpha, so the colour read back may differ by a rounding step."""
    n = 0
    for key, count in colours.items():
        r, g, b, a = map(int, key.split(","))
        if a == 140 and abs(r - 30) <= 2 and abs(g - 144) <= 2 and abs(b - 255) <= 2:
            n += count
    return n


def test_page_says_random_weights(page):
    page.wait_for_function("!document.getElementById('random-warning').hidden", timeout=30_000)
    assert "vit_t" in page.inner_text("#model-info")


def test_hover_click_box_undo_and_png(page, tmp_path):
    _open_image(page)
    size = page.evaluate("[samPage.w, samPage.h]")
    from PIL import Image

    assert size == list(Image.open(IMAGE).size)

    # Hover: a mask under the cursor, without any click.
    x, y = _canvas_point(page, 0.45, 0.5)
    page.mouse.move(x, y)
    page.wait_for_function("samPage.stats.hoverMs.length > 0 && samPage.mask !== null", timeout=TIMEOUT_MS)
    colours = _overlay_colours(page)
    hover_px = _mask_pixels(colours)
    assert hover_px, colours
    assert hover_px == page.evaluate("samPage.mask.area") > 0

    # Left click: one positive point, the mask of it is drawn (minus the point marker's pixels).
    page.mouse.click(x, y)
    page.wait_for_function("samPage.points.length === 1 && samPage.stats.predictMs.length === 1", timeout=TIMEOUT_MS)
    _wait_state(page, "ready")
    assert page.evaluate("samPage.points[0].label") == 1
    area = page.evaluate("samPage.mask.area")
    drawn = _mask_pixels(_overlay_colours(page))
    assert 0 < drawn <= area and drawn > area - 2000
    _shot(page, "serve_click.png")

    # Right click: a negative point.
    x2, y2 = _canvas_point(page, 0.8, 0.2)
    page.mouse.click(x2, y2, button="right")
    page.wait_for_function("samPage.points.length === 2 && samPage.stats.predictMs.length === 2", timeout=TIMEOUT_MS)
    assert page.evaluate("samPage.points[1].label") == 0

    # The current mask as PNG: white where the mask is.
    with page.expect_download() as dl:
        page.click("#download-png")
    png = np.asarray(Image.open(dl.value.path()).convert("L"))
    assert png.shape == (size[1], size[0])
    assert int((png == 255).sum()) == page.evaluate("samPage.mask.area")

    # Undo removes the negative point, Clear everything.
    page.click("#undo")
    page.wait_for_function("samPage.points.length === 1", timeout=10_000)
    page.click("#clear")
    page.wait_for_function("samPage.points.length === 0 && samPage.mask === null", timeout=10_000)
    assert _overlay_colours(page) == {}

    # Drag: a box prompt, and its mask.
    a, b = _canvas_point(page, 0.2, 0.2), _canvas_point(page, 0.7, 0.8)
    n = page.evaluate("samPage.stats.predictMs.length")
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=8)
    page.mouse.up()
    page.wait_for_function(f"samPage.box !== null && samPage.stats.predictMs.length > {n}", timeout=TIMEOUT_MS)
    box = page.evaluate("samPage.box")
    assert abs(box[0] - 0.2 * size[0]) < 3 and abs(box[3] - 0.8 * size[1]) < 3
    assert _mask_pixels(_overlay_colours(page)) > 0
    _shot(page, "serve_box.png")


@pytest.mark.parametrize("hierarchical", [False, True])
def test_everything_and_json_download(page, tmp_path, hierarchical):
    _open_image(page)
    page.click("#options summary")
    page.fill("#opt-points", "8")
    page.fill("#opt-iou", "0")
    page.fill("#opt-stab", "0")
    # Random weights give near-identical masks everywhere; keep them all (no duplicate removal).
    page.fill("#opt-nms", "1")
    if hierarchical:
        page.check("#hierarchical")
    page.click("#everything")
    _wait_state(page, "everything-done")
    records = page.evaluate("samPage.everything")
    assert len(records) > 1
    colours = _overlay_colours(page)
    assert len(colours) >= 2   # distinct colours for distinct masks
    if not hierarchical:
        _shot(page, "serve_everything.png")

    with page.expect_download() as dl:
        page.click("#download-json")
    assert dl.value.suggested_filename == "masks.json"
    saved = json.loads(Path(dl.value.path()).read_text())
    # The records the page shows, in `sam-drop-in everything --convert-to-rle`'s format.
    assert saved == records
    w, h = page.evaluate("[samPage.w, samPage.h]")
    for rec in saved:
        assert set(rec) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                            "crop_box"}
        assert rec["segmentation"]["size"] == [h, w]
        assert int(mask_utils.decode(rec["segmentation"]).sum()) == rec["area"]
    # The page's own decoder of COCO's compressed RLE strings agrees with pycocotools.
    for rec in saved[:5]:
        js = np.array(page.evaluate("(r) => Array.from(decodeRle(r))", rec["segmentation"]), np.uint8).reshape(h, w)
        np.testing.assert_array_equal(js, mask_utils.decode(rec["segmentation"]))


# --- decoding in the browser (onnxruntime-web) -------------------------------------------------


@pytest.fixture(scope="module")
def browser_decoder_url(tmp_path_factory):
    pytest.importorskip("onnx", reason="the browser decoder is exported with onnx: pip install -e '.[serve-test]'")
    from sam_drop_in.serve import web_runtime

    folder = web_runtime.installed()
    if folder is None:
        pytest.skip(f"onnxruntime-web {web_runtime.VERSION} is not in {web_runtime.cache_root()}: run "
                    "`sam-drop-in serve --fetch-web-runtime` (needs npm) for the browser-decoder test")
    app = create_app(random_vit_t(), checkpoint="random weights", decoder="browser", web_runtime=folder,
                     cache_dir=tmp_path_factory.mktemp("decoder-cache"))
    with running_server(app) as base:
        yield base


def _mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_browser_decoder_hover_and_click_match_server(browser, browser_decoder_url):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(browser_decoder_url + "/?decoder=browser")
    page.wait_for_function("samPage.browser.state === 'ready' || samPage.browser.state === 'failed'", timeout=TIMEOUT_MS)
    assert page.evaluate("samPage.browser.state") == "ready", page.evaluate("samPage.browser.note")
    page.set_input_files("#file", str(IMAGE))
    page.wait_for_function("document.body.dataset.state === 'ready' && samPage.browser.embeddingFor === samPage.session",
                           timeout=TIMEOUT_MS)
    w, h = page.evaluate("[samPage.w, samPage.h]")

    # Hover, decoded in the browser: the mask is drawn on the canvas.
    x, y = _canvas_point(page, 0.45, 0.5)
    page.mouse.move(x, y)
    page.wait_for_function("samPage.stats.hoverMs.length > 0 && samPage.mask !== null", timeout=TIMEOUT_MS)
    assert page.evaluate("samPage.stats.lastDecodedIn") == "browser"
    assert _mask_pixels(_overlay_colours(page)) == page.evaluate("samPage.mask.area") > 0

    # Click: a positive point, decoded in the browser, drawn (minus the point marker's pixels).
    page.mouse.click(x, y)
    page.wait_for_function("samPage.points.length === 1 && samPage.stats.predictMs.length === 1", timeout=TIMEOUT_MS)
    _wait_state(page, "ready")
    assert page.evaluate("samPage.stats.lastDecodedIn") == "browser"
    area = page.evaluate("samPage.mask.area")
    drawn = _mask_pixels(_overlay_colours(page))
    assert 0 < drawn <= area and drawn > area - 2000
    got = np.array(page.evaluate("Array.from(samPage.mask.data)"), np.uint8).reshape(h, w).astype(bool)
    got_score = page.evaluate("samPage.mask.score")

    # The same click decoded on the server (POST /api/predict from the page).
    ref = page.evaluate("""async () => {
        const p = samPage.points[0];
        const r = await decodeOnServer([[p.x, p.y]], [1], null);
        return {data: Array.from(r.mask.data), score: r.mask.score};
    }""")
    want = np.array(ref["data"], np.uint8).reshape(h, w).astype(bool)
    # Contract: onnxruntime-web's kernels (WebAssembly SIMD) and PyTorch's differ by float32
    # rounding, which can flip pixels whose logit is within rounding of the threshold: mask IoU
    # >= 0.99 and predicted IoU within 1e-3.
    assert _mask_iou(got, want) >= 0.99, _mask_iou(got, want)
    assert abs(got_score - ref["score"]) < 1e-3

    # A box alone goes to the server (the exported decoder would choose another mask for it).
    page.click("#clear")
    a, b = _canvas_point(page, 0.2, 0.2), _canvas_point(page, 0.7, 0.8)
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=8)
    page.mouse.up()
    page.wait_for_function("samPage.box !== null && samPage.stats.predictMs.length === 2", timeout=TIMEOUT_MS)
    assert page.evaluate("samPage.stats.lastDecodedIn") == "server"
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_browser_decoder_that_cannot_load_falls_back_to_server(browser, tmp_path):
    # onnxruntime-web's files are missing from the folder the server was given (a damaged
    # cache): the page says so and decodes on the server; nothing breaks.
    app = create_app(random_vit_t(), checkpoint="random weights", decoder="browser", web_runtime=tmp_path,
                     cache_dir=tmp_path)
    with running_server(app) as base:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        page.goto(base)
        page.wait_for_function("samPage.browser.state === 'failed'", timeout=TIMEOUT_MS)
        assert "decoding on the server" in page.inner_text("#decoder-note")
        assert page.evaluate("[samPage.decoder, document.getElementById('decoder').value]") == ["server", "server"]
        _open_image(page)
        x, y = _canvas_point(page, 0.45, 0.5)
        page.mouse.move(x, y)
        page.wait_for_function("samPage.stats.hoverMs.length > 0 && samPage.mask !== null", timeout=TIMEOUT_MS)
        assert page.evaluate("samPage.stats.lastDecodedIn") == "server"
        assert _mask_pixels(_overlay_colours(page)) == page.evaluate("samPage.mask.area") > 0
        context.close()
