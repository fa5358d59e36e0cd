"""``sam-drop-in serve``: click-to-segment in the browser, over a local JSON/HTTP API.

The encoder runs once per uploaded image (PyTorch, on the server) and the embedding stays
cached in a per-image session; every hover, click or box is decoded on the server over that
embedding. See docs/serve.md.

Needs the ``serve`` extra (Starlette, uvicorn, python-multipart, pycocotools):
``pip install 'sam-drop-in[serve]'``. Importing this package imports none of them; they are
imported by :func:`create_app` and :func:`run_server`.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

# Module -> pip name of what the server needs: the web application, the HTTP server, multipart
# uploads, everything mode's COCO RLE. Checked together so the message lists all that are missing.
REQUIRED = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
            "pycocotools": "pycocotools"}


def missing_dependencies() -> list:
    """The pip names of the serve extra's packages that cannot be imported here."""
    missing = []
    for module, pip in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip)
    return missing


def require_dependencies() -> None:
    """Raise ImportError naming the install command when a package of the serve extra is missing."""
    missing = missing_dependencies()
    if missing:
        raise ImportError(
            f"sam-drop-in serve needs {', '.join(missing)}: pip install 'sam-drop-in[serve]'"
        )


def create_app(sam: Any, **kwargs: Any):
    """Build the ASGI application; see :func:`sam_drop_in.serve.app.create_app` for the arguments."""
    require_dependencies()
    from .app import create_app as _create_app

    return _create_app(sam, **kwargs)


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               sockets: Optional[list] = None) -> None:
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C).

    Arguments:
      app: the application from :func:`create_app`.
      host (str): interface to bind; the default serves only this machine.
      port (int): TCP port (0 picks a free one).
      log_level (str): uvicorn's log level.
      sockets (list or None): already bound sockets to serve on instead of host/port (tests).
    """
    require_dependencies()
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    uvicorn.Server(config).run(sockets=sockets)


__all__ = ["create_app", "run_server", "missing_dependencies", "require_dependencies"]
