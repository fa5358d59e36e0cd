"""The ASGI application of ``sam-drop-in serve``: the page and its JSON/HTTP API (Starlette).

``create_app`` lists the routes; docs/serve.md has request and response examples. Bad input of
any kind is a 4xx with ``{"error": message}``; model work runs in worker threads, so a long
everything job never blocks the page of another tab.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Dict, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._errors import InputError
from .._fileio import json_default
from . import sessions as sess
from .browser_decoder import DecoderCache
from .web_runtime import FILES as RUNTIME_FILES

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_JSON_BYTES = 1 << 20


class ClientError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, default=json_default, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    # Content-Length is only a hint (chunked uploads have none): count while reading, and stop
    # at the limit instead of buffering whatever a client sends.
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"the upload is {int(declared)} bytes; this server accepts at most {limit} "
                               f"({limit / 2**20:.0f} MiB; see --max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"the upload is larger than this server's limit of {limit} bytes "
                                   f"({limit / 2**20:.0f} MiB; see --max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int) -> bytes:
    body = await _read_body(request, limit)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return body

    # Parse the already size-checked body: replay it to a new Request for Starlette's parser.
    async def replay() -> Dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=limit)
    except (HTTPException, AssertionError) as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        if "python-multipart" in detail:
            raise ClientError(415, "multipart uploads need the 'python-multipart' package on the server "
                                   "(pip install 'sam-drop-in[serve]'); or send the raw image bytes as the body")
        raise ClientError(400, f"malformed multipart upload: {detail}")
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ClientError(400, "a multipart upload needs a file field named 'image'")
    return await upload.read()


async def _json_body(request: Request) -> Dict[str, Any]:
    body = await _read_body(request, MAX_JSON_BYTES)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ClientError(400, "the request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ClientError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


RUNTIME_MEDIA_TYPES = {".mjs": "text/javascript", ".wasm": "application/wasm"}
DECODER_MODES = ("server", "browser")


class CrossOriginIsolation:
    """ASGI middleware: COOP/COEP headers on every response, so the page is cross-origin
    isolated and onnxruntime-web may use SharedArrayBuffer (WebAssembly threads). Everything
    the page loads comes from this server, so nothing is blocked by them."""

    HEADERS = [(b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp")]

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + self.HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    sam: Any,
    *,
    model_type: str = "vit_t",
    checkpoint: str = "",
    max_sessions: int = 8,
    max_upload_bytes: int = 32 << 20,
    max_pixels: int = 50_000_000,
    decoder: str = "server",
    web_runtime: Optional[Path] = None,
    decoder_note: str = "",
    cache_dir: Optional[Path] = None,
) -> Starlette:
    """Build the web application around a loaded model.

    Arguments:
      sam (Sam): the model, in eval mode, on its device; shared by all sessions.
      model_type (str): shown by /api/info and the page.
      checkpoint (str): description of the weights (``"random weights"`` makes the page say so).
      max_sessions (int): images whose embeddings stay cached (least recently used dropped).
      max_upload_bytes (int): largest accepted request body for /api/embed (413 beyond).
      max_pixels (int): largest accepted width * height of an uploaded image (413 beyond).
      decoder (str): where the page decodes prompts by default: ``"server"`` (PyTorch, over the
        cached embedding) or ``"browser"`` (the exported ONNX decoder in onnxruntime-web; needs
        ``web_runtime``). The page can switch while both are available.
      web_runtime (Path or None): folder with onnxruntime-web's files
        (:func:`sam_drop_in.serve.web_runtime.fetch`); None: browser decoding unavailable.
      decoder_note (str): why the decoder is what it is (e.g. why browser decoding is off),
        shown on the page.
      cache_dir (Path or None): where the exported decoder is cached (default: the per-user
        cache folder).

    Returns:
      (Starlette): the ASGI application.
    """
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}")
    if decoder == "browser" and web_runtime is None:
        raise ValueError("decoder='browser' needs web_runtime, the folder of onnxruntime-web's files")
    store = sess.SessionStore(sam, max_sessions=max_sessions)
    decoder_cache = DecoderCache(sam, cache_dir)
    if decoder == "browser":
        # Export while the user picks an image: the page asks for the file right after loading.
        decoder_cache.start()

    def session_of(obj: Dict[str, Any]) -> sess.Session:
        if "session_id" not in obj:
            raise ClientError(400, "the request needs a 'session_id' (from POST /api/embed)")
        return store.get(obj["session_id"])

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> Response:
        return _json({
            "model_type": model_type,
            "checkpoint": checkpoint,
            "random_weights": checkpoint == "random weights",
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "max_sessions": max_sessions,
            "everything_options": list(sess.EVERYTHING_OPTIONS + sess.HIERARCHICAL_ONLY_OPTIONS),
            "decoder": decoder,
            "decoder_note": decoder_note,
            "browser_decoder": None if web_runtime is None else {
                "runtime": f"/ort/{Path(RUNTIME_FILES[0]).name}",
                "wasm": f"/ort/{Path(RUNTIME_FILES[1]).name}",
                "model": "/api/decoder.onnx",
                "img_size": int(sam.image_encoder.img_size),
                "mask_threshold": float(sam.mask_threshold),
            },
        })

    async def embed(request: Request) -> Response:
        data = await _image_bytes(request, max_upload_bytes)
        t0 = time.perf_counter()
        image = await run_in_threadpool(sess.decode_image, data, max_pixels)
        session = await run_in_threadpool(store.create, image)
        out = session.status()
        out["decode_seconds"] = round(time.perf_counter() - t0 - session.embed_seconds, 4)
        return _json(out)

    async def predict(request: Request) -> Response:
        obj = await _json_body(request)
        session = session_of(obj)
        return _json(await run_in_threadpool(sess.predict, session, obj))

    async def everything(request: Request) -> Response:
        obj = await _json_body(request)
        session = session_of(obj)
        unknown = sorted(set(obj) - {"session_id", "hierarchical", "options"})
        if unknown:
            raise ClientError(400, f"unknown field(s) {unknown}; everything takes session_id, hierarchical, options")
        hierarchical = obj.get("hierarchical", False)
        options = obj.get("options") or {}
        if not isinstance(hierarchical, bool):
            raise ClientError(400, f"'hierarchical' must be true or false, got {hierarchical!r}")
        if not isinstance(options, dict):
            raise ClientError(400, f"'options' must be a JSON object, got {options!r}")
        t0 = time.perf_counter()
        records = await run_in_threadpool(sess.everything, session, hierarchical, options)
        return _json({"records": records, "count": len(records), "hierarchical": hierarchical,
                      "seconds": round(time.perf_counter() - t0, 3)})

    async def session_status(request: Request) -> Response:
        return _json(store.get(request.path_params["session_id"]).status())

    async def session_embedding(request: Request) -> Response:
        session = store.get(request.path_params["session_id"])
        data, shape = await run_in_threadpool(sess.embedding_bytes, session)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Shape": ",".join(map(str, shape)), "X-Dtype": "float32",
                                 "Cache-Control": "no-store"})

    async def decoder_model(request: Request) -> Response:
        try:
            path = await run_in_threadpool(decoder_cache.path)
        except ImportError as exc:
            raise ClientError(501, str(exc))
        except Exception as exc:  # the export itself failed: say so, the page decodes on the server
            raise ClientError(503, f"exporting the ONNX decoder failed ({type(exc).__name__}: {exc}); "
                                   "use server decoding") from None
        return FileResponse(path, media_type="application/octet-stream", filename="decoder.onnx")

    async def runtime_file(request: Request) -> Response:
        name = request.path_params["name"]
        names = {Path(f).name for f in RUNTIME_FILES}
        if web_runtime is None:
            raise ClientError(404, f"no {name!r} here: browser decoding is off on this server "
                                   "(start it with --decoder browser, after sam-drop-in serve --fetch-web-runtime)")
        if name not in names:
            raise ClientError(404, f"no {name!r} here: /ort/ serves only {', '.join(sorted(names))}")
        return FileResponse(Path(web_runtime) / name, media_type=RUNTIME_MEDIA_TYPES[Path(name).suffix],
                            headers={"Cache-Control": "max-age=86400"})

    async def session_delete(request: Request) -> Response:
        store.delete(request.path_params["session_id"])
        return Response(status_code=204)

    def answer(status: Callable[[Any], int]) -> Callable[[Request, Any], Awaitable[Response]]:
        # Every error is {"error": one line} with the status the exception calls for.
        async def handler(request: Request, exc: Any) -> Response:
            message = exc.detail if isinstance(exc, HTTPException) else str(exc)
            return JSONResponse({"error": " ".join(str(message).split())}, status_code=status(exc))

        return handler

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/everything", everything, methods=["POST"]),
        Route("/api/session/{session_id}", session_status, methods=["GET"]),
        Route("/api/session/{session_id}", session_delete, methods=["DELETE"]),
        Route("/api/session/{session_id}/embedding", session_embedding, methods=["GET"]),
        Route("/api/decoder.onnx", decoder_model, methods=["GET"]),
        Route("/ort/{name}", runtime_file, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    handlers = {
        ClientError: answer(lambda exc: exc.status),
        # InputError is the package's bad-input type (a ValueError): the predictor's and the
        # generators' own validation messages go back to the client unchanged.
        InputError: answer(lambda exc: 413 if isinstance(exc, sess.ImageTooLarge) else 400),
        sess.SessionNotFound: answer(lambda exc: 404),
        sess.Busy: answer(lambda exc: 409),
        HTTPException: answer(lambda exc: exc.status_code),
    }
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=[Middleware(CrossOriginIsolation)])
    app.state.sessions = store
    return app
