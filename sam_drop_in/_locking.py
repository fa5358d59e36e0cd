"""Per-predictor serialisation: a predictor's image state (embedding, sizes, caches) is written by
``set_image`` and read by ``predict``; two threads sharing one predictor must never see one
image's embedding with the other's sizes. numpy-free and torch-free (the ONNX predictor uses it).
"""

import functools
import threading


def serialised(method):
    """Run ``method`` holding ``self.lock`` (an ``RLock``, so that methods calling each other on the
    same predictor do not deadlock)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class LockedState:
    """Mixin giving a predictor its ``lock`` and keeping it copyable and picklable (a lock is
    neither): a copy gets a fresh lock of its own."""

    def _init_lock(self) -> None:
        self.lock = threading.RLock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_lock()
