"""A real `sam-drop-in serve` application on a loopback port, for the serve tests.

The server runs uvicorn in a daemon thread on a socket bound to 127.0.0.1 port 0 (a free port
chosen by the OS), so tests talk HTTP to it exactly as a browser or an annotation tool would.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np


def random_vit_t(seed: int = 0):
    """vit_t with random weights (seeded): masks are meaningless but every code path runs."""
    import torch

    from sam_drop_in.build_sam import sam_model_registry

    torch.manual_seed(seed)
    return sam_model_registry["vit_t"]().eval()


def sample_image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 picture with a few flat shapes (some structure for the decoder)."""
    rng = np.random.RandomState(seed)
    img = np.full((h, w, 3), 40, np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = (220, 60, 60)
    img[h // 2 : h - 10, w // 2 : w - 15] = (60, 200, 90)
    img += rng.randint(0, 12, img.shape).astype(np.uint8)
    return img


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


@contextmanager
def running_server(app):
    """Serve ``app`` on a free loopback port; yields its base URL, stops the server after."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
