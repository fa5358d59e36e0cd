"""Latency of `sam-drop-in serve`: embedding, hover (one-point predict) and everything, over HTTP.

Starts the real application on a loopback port in this process and times what the page does:
POST /api/embed, then POST /api/predict with one point and best_only (a hover), then
POST /api/everything. Hover figures are client round trips (HTTP + JSON + decoder + upsampling
+ RLE encoding), which is what the page waits for; "decoder" is the server's own part.
With --browser, also hovers in headless Chromium (Debian's /usr/bin/chromium via Playwright)
and reports the page's own hover latency (samPage.stats.hoverMs: prompt to mask ready) for each
decoder in one run, alternating hover by hover: decoder=server (POST /api/predict) and
decoder=browser (the exported ONNX decoder in onnxruntime-web, WebAssembly, 1 and 2 threads).
Browser decoding needs onnxruntime-web in the cache (`sam-drop-in serve --fetch-web-runtime`).

The decoder's cost does not depend on the weights' values, so random weights (the default;
no download) time hover and embedding like real ones. Everything's time does depend on them
(how many masks pass the filters), so pass --checkpoint for that figure.

  python benchmarks/bench_serve.py [--checkpoint PATH] [--hovers 30] [--points-per-side 32] [--browser]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _fmt(ms):
    return f"median {statistics.median(ms):.0f} ms, p90 {_pct(ms, 0.9):.0f} ms, min {min(ms):.0f} ms (n={len(ms)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="random", help="vit_t weights (default: random)")
    ap.add_argument("--image", default=str(ROOT / "examples" / "images" / "chelsea.jpg"))
    ap.add_argument("--scale", type=float, nargs="+", default=[1.0, 4.0],
                    help="also time the image upscaled by these factors (large uploads)")
    ap.add_argument("--embeds", type=int, default=3)
    ap.add_argument("--hovers", type=int, default=30)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--no-everything", action="store_true")
    ap.add_argument("--browser", action="store_true", help="also hover in headless Chromium")
    args = ap.parse_args()

    import httpx
    import torch
    from PIL import Image

    from _serve_support import running_server
    from sam_drop_in.build_sam import sam_model_registry
    from sam_drop_in.serve import create_app

    torch.manual_seed(0)
    if args.checkpoint == "random":
        sam = sam_model_registry["vit_t"]().eval()
    else:
        sam = sam_model_registry["vit_t"](checkpoint=args.checkpoint).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs, weights: {args.checkpoint}")
    from sam_drop_in.serve import web_runtime
    from sam_drop_in.serve.browser_decoder import onnx_missing

    runtime = web_runtime.installed() if onnx_missing() is None else None
    app = create_app(sam, checkpoint="random weights" if args.checkpoint == "random" else args.checkpoint,
                     web_runtime=runtime)
    base = Image.open(args.image).convert("RGB")
    rng = random.Random(0)
    # TCP_NODELAY, as browsers set it: a precaution against Nagle's algorithm holding the
    # request body back until the server acknowledges the headers (not measured separately).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with running_server(app) as url, httpx.Client(base_url=url, timeout=3600, transport=transport) as client:
        sid = None
        for scale in args.scale:
            im = base.resize((int(base.width * scale), int(base.height * scale))) if scale != 1 else base
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            embed, trip = [], []
            for _ in range(args.embeds):
                t0 = time.perf_counter()
                r = client.post("/api/embed", content=data, headers={"Content-Type": "image/jpeg"})
                trip.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                embed.append(r.json()["embed_seconds"] * 1000)
                sid = r.json()["session_id"]
            print(f"\nimage {im.width}x{im.height} ({len(data) / 1024:.0f} KiB JPEG)")
            print(f"  embed (server, set_image):     {_fmt(embed)}")
            print(f"  embed (upload + decode + set_image round trip): {_fmt(trip)}")
            hover, dec = [], []
            for _ in range(args.hovers):
                xy = [rng.uniform(0, im.width - 1), rng.uniform(0, im.height - 1)]
                t0 = time.perf_counter()
                r = client.post("/api/predict", json={"session_id": sid, "points": [xy], "labels": [1], "best_only": True})
                hover.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                dec.append(r.json()["seconds"] * 1000)
            print(f"  hover round trip (HTTP):       {_fmt(hover)}")
            print(f"  hover, server part:            {_fmt(dec)}")
        if not args.no_everything:
            for hierarchical in (False, True):
                t0 = time.perf_counter()
                r = client.post("/api/everything", json={"session_id": sid, "hierarchical": hierarchical,
                                                         "options": {"points_per_side": args.points_per_side}})
                r.raise_for_status()
                print(f"  everything ({'hierarchical' if hierarchical else 'automatic'}, points_per_side="
                      f"{args.points_per_side}) on {im.width}x{im.height}: {time.perf_counter() - t0:.1f} s, "
                      f"{r.json()['count']} masks")
        if args.browser:
            _browser(url, args, runtime is not None)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


def _browser(url, args, browser_decoding):
    from playwright.sync_api import sync_playwright

    from test_serve_browser import CHROMIUM, CHROMIUM_ARGS

    variants = [("server", "decoder=server")]
    if browser_decoding:
        variants += [("browser, 1 thread", "decoder=browser&threads=1"), ("browser, 2 threads", "decoder=browser&threads=2")]
    else:
        print("\nbrowser decoding not measured: onnxruntime-web is not cached (sam-drop-in serve --fetch-web-runtime) "
              "or onnx is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pages = []
        for name, query in variants:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{url}/?{query}")
            if "browser" in query:
                page.wait_for_function("['ready', 'failed'].includes(samPage.browser.state)", timeout=600_000)
                if page.evaluate("samPage.browser.state") != "ready":
                    raise SystemExit(f"{name}: {page.evaluate('samPage.browser.note')}")
            page.set_input_files("#file", args.image)
            page.wait_for_function("document.body.dataset.state === 'ready' && (samPage.decoder === 'server' || "
                                   "samPage.browser.embeddingFor === samPage.session)", timeout=600_000)
            pages.append((name, page, page.locator("#overlay").bounding_box()))
        # One warm-up hover each (the server's first predict allocates), then alternate page by
        # page so that every decoder sees the same load on a shared machine.
        rng = random.Random(1)
        for i in range(args.hovers + 1):
            fx, fy = rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)
            for name, page, box in pages:
                page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
                page.wait_for_function(f"samPage.stats.hoverMs.length > {i} && !samPage.hover.inflight", timeout=60_000)
        print(f"\nhover in headless Chromium, prompt to mask ready ({args.image}; {args.hovers} hovers each, alternating):")
        for name, page, _ in pages:
            ms = page.evaluate("samPage.stats.hoverMs")[1:]
            where = page.evaluate("samPage.stats.lastDecodedIn")
            print(f"  decoder={name:<20} {_fmt(ms)}  (decoded in the {where})")
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
