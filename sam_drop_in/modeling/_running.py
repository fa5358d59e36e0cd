"""Which reduced-precision parts (the image encoder, the mask decoder) have code running on
this thread.

``precision.optimize`` puts a float32 boundary on every module method inside those parts: a
call from outside casts inputs to the part's dtype and outputs back to float32, and a call made
while the part's own code runs passes through untouched. Code that works on a part's weights
directly rather than through its ``forward`` (``image_decoder.ImageDecoder``'s fast path, which
casts its own inputs and outputs) runs ``with inside(part):`` so that the submodules it calls
count as internal.
"""

import contextlib
import threading
from typing import Iterator, Set

from torch import nn

_LOCAL = threading.local()


def running_parts() -> Set[int]:
    """ids of the parts whose code runs on this thread (a per-thread set, mutable)."""
    parts = getattr(_LOCAL, "parts", None)
    if parts is None:
        parts = _LOCAL.parts = set()
    return parts


@contextlib.contextmanager
def inside(part: nn.Module) -> Iterator[None]:
    """Marks ``part`` as running on this thread for the block (re-entrant; cleared on error)."""
    parts, key = running_parts(), id(part)
    if key in parts:
        yield
        return
    parts.add(key)
    try:
        yield
    finally:
        parts.discard(key)
