"""``sam-drop-in serve``: the click-to-segment page and its JSON/HTTP API (docs/serve.md)."""

from __future__ import annotations

import argparse
import errno
import socket

from . import _common as c
from ._common import CliError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="a local web page to segment images by hovering, clicking and drawing boxes",
        description="Serve a page (and a JSON/HTTP API under /api) that computes an image's embedding once and "
                    "decodes every hover, click and box on it; 'Everything' runs the automatic mask generator. "
                    "Needs the serve extra: pip install 'sam-drop-in[serve]'.")
    c.add_model_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Interface to bind (default 127.0.0.1: this machine only). 0.0.0.0 exposes the server, "
                        "which has no authentication, to the network.")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one).")
    g.add_argument("--max-upload-mb", type=float, default=32.0, help="Largest image upload in MiB (default 32).")
    g.add_argument("--max-megapixels", type=float, default=50.0,
                   help="Largest image in megapixels, width*height/1e6 (default 50).")
    g.add_argument("--max-sessions", type=int, default=8,
                   help="Images whose embeddings stay cached; the least recently used is dropped (default 8).")
    d = p.add_argument_group("decoding")
    d.add_argument("--decoder", choices=("server", "browser", "auto"), default="server",
                   help="Where the page decodes hover, click and box prompts: 'server' (default; PyTorch over the "
                        "cached embedding: the faster one in docs/serve.md's figures), 'browser' (the exported ONNX "
                        "decoder in onnxruntime-web, fetched with npm on first use), or 'auto' (browser when "
                        "onnxruntime-web is cached or can be fetched, else server). Without onnxruntime-web or onnx "
                        "the page decodes on the server and says why; with it, the page offers both.")
    d.add_argument("--fetch-web-runtime", action="store_true",
                   help="Only fetch onnxruntime-web (pinned version, with npm pack, sha512-checked) into the "
                        "per-user cache ($XDG_CACHE_HOME/sam_drop_in or ~/.cache/sam_drop_in), then exit.")


def _say(line: str) -> None:
    print(f"sam-drop-in serve: {line}", flush=True)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CliError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliError(f"port {port} on {host} is in use; pass another --port (0 picks a free one)") from None
        raise CliError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    # Listening now (not when uvicorn starts) lets a client that read the printed address
    # connect at once: its connection waits in the backlog instead of being refused.
    sock.listen(128)
    return sock


def _decoder_setup(choice: str):
    """(decoder, web runtime folder or None, note for the page) for ``--decoder choice``.

    A browser decoder that cannot be had (npm missing, the fetch failed, onnx not installed)
    falls back to server decoding with the reason printed and shown on the page.
    """
    from ..serve import web_runtime
    from ..serve.browser_decoder import onnx_missing
    from .._errors import WebRuntimeError

    folder = web_runtime.installed()
    if choice == "server":
        # Offer the browser decoder on the page when it is already here (nothing fetched).
        return "server", (folder if folder is not None and onnx_missing() is None else None), ""
    why = onnx_missing()
    if why is None and folder is None:
        try:
            folder = web_runtime.fetch(log=_say)
        except WebRuntimeError as exc:
            why = str(exc)
    if why is not None:
        note = f"browser decoding unavailable: {why}"
        (c.warn if choice == "browser" else print)(f"sam-drop-in serve: {note}")
        return "server", None, note
    return "browser", folder, ""


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {args.port}")
    for name, value in (("--max-upload-mb", args.max_upload_mb), ("--max-megapixels", args.max_megapixels),
                        ("--max-sessions", args.max_sessions)):
        if not value > 0:
            raise CliError(f"{name} must be positive, got {value}")
    if args.fetch_web_runtime:
        from .._errors import WebRuntimeError
        from ..serve import web_runtime

        try:
            folder = web_runtime.fetch(log=_say)
        except WebRuntimeError as exc:
            raise CliError(str(exc), code=c.EXIT_FAILED) from None
        _say(f"{web_runtime.PACKAGE} {web_runtime.VERSION} is in {folder}")
        return c.EXIT_OK
    from ..serve import create_app, missing_dependencies, run_server

    missing = missing_dependencies()
    if missing:
        raise CliError(f"serve needs {', '.join(missing)}: pip install 'sam-drop-in[serve]'")
    sock = _bind(args.host, args.port)
    decoder, runtime, note = _decoder_setup(args.decoder)
    sam, model_type, ckpt_desc = c.load_model(args.model_type, args.checkpoint, args.device)
    app = create_app(sam, model_type=model_type, checkpoint=ckpt_desc, max_sessions=args.max_sessions,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
                     decoder=decoder, web_runtime=runtime, decoder_note=note)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if args.host not in LOOPBACK:
        c.warn(f"--host {args.host}: the server (no authentication) is reachable from other machines")
    _say(f"{model_type} ({ckpt_desc}) on http://{shown}:{port}/  (Ctrl-C stops it)")
    _say(f"decoding in the {decoder}"
         + (f" (onnxruntime-web from {runtime})" if runtime is not None else " (browser decoding not offered)"))
    try:
        run_server(app, sockets=[sock], log_level="warning")
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: for a server that is the
        # normal way to stop, not a failure.
        pass
    _say("stopped")
    return c.EXIT_OK
