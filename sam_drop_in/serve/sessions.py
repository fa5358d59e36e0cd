"""Per-image sessions of ``sam-drop-in serve``: one cached embedding per uploaded image.

Each upload gets its own :class:`Session` (an unguessable id, its own ``SamPredictor`` over the
shared model), so several tabs work at once without seeing each other's image; the store drops
the least recently used one beyond ``max_sessions``. No web framework here: ``app.py`` turns the
exceptions raised here into 4xx responses.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np

from .._errors import InputError
from .._validation import AMG_OPTIONS

# Options of the everything generators a client may set (segment_anything's scripts/amg.py
# settings, plus TinySAM's high_score_thresh for the hierarchical generator). Anything else is
# refused by name rather than passed through, so a typo is an error, not a silent default.
EVERYTHING_OPTIONS = tuple(name for name, *_ in AMG_OPTIONS)
HIERARCHICAL_ONLY_OPTIONS = ("high_score_thresh",)
INTEGER_OPTIONS = tuple(name for name, typ, *_ in AMG_OPTIONS if typ is int)
# Bounds that keep one request from occupying the server for hours or exhausting memory
# (points_per_side 128 is 16384 prompts per crop, 16x the default).
OPTION_LIMITS = {"points_per_side": (1, 128), "points_per_batch": (1, 1024), "crop_n_layers": (0, 2)}


class SessionNotFound(LookupError):
    """No session with that id (never created, or dropped to make room for newer ones)."""


class Busy(RuntimeError):
    """The session is already running an everything job."""


class ImageTooLarge(InputError):
    """The upload decodes to more pixels than the server accepts."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image file (JPEG, PNG or anything Pillow reads) to RGB.

    EXIF orientation is applied, as browsers do when they display the same file, so the
    coordinates the page sends refer to the pixels the user sees.

    Arguments:
      data (bytes): the file's bytes.
      max_pixels (int): largest width * height accepted.

    Returns:
      (np.ndarray): HxWx3 uint8 RGB, C-contiguous.

    Raises:
      InputError: not an image Pillow can read, or an empty one.
      ImageTooLarge: more than max_pixels pixels (checked before the pixels are decoded).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError("the upload is empty; send the bytes of a JPEG or PNG file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLarge(
                    f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server accepts at most "
                    f"{max_pixels / 1e6:.1f} (start it with a larger --max-megapixels, or downscale the image)"
                )
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError("the upload is not an image Pillow can read; send a JPEG or PNG file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"the upload could not be decoded as an image ({' '.join(str(exc).split())})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputError("the upload decodes to an empty image")
    return np.ascontiguousarray(rgb)


class Session:
    """One image, its cached embedding and the state of its everything job."""

    def __init__(self, session_id: str, predictor: Any, image: np.ndarray, embed_seconds: float) -> None:
        self.id = session_id
        self.predictor = predictor
        self.image = image
        self.embed_seconds = embed_seconds
        # SamPredictor holds per-image state; one prompt at a time per session.
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.everything_started: Optional[float] = None
        self.everything_seconds: Optional[float] = None
        self.everything_progress: Optional[Any] = None  # progress.EverythingProgress while a job runs

    def status(self) -> Dict[str, Any]:
        running = self.everything_started is not None
        progress = self.everything_progress
        return {
            "session_id": self.id,
            "width": int(self.image.shape[1]),
            "height": int(self.image.shape[0]),
            "embed_seconds": round(self.embed_seconds, 4),
            "everything_running": running,
            "everything_elapsed_seconds": round(time.monotonic() - self.everything_started, 2) if running else None,
            "everything_seconds": None if self.everything_seconds is None else round(self.everything_seconds, 3),
            # {"done", "total", "fraction", "stage"}: point batches decoded so far (while running)
            "everything_progress": progress.snapshot() if running and progress is not None else None,
            # (h, w) the image was resized to for the model (long side 1024): the frame of the
            # ONNX decoder's point_coords
            "input_size": [int(v) for v in self.predictor.input_size],
        }


class SessionStore:
    """Sessions by id, at most ``max_sessions``, least recently used dropped first.

    Arguments:
      sam (Sam): the model every session's predictor shares (weights are read-only here).
      max_sessions (int): how many images stay cached at once (each holds its image and a
        256x64x64 float32 embedding, 4 MiB, plus the predictor's caches).
    """

    def __init__(self, sam: Any, max_sessions: int = 8) -> None:
        if max_sessions < 1:
            raise InputError(f"max_sessions must be at least 1, got {max_sessions}")
        self.sam = sam
        self.max_sessions = max_sessions
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, image: np.ndarray) -> Session:
        """Compute the embedding of ``image`` and keep it under a new session id.

        Arguments:
          image (np.ndarray): HxWx3 uint8 RGB, any size (SamPredictor resizes it for the model).

        Returns:
          (Session): the new session.
        """
        from ..predictor import SamPredictor

        predictor = SamPredictor(self.sam)
        t0 = time.perf_counter()
        predictor.set_image(image)
        seconds = time.perf_counter() - t0
        session = Session(secrets.token_urlsafe(16), predictor, image, seconds)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: Any) -> Session:
        """The session with this id, marked as just used.

        Raises:
          SessionNotFound: no such session (the message says what to do).
        """
        with self._lock:
            session = self._sessions.get(session_id) if isinstance(session_id, str) else None
            if session is None:
                raise SessionNotFound(
                    f"unknown session_id {session_id!r}: it was never created or was dropped to make room "
                    f"(this server keeps the {self.max_sessions} most recently used images); "
                    "POST the image to /api/embed again"
                )
            self._sessions.move_to_end(session_id)
            session.last_used = time.monotonic()
            return session

    def delete(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise SessionNotFound(f"unknown session_id {session_id!r}")


def _as_array(value: Any, name: str) -> np.ndarray:
    # Only the JSON-to-array step happens here; the shape and value checks are SamPredictor's.
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"'{name}' must be a list of numbers (nested as documented), got {value!r}") from None


def predict(session: Session, prompt: Dict[str, Any]) -> Dict[str, Any]:
    """Run SamPredictor.predict for a JSON prompt on the session's cached embedding.

    Arguments:
      session (Session): the image.
      prompt (dict): ``points`` (list of [x, y], pixels of the original image) with ``labels``
        (list of 1 = foreground / 0 = background), and/or ``box`` ([x0, y0, x1, y1], pixels);
        ``multimask_output`` (bool, default: true for a single point and no box, as
        segment_anything advises for ambiguous prompts); ``best_only`` (bool, default false:
        return only the mask with the highest predicted IoU).

    Returns:
      (dict): ``masks``: list of {segmentation: uncompressed RLE (pycocotools' column-major
        {"size": [h, w], "counts": [...]}), score: predicted IoU, area: pixels}, best first;
        ``seconds``: time spent in the predictor and encoding.

    Raises:
      InputError: malformed prompt (the predictor's own message where it did the check).
    """
    import torch

    from ..utils.amg import mask_to_rle_pytorch

    unknown = sorted(set(prompt) - {"session_id", "points", "labels", "box", "multimask_output", "best_only"})
    if unknown:
        raise InputError(f"unknown field(s) {unknown}; a prompt has points, labels, box, multimask_output, best_only")
    points = prompt.get("points")
    labels = prompt.get("labels")
    box = prompt.get("box")
    if points is None and box is None:
        raise InputError("a prompt needs 'points' (with 'labels') or a 'box'")
    coords = None if points is None else _as_array(points, "points")
    labs = None if labels is None else _as_array(labels, "labels")
    if labs is not None and labs.size and not np.all(np.isin(labs, (0, 1))):
        raise InputError(f"'labels' must be 1 (foreground) or 0 (background), got {labels!r}")
    box_arr = None if box is None else _as_array(box, "box")
    multimask = prompt.get("multimask_output")
    if multimask is None:
        multimask = box is None and coords is not None and coords.ndim == 2 and len(coords) == 1
    best_only = prompt.get("best_only", False)
    for name, value in (("multimask_output", multimask), ("best_only", best_only)):
        if not isinstance(value, bool):
            raise InputError(f"'{name}' must be true or false, got {value!r}")

    t0 = time.perf_counter()
    with session.lock:
        masks, scores, _ = session.predictor.predict(
            point_coords=coords, point_labels=labs, box=box_arr, multimask_output=multimask
        )
    order = np.argsort(-scores, kind="stable")
    if best_only:
        order = order[:1]
    rles = mask_to_rle_pytorch(torch.from_numpy(np.ascontiguousarray(masks[order])))
    out = [
        {"segmentation": rle, "score": float(scores[i]), "area": int(masks[i].sum())}
        for rle, i in zip(rles, order)
    ]
    return {"masks": out, "seconds": round(time.perf_counter() - t0, 4)}


def everything(session: Session, hierarchical: bool = False, options: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Run the automatic (or TinySAM's hierarchical) mask generator on the session's image.

    Arguments:
      session (Session): the image.
      hierarchical (bool): SamHierarchicalMaskGenerator instead of SamAutomaticMaskGenerator.
      options (dict or None): generator settings, names from EVERYTHING_OPTIONS (plus
        high_score_thresh when hierarchical); unset ones keep the generator's defaults.

    Returns:
      (list of dict): the generator's records with COCO RLE segmentations (output_mode
        'coco_rle'), the records ``sam-drop-in everything --convert-to-rle`` writes.

    Raises:
      InputError: unknown option or a value the generator refuses.
      Busy: an everything job already runs for this session.
    """
    options = dict(options or {})
    allowed = EVERYTHING_OPTIONS + (HIERARCHICAL_ONLY_OPTIONS if hierarchical else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"unknown everything option(s) {unknown}; allowed: {', '.join(allowed)}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"everything option {key!r} must be a number, got {value!r}")
        if key in INTEGER_OPTIONS and not isinstance(value, int):
            raise InputError(f"everything option {key!r} must be an integer, got {value!r}")
        lo, hi = OPTION_LIMITS.get(key, (None, None))
        if lo is not None and not lo <= value <= hi:
            raise InputError(f"everything option {key!r} must be between {lo} and {hi} on this server, got {value!r}")
    from .progress import EverythingProgress, counting_generator

    state = EverythingProgress()
    try:
        generator = counting_generator(hierarchical, session.predictor.model, state, output_mode="coco_rle", **options)
    except TypeError as exc:  # e.g. a float where the generator needs an int
        raise InputError(f"bad everything options: {exc}") from None
    with session.lock:
        if session.everything_started is not None:
            raise Busy("an everything job is already running for this session; wait for it to finish")
        session.everything_progress = state
        session.everything_started = time.monotonic()
    try:
        records = generator.generate(session.image)
        session.everything_seconds = time.monotonic() - session.everything_started
    finally:
        session.everything_started = None
        session.everything_progress = None
    return records


def embedding_bytes(session: Session) -> tuple:
    """The session's cached image embedding as raw float32 bytes (C order) and its shape.

    Arguments:
      session (Session): the image.

    Returns:
      (bytes, tuple): the 1x256x64x64 embedding as little-endian float32 (the byte order of
        a browser's Float32Array on every platform WebAssembly runs on), and its shape.
    """
    with session.lock:
        emb = session.predictor.get_image_embedding()
    arr = np.ascontiguousarray(emb.detach().float().cpu().numpy(), dtype="<f4")
    return arr.tobytes(), tuple(arr.shape)
