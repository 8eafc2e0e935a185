"""One image of a person: placement, street backdrop, the person, an occluder, then the camera.

Each step draws from the image's generator in a fixed order, so one (seed, identity, image)
stream always gives the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from tpr_core.data.synth.attributes import VIEWS
from tpr_core.data.synth.figure import _Box, _Canvas, _draw_person, _Person

_VIEW_P = (0.35, 0.35, 0.15, 0.15)
#: Items an occluder can hide (the captions then leave them out).
_OCCLUDABLE = ("shoes", "bag", "logo", "hat", "glasses")


def render_image(
    attributes: dict[str, Any], rng: np.random.Generator, size: tuple[int, int] = (384, 128)
) -> tuple[Image.Image, dict[str, Any]]:
    """Render one image of a person.

    Args:
        attributes: One identity's attribute dict (see ``make_identities``).
        rng: Source of every per-image choice (view, pose, placement, background, light, noise).
        size: (height, width) in pixels.

    Returns:
        The RGB image and its info: ``view`` (one of ``VIEWS``), ``occlusion`` (None, "bottom" or
        "side"), ``hidden`` (items mostly covered by the occluder) and ``torso_box``: a pixel box
        (x0, y0, x1, y1) on the lower torso, clear of logo, hair and backpack in front and back
        views, where the upper garment colour shows.
    """
    h, w = size
    view = VIEWS[int(rng.choice(len(VIEWS), p=_VIEW_P))]
    hp = h * rng.uniform(0.8, 0.93)
    top = (h - hp) * rng.uniform(0.15, 0.85)
    cx = w / 2 + w * rng.uniform(-0.07, 0.07)
    u = min(hp, 3.0 * w)  # horizontal unit: keeps the person inside narrow images
    img = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
    cv = _Canvas(img, cx, top, hp, u)
    person = _draw_person(cv, attributes, view, rng)
    occlusion, occ_box = _occlude(img, cv, rng)
    hidden = sorted(
        name
        for name, box in person.boxes.items()
        if name in _OCCLUDABLE and occ_box and _covered(box, occ_box) >= 0.4
    )
    out = _camera(img, rng)
    info = {"view": view, "occlusion": occlusion, "hidden": hidden, "torso_box": _torso_box(cv, person)}
    return out, info


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, amp: float) -> np.ndarray:
    """Smooth random texture around ``base`` colour: low-res noise upsampled bilinearly."""
    gh, gw = max(2, h // 12), max(2, w // 12)
    # Mostly luminance, a little chroma: backgrounds must not look like garment colours.
    low = rng.standard_normal((gh, gw, 3), dtype=np.float32) * (amp * 0.3)
    low += rng.standard_normal((gh, gw, 1), dtype=np.float32) * amp
    low8 = Image.fromarray(np.clip(low + 128.0, 0, 255).astype(np.uint8))
    up = np.asarray(low8.resize((w, h), Image.BILINEAR), dtype=np.float32) - 128.0
    return base[None, None, :] + up  # (h, w, 3)


def _muted(rng: np.random.Generator, lo: float, hi: float, tint: float) -> np.ndarray:
    """A greyish colour: grey level in [lo, hi) plus a small random tint."""
    g = rng.uniform(lo, hi)
    return np.clip(g + rng.normal(0.0, tint, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Street-like backdrop: wall with blocks (windows, doors, poles), floor, gradient, texture."""
    wall, floor = _muted(rng, 70, 200, 16), _muted(rng, 60, 170, 10)
    horizon = int(h * rng.uniform(0.55, 0.8))
    arr = np.empty((h, w, 3), np.float32)
    arr[:horizon] = wall
    arr[horizon:] = floor
    for _ in range(int(rng.integers(2, 7))):  # blocks on the wall
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.9) * horizon
        bw, bh = rng.uniform(0.08, 0.6) * w, rng.uniform(0.05, 0.5) * h
        xs, ys = (
            slice(max(0, int(x0)), max(0, int(x0 + bw))),
            slice(max(0, int(y0)), min(horizon, int(y0 + bh))),
        )
        arr[ys, xs] = arr[ys, xs] * rng.uniform(0.7, 1.25) + rng.normal(0, 8, 3)
    if rng.random() < 0.5:  # floor tiles / curb lines
        step = max(2, int(h * rng.uniform(0.03, 0.08)))
        arr[horizon::step] *= 0.85
    arr *= np.linspace(rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.1), h, dtype=np.float32)[:, None, None]
    arr += _texture(rng, h, w, np.zeros(3, np.float32), rng.uniform(3, 12))
    return arr


def _occlude(
    img: Image.Image, cv: _Canvas, rng: np.random.Generator
) -> tuple[str | None, tuple[int, int, int, int] | None]:
    """Paste a patch of background-like texture over the bottom or one side (one image in five).

    Returns:
        The occlusion kind (None, "bottom" or "side") and its pixel box (x0, y0, x1, y1) or None.
    """
    w, h = img.size
    occlusion, occ_box = None, None
    r = rng.random()
    if r < 0.1:
        occlusion = "bottom"
        y0 = int(cv.p(0, rng.uniform(0.78, 0.95))[1])
        occ_box = (0, y0, w, h)
    elif r < 0.2:
        occlusion = "side"
        ow = int(w * rng.uniform(0.15, 0.3))
        x0 = 0 if rng.random() < 0.5 else w - ow
        y0 = int(h * rng.uniform(0.0, 0.5))
        occ_box = (x0, y0, x0 + ow, h)
    if occ_box is not None:
        ox0, oy0, ox1, oy1 = occ_box
        if ox1 > ox0 and oy1 > oy0:
            patch = _texture(rng, oy1 - oy0, ox1 - ox0, _muted(rng, 50, 200, 14), rng.uniform(5, 15))
            img.paste(Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)), (ox0, oy0))
    return occlusion, occ_box


def _covered(box: _Box, occ: tuple[int, int, int, int]) -> float:
    """Fraction of ``box`` inside ``occ`` (both x0, y0, x1, y1)."""
    ix = max(0.0, min(box[2], occ[2]) - max(box[0], occ[0]))
    iy = max(0.0, min(box[3], occ[3]) - max(box[1], occ[1]))
    area = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
    return ix * iy / area


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera effects: per-channel contrast and gain, blur, light from one side, sensor noise."""
    w, h = img.size
    contrast = rng.uniform(0.88, 1.12)
    gain = rng.uniform(0.87, 1.13) * rng.uniform(0.97, 1.03, 3)
    levels = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.clip(((levels - 128.0) * contrast + 128.0) * g, 0, 255) for g in gain])
    img = img.point(np.round(lut).astype(np.uint8).tolist())
    centre = rng.uniform(3.0, 14.0) * (384 / h)  # small images get less blur
    if centre < 14.0:
        img = img.filter(ImageFilter.Kernel((3, 3), (1, 2, 1, 2, centre, 2, 1, 2, 1)))
    ramp = 1.0 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, w, dtype=np.float32)  # light from one side
    arr = np.asarray(img, dtype=np.float32) * ramp[None, :, None]
    arr += rng.standard_normal((h, w, 1), dtype=np.float32) * rng.uniform(1.5, 6.0)  # luminance noise
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * 2.0
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _torso_box(cv: _Canvas, person: _Person) -> list[int]:
    """Pixel box on the lower torso: below logo, hair and backpack, above the hem."""
    ty0, ty1 = cv.p(0, 0.39)[1], cv.p(0, 0.46)[1]
    half = (0.03 if person.side_view else person.ww * 0.45) * cv.u
    return [int(round(cv.cx - half)), int(round(ty0)), int(round(cv.cx + half)) + 1, int(round(ty1)) + 1]
