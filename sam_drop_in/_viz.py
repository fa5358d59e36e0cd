"""Overlay pictures of masks and prompts (PIL and numpy only; no matplotlib, no OpenCV).

Used by the ``sam-drop-in`` command and the examples. Every function takes and returns
HxWx3 uint8 RGB arrays or PIL images, with pixel coordinates (x right, y down).
"""

from __future__ import annotations

import colorsys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = Tuple[int, int, int]

FOREGROUND: Colour = (40, 220, 60)
BACKGROUND: Colour = (235, 40, 40)
BOX: Colour = (255, 200, 0)


def palette(n: int, seed: int = 0) -> List[Colour]:
    """``n`` distinct, saturated colours.

    Arguments:
      n (int): number of colours.
      seed (int): shifts the hues, so that two pictures can use different palettes.

    Returns:
      (list of (int, int, int)): RGB colours in 0..255.
    """
    # Golden-ratio hue steps keep neighbouring indices far apart on the colour wheel, so
    # adjacent masks (which are usually listed next to each other) get different colours.
    out = []
    for i in range(n):
        h = (0.13 + seed * 0.37 + i * 0.61803398875) % 1.0
        s = 0.75 if i % 2 == 0 else 0.95
        v = 1.0 if i % 3 != 2 else 0.8
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (HxW bool)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    colours: Optional[Sequence[Colour]] = None,
    alpha: float = 0.5,
    outline: bool = True,
) -> np.ndarray:
    """Tint each mask over the image in its own translucent colour.

    Larger masks are painted first so that small ones stay visible on top of them.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      masks (sequence of np.ndarray): each HxW, bool (or 0/1).
      colours (sequence of RGB tuples or None): one per mask; default :func:`palette`.
      alpha (float): opacity of the tint, 0..1.
      outline (bool): draw each mask's boundary in its colour at full opacity.

    Returns:
      (np.ndarray): HxWx3 uint8 RGB, a new array.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    out = image.astype(np.float32)
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for m in masks:
        if m.shape != image.shape[:2]:
            raise ValueError(f"mask shape {m.shape} does not match image shape {image.shape[:2]}")
    colours = list(colours) if colours is not None else palette(len(masks))
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    for i in order:
        m = masks[i]
        if not m.any():
            continue
        c = np.asarray(colours[i], np.float32)
        out[m] = (1.0 - alpha) * out[m] + alpha * c
        if outline:
            out[_boundary(m)] = c
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def draw_label(picture: Image.Image, xy: Tuple[float, float], text: str, size: int,
               colour: Colour = (255, 255, 255)) -> None:
    """Write ``text`` on ``picture`` (in place) with its top-left corner at ``xy`` on a dark
    box, moved inside the picture where it would stick out."""
    draw = ImageDraw.Draw(picture)
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0 + 6, y1 - y0 + 6
    W, H = picture.size
    x = min(max(0, int(xy[0])), max(0, W - w))
    y = min(max(0, int(xy[1])), max(0, H - h))
    draw.rectangle([x, y, x + w, y + h], fill=(0, 0, 0))
    draw.text((x + 3 - x0, y + 3 - y0), text, fill=colour, font=font)


def draw_prompts(
    picture: Image.Image,
    points: Optional[Iterable[Sequence[float]]] = None,
    labels: Optional[Iterable[int]] = None,
    boxes: Optional[Iterable[Sequence[float]]] = None,
) -> Image.Image:
    """Mark point prompts (green: foreground, label 1; red: background, label 0) and box
    prompts (yellow rectangles) on ``picture`` in place.

    Arguments:
      picture (PIL.Image.Image): RGB picture to draw on.
      points (iterable of (x, y) or None): pixel coordinates.
      labels (iterable of int or None): 1 or 0 per point; default all 1.
      boxes (iterable of (x0, y0, x1, y1) or None): XYXY pixel coordinates.

    Returns:
      (PIL.Image.Image): the same picture.
    """
    draw = ImageDraw.Draw(picture)
    short = min(picture.size)
    r = max(6, short // 50)
    width = max(2, short // 200)
    for box in (boxes if boxes is not None else []):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=BOX, width=width)
    points = [tuple(float(v) for v in p[:2]) for p in (points if points is not None else [])]
    labels = list(labels) if labels is not None else [1] * len(points)
    for (x, y), lab in zip(points, labels):
        fill = FOREGROUND if int(lab) == 1 else BACKGROUND
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255), width=width)
        if int(lab) != 1:  # a cross makes background clicks readable without colour
            d = r * 0.6
            draw.line([x - d, y - d, x + d, y + d], fill=(255, 255, 255), width=width)
            draw.line([x - d, y + d, x + d, y - d], fill=(255, 255, 255), width=width)
    return picture


def prompt_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    scores: Sequence[float],
    points: Optional[Sequence[Sequence[float]]] = None,
    labels: Optional[Sequence[int]] = None,
    boxes: Optional[Sequence[Sequence[float]]] = None,
    alpha: float = 0.5,
) -> Image.Image:
    """The picture of a prompted segmentation: masks tinted, prompts marked, scores written.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      masks (sequence of np.ndarray): HxW bool masks to show (one per prompt, usually).
      scores (sequence of float): the predicted IoU of each mask, written at its top-left corner.
      points, labels, boxes: the prompts, as for :func:`draw_prompts`.
      alpha (float): opacity of the mask tint.

    Returns:
      (PIL.Image.Image): RGB picture of the image's size.
    """
    picture = Image.fromarray(overlay_masks(image, masks, alpha=alpha))
    size = max(12, min(picture.size) // 30)
    colours = palette(len(masks))
    for i, (m, s) in enumerate(zip(masks, scores)):
        # The mask's top-left corner; for an empty mask its box's, else the picture's.
        ys, xs = np.nonzero(np.asarray(m, bool))
        if len(xs):
            anchor = (int(xs.min()), int(ys.min()))
        else:
            anchor = (int(boxes[i][0]), int(boxes[i][1])) if boxes is not None and i < len(boxes) else (0, 0)
        draw_label(picture, (anchor[0], anchor[1] - size - 6), f"{float(s):.3f}", size, colour=colours[i])
    # Prompts last, so that no label hides a click.
    draw_prompts(picture, points, labels, boxes)
    return picture


def everything_overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.45,
                       caption: Optional[str] = None) -> Image.Image:
    """The picture of an everything-mode result: every mask in its own colour.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      masks (sequence of np.ndarray): HxW bool masks.
      alpha (float): opacity of the tints.
      caption (str or None): text written in the top-left corner (e.g. "37 masks").

    Returns:
      (PIL.Image.Image): RGB picture of the image's size.
    """
    picture = Image.fromarray(overlay_masks(image, masks, alpha=alpha))
    if caption:
        draw_label(picture, (4, 4), caption, max(12, min(picture.size) // 30))
    return picture


def side_by_side(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures of equal height next to each other on a white background."""
    h = max(p.height for p in pictures)
    w = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for p in pictures:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out
