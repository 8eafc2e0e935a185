"""Drawing one person with PIL: a canvas in person coordinates and one step per body part or item.

Coordinates: y is a fraction of the person's height from the top of the head, x a multiple of the
horizontal unit from the body's centre line. Front and back views draw the body symmetrically;
side views ("left", "right": the body side facing the camera) draw a walking profile, far limbs
first and dimmed. Every step appends the pixel box of the items it draws to the person's
``boxes``, so the occlusion check can tell which items an occluder hides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tpr_core.data.synth.attributes import _SKINS, COLORS, HAIR_COLORS

_RGB = tuple[int, int, int]
_Point = tuple[float, float]
_Box = tuple[float, ...]

_BUILD_WIDTH = {"thin": 0.86, "average": 1.0, "heavy": 1.24}
_EYE = (40, 30, 30)
_GLASSES = (20, 20, 24)
# Segment lengths and heights, in person heights.
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.16, 0.15, 0.22, 0.22
_HIP_Y, _SHOULDER_Y, _HEAD_Y = 0.49, 0.175, 0.068
#: (index, image-x sign) of the two body halves in a front or back view.
_SIDES = tuple(enumerate((-1.0, 1.0)))


def _shade(rgb: Sequence[float], f: float) -> _RGB:
    return tuple(int(max(0, min(255, round(c * f)))) for c in rgb)  # type: ignore[return-value]


def _union(a: _Box | None, b: _Box) -> _Box:
    """The box around boxes ``a`` (None: no box yet) and ``b``."""
    if a is None:
        return tuple(b)
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _limb_end(start: _Point, length: float, angle: float, hp_over_u: float) -> _Point:
    """End of a limb of ``length`` (person heights) at ``angle`` radians from straight down."""
    return (start[0] + math.sin(angle) * length * hp_over_u, start[1] + math.cos(angle) * length)


class _Canvas:
    """Drawing in person coordinates: y as a fraction of person height, x of the width unit."""

    def __init__(self, img: Image.Image, cx: float, top: float, hp: float, u: float) -> None:
        self.d = ImageDraw.Draw(img)
        self.cx, self.top, self.hp, self.u = cx, top, hp, u

    def p(self, x: float, y: float) -> _Point:
        return (self.cx + x * self.u, self.top + y * self.hp)

    def poly(self, pts: Sequence[_Point], fill: _RGB) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def _box(self, x: float, y: float, rx: float, ry: float) -> _Box:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        return (x0, y0, max(x0, x1), max(y0, y1))

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: _RGB) -> _Box:
        box = self._box(x, y, rx, ry)
        self.d.ellipse(box, fill=fill)
        return box

    def chord_top(self, x: float, y: float, rx: float, ry: float, fill: _RGB) -> _Box:
        box = self._box(x, y, rx, ry)
        self.d.chord(box, 180, 360, fill=fill)
        return (box[0], box[1], box[2], (box[1] + box[3]) / 2)

    def limb(self, a: _Point, b: _Point, w: float, fill: _RGB) -> None:
        pa, pb = self.p(*a), self.p(*b)
        wp = max(1.0, w * self.u)
        self.d.line([pa, pb], fill=fill, width=max(1, round(wp)))
        r = wp / 2
        for q in (pa, pb):  # round joints
            self.d.ellipse((q[0] - r, q[1] - r, q[0] + r, q[1] + r), fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: _RGB) -> _Box:
        (a, b), (c, d) = self.p(x0, y0), self.p(x1, y1)
        box = (min(a, c), min(b, d), max(a, c), max(b, d))
        self.d.rectangle(box, fill=fill)
        return box


class _Person:
    """One person being drawn: attributes, view, colours, proportions, and the boxes drawn so far.

    ``boxes`` maps "lower", "shoes", "bag", "logo", "hat" and "glasses" to pixel boxes
    (x0, y0, x1, y1).
    """

    def __init__(self, cv: _Canvas, a: dict[str, Any], view: str) -> None:
        self.cv, self.a, self.view = cv, a, view
        self.k = cv.hp / cv.u  # converts lengths in person heights to horizontal units
        self.boxes: dict[str, _Box] = {}
        b = self.b = _BUILD_WIDTH[a["build"]] * (0.93 if a["gender"] == "woman" else 1.0)
        self.skin, self.hair = _SKINS[a["skin"]], HAIR_COLORS[a["hair_color"]]
        self.up_c, self.low_c = COLORS[a["upper_color"]], COLORS[a["lower_color"]]
        self.shoe_c = COLORS[a["shoe_color"]]
        self.bag_c = COLORS[a["bag_color"]] if a["bag_color"] else None
        low, skin = self.low_c, self.skin
        legs = {"trousers": (low, low), "shorts": (low, skin), "skirt": (skin, skin)}
        self.thigh_c, self.shin_c = legs[a["lower_type"]]
        self.sw, self.ww = 0.122 * b, 0.092 * b  # shoulder and waist half-widths (front / back)
        self.depth_b, self.depth_f = 0.062 * b, 0.066 * b * (1.08 if a["build"] == "heavy" else 1.0)  # side
        self.hem = {"coat": 0.66, "jacket": 0.52}.get(a["upper_type"], 0.5)
        self.arm_w, self.thigh_w, self.shin_w = 0.045 * b, 0.062 * b, 0.046 * b
        self.side_view = view in ("left", "right")
        self.facing = 1.0 if view == "left" else -1.0  # side views: direction the person walks in

    def side_sign(self, side: str) -> float:
        """Image-x sign of the body's ``side`` in a front or back view (facing: left is image right)."""
        left = {"front": 1.0, "back": -1.0}.get(self.view, 0.0)
        return left if side == "left" else -left

    def leg(self, hip: _Point, ang: float, knee_bend: float, dim: float) -> _Point:
        """Thigh and shin (and the hem of shorts) from ``hip``; returns the ankle."""
        cv = self.cv
        knee = _limb_end(hip, _THIGH, ang, self.k)
        ankle = _limb_end(knee, _SHIN, ang - knee_bend, self.k)
        cv.limb(knee, ankle, self.shin_w, _shade(self.shin_c, dim))
        cv.limb(hip, knee, self.thigh_w, _shade(self.thigh_c, dim))
        if self.a["lower_type"] == "shorts":  # hem of the shorts above the knee
            mid = ((hip[0] + knee[0] * 2) / 3, (hip[1] + knee[1] * 2) / 3)
            cv.limb(hip, mid, self.thigh_w * 1.12, _shade(self.low_c, dim))
        return ankle

    def shoe(self, ankle: _Point, direction: float, dim: float) -> None:
        """A shoe at ``ankle``, seen from the front (``direction`` 0) or pointing along it."""
        fill = _shade(self.shoe_c, dim)
        if direction == 0.0:
            box = self.cv.ellipse(ankle[0], ankle[1] + 0.018, 0.033 * self.b, 0.022, fill)
        else:
            box = self.cv.ellipse(ankle[0] + direction * 0.025, ankle[1] + 0.018, 0.05, 0.02, fill)
        self.boxes["shoes"] = _union(self.boxes.get("shoes"), box)

    def arm(self, shoulder: _Point, ang: float, bend: float, dim: float) -> _Point:
        """Upper arm, forearm (in the sleeve or bare) and hand from ``shoulder``; returns the hand."""
        cv, arm_w = self.cv, self.arm_w
        elbow = _limb_end(shoulder, _UPPER_ARM, ang, self.k)
        wrist = _limb_end(elbow, _FOREARM, ang + bend, self.k)
        sleeve_c = _shade(self.up_c, dim)
        if self.a["sleeve"] == "long":
            cv.limb(elbow, wrist, arm_w * 0.9, sleeve_c)
            cv.limb(shoulder, elbow, arm_w, sleeve_c)
        else:
            cv.limb(elbow, wrist, arm_w * 0.8, _shade(self.skin, dim))
            cv.limb(shoulder, elbow, arm_w * 0.85, _shade(self.skin, dim))
            mid = ((shoulder[0] * 2 + elbow[0]) / 3, (shoulder[1] * 2 + elbow[1]) / 3)
            cv.limb(shoulder, mid, arm_w * 1.05, sleeve_c)
        hand = _limb_end(wrist, 0.02, ang + bend, self.k)
        cv.ellipse(hand[0], hand[1], 0.022 * self.b, 0.018, _shade(self.skin, dim))
        return hand

    def handbag(self, hand: _Point) -> None:
        """A handbag hanging from ``hand``."""
        x, y = hand
        self.cv.limb((x - 0.012, y), (x + 0.012, y + 0.02), 0.008, _shade(self.bag_c, 0.7))
        self.boxes["bag"] = self.cv.rect(x - 0.045, y + 0.015, x + 0.045, y + 0.085, self.bag_c)

    def neck(self) -> None:
        self.cv.rect(-0.018, 0.11, 0.018, 0.155, self.skin)


def _draw_person(cv: _Canvas, a: dict[str, Any], view: str, rng: np.random.Generator) -> _Person:
    """Draw the person of attributes ``a`` seen from ``view``; returns it with its item boxes."""
    p = _Person(cv, a, view)
    if p.side_view:
        _draw_side(p, rng)
    else:
        _draw_front_back(p, rng)
    if a["hat"]:
        _hat(p)
    return p


def _hat(p: _Person) -> None:
    hat_c = COLORS[p.a["hat"]]
    p.boxes["hat"] = p.cv.chord_top(0, _HEAD_Y - 0.012, 0.05, 0.05, hat_c)
    brim_x = 0.0 if not p.side_view else p.facing * 0.03
    p.cv.rect(brim_x - 0.055, _HEAD_Y - 0.016, brim_x + 0.055, _HEAD_Y - 0.008, _shade(hat_c, 0.85))


# ----------------------------------------------------------------------------- front / back


def _draw_front_back(p: _Person, rng: np.random.Generator) -> None:
    """Front or back view: legs, lower garment, torso, arms, head, then what lies over the body."""
    abd = rng.uniform(0.03, 0.22, 2)  # arm abduction per side
    bend = rng.uniform(-0.05, 0.2, 2)
    spread = rng.uniform(0.0, 0.1, 2)
    if p.a["hair_length"] == "long" and p.view == "front":  # hair behind the shoulders
        p.cv.poly([(-0.06, 0.06), (0.06, 0.06), (0.07, 0.27), (-0.07, 0.27)], p.hair)
    ankles = [p.leg((s * 0.048 * p.b, _HIP_Y), s * spread[i], -s * spread[i] * 0.5, 1.0) for i, s in _SIDES]
    for ank in ankles:
        p.shoe(ank, 0.0, 1.0)
    _front_back_lower(p, rng)
    _front_back_torso(p)
    hold_side = p.side_sign(p.a["bag_side"]) if p.a["bag"] == "handbag" else None
    hands = _front_back_arms(p, abd, bend, hold_side)
    p.neck()
    if p.view == "front":
        _front_head(p)
    else:
        _back_head(p)
    _front_back_over(p)
    if hold_side is not None:
        p.handbag(hands[hold_side])


def _front_back_arms(
    p: _Person, abd: np.ndarray, bend: np.ndarray, hold_side: float | None
) -> dict[float, _Point]:
    """Both arms, abducted and bent per side; the one holding a handbag hangs straight down.

    Returns:
        The hands by image-x sign of their side.
    """
    hands = {}
    for i, s in _SIDES:
        ang = s * (0.03 if hold_side == s else abd[i])
        elbow_bend = s * (0.0 if hold_side == s else bend[i])
        hands[s] = p.arm((s * (p.sw - 0.02), _SHOULDER_Y + 0.005), ang, elbow_bend, 1.0)
    return hands


def _front_back_lower(p: _Person, rng: np.random.Generator) -> None:
    """Hips of trousers or shorts, or a flared skirt."""
    ww, t = p.ww, p.a["lower_type"]
    if t in ("trousers", "shorts"):
        p.cv.poly(
            [
                (-ww, _HIP_Y - 0.03),
                (ww, _HIP_Y - 0.03),
                (ww * 0.95, _HIP_Y + 0.05),
                (0, _HIP_Y + 0.06),
                (-ww * 0.95, _HIP_Y + 0.05),
            ],
            p.low_c,
        )
    elif t == "skirt":
        flare = rng.uniform(0.05, 0.075)
        p.cv.poly([(-ww, 0.46), (ww, 0.46), (ww + flare * p.b, 0.68), (-ww - flare * p.b, 0.68)], p.low_c)
    cv = p.cv
    p.boxes["lower"] = (cv.p(-ww, _HIP_Y)[0], cv.p(0, _HIP_Y)[1], cv.p(ww, 0)[0], cv.p(0, 0.9)[1])


def _front_back_torso(p: _Person) -> None:
    """The upper garment's body, a coat widening to its hem, and the garment's details."""
    sw, ww, hem = p.sw, p.ww, p.hem
    bottom_half = ww + (0.025 * p.b if p.a["upper_type"] == "coat" else 0.0)
    torso = [
        (-0.035, 0.145),
        (0.035, 0.145),
        (sw, _SHOULDER_Y - 0.01),
        (sw - 0.005, 0.24),
        (ww, 0.44),
        (bottom_half, hem),
        (-bottom_half, hem),
        (-ww, 0.44),
        (-(sw - 0.005), 0.24),
        (-sw, _SHOULDER_Y - 0.01),
    ]
    p.cv.poly(torso, p.up_c)
    _garment_details(p)


def _garment_details(p: _Person) -> None:
    """Small cues of the garment type (collar, zip, buttons, rib bands) on a front / back torso."""
    cv, t, front, ww, hem = p.cv, p.a["upper_type"], p.view == "front", p.ww, p.hem
    dark, light = _shade(p.up_c, 0.72), _shade(p.up_c, 1.18)
    if t == "t-shirt" and front:
        cv.ellipse(0, 0.148, 0.03, 0.014, p.skin)
    elif t == "shirt":
        if front:
            for s in (-1.0, 1.0):
                cv.poly([(0, 0.17), (s * 0.035, 0.14), (s * 0.045, 0.18)], light)
            for y in (0.22, 0.29, 0.36, 0.43):
                cv.ellipse(0, y, 0.004, 0.003, dark)
        else:
            cv.rect(-0.035, 0.14, 0.035, 0.155, light)
    elif t in ("jacket", "coat"):
        if front:
            cv.limb((0, 0.16), (0, hem - 0.005), 0.008, dark)
            for s in (-1.0, 1.0):
                cv.poly([(s * 0.005, 0.16), (s * 0.04, 0.14), (s * 0.05, 0.21)], dark)
            if t == "coat":
                for y in (0.28, 0.4, 0.52):
                    cv.ellipse(0.018, y, 0.005, 0.004, dark)
        cv.rect(-ww - 0.01, hem - 0.015, ww + 0.01, hem, dark)
    elif t == "sweater":
        cv.rect(-ww, hem - 0.025, ww, hem, dark)
        if front:
            cv.ellipse(0, 0.148, 0.032, 0.015, dark)


def _front_head(p: _Person) -> None:
    """Face, fringe, long hair over the shoulders, eyes and glasses."""
    cv, rx, ry = p.cv, 0.046, 0.062
    cv.ellipse(0, _HEAD_Y, rx, ry, p.skin)
    cv.chord_top(0, _HEAD_Y - 0.004, rx * 1.06, ry * 1.02, p.hair)
    cv.ellipse(0, _HEAD_Y + 0.004, rx * 0.86, ry * 0.76, p.skin)  # face under the fringe
    if p.a["hair_length"] == "long":
        for s in (-1.0, 1.0):
            strand = [
                (s * rx * 0.8, _HEAD_Y - 0.01),
                (s * rx * 1.08, _HEAD_Y),
                (s * rx * 1.2, 0.24),
                (s * rx * 0.7, 0.24),
            ]
            cv.poly(strand, p.hair)
    for s in (-1.0, 1.0):  # eyes
        cv.ellipse(s * 0.016, _HEAD_Y + 0.0, 0.0045, 0.003, _EYE)
    if p.a["glasses"]:
        p.boxes["glasses"] = _union(
            cv.rect(-0.03, _HEAD_Y - 0.006, -0.004, _HEAD_Y + 0.006, _GLASSES),
            cv.rect(0.004, _HEAD_Y - 0.006, 0.03, _HEAD_Y + 0.006, _GLASSES),
        )
        cv.limb((-0.04, _HEAD_Y - 0.002), (0.04, _HEAD_Y - 0.002), 0.004, _GLASSES)


def _back_head(p: _Person) -> None:
    """The back of the head, and the nape under short hair."""
    p.cv.ellipse(0, _HEAD_Y, 0.046, 0.062, p.hair)
    if p.a["hair_length"] == "short":
        p.cv.rect(-0.02, 0.115, 0.02, 0.15, p.skin)  # nape


def _front_back_over(p: _Person) -> None:
    """What lies over the torso: logo, backpack or its straps, long hair, shoulder bag.

    Long hair seen from the back falls over a backpack; a shoulder bag's strap crosses the chest.
    """
    a, cv, b, bag_c = p.a, p.cv, p.b, p.bag_c
    if a["logo"] and p.view == "front":
        p.boxes["logo"] = _logo(cv, a["logo_shape"], COLORS[a["logo"]], 0.0, 0.27, 0.03)
    if a["bag"] == "backpack":
        if p.view == "back":
            p.boxes["bag"] = cv.rect(-0.085 * b, 0.19, 0.085 * b, 0.38, bag_c)
            cv.rect(-0.06 * b, 0.3, 0.06 * b, 0.37, _shade(bag_c, 0.78))  # pocket
        else:
            for s in (-1.0, 1.0):
                cv.limb((s * 0.075 * b, 0.16), (s * 0.07 * b, 0.37), 0.022, bag_c)
            p.boxes["bag"] = cv.p(-0.08 * b, 0.16) + cv.p(0.08 * b, 0.37)
    if a["hair_length"] == "long" and p.view == "back":  # hair falls over the back and a backpack
        cv.poly([(-0.05, 0.08), (0.05, 0.08), (0.062, 0.3), (0, 0.315), (-0.062, 0.3)], p.hair)
    if a["bag"] == "shoulder bag":
        s, ww = p.side_sign(a["bag_side"]), p.ww
        cv.limb((-s * p.sw * 0.7, 0.17), (s * (ww + 0.02), 0.45), 0.012, _shade(bag_c, 0.85))
        p.boxes["bag"] = cv.rect(s * (ww - 0.01), 0.44, s * (ww + 0.07), 0.52, bag_c)


def _logo(cv: _Canvas, shape: str, color: _RGB, x: float, y: float, r: float) -> _Box:
    if shape == "circle":
        return cv.ellipse(x, y, r, r * 0.75, color)
    if shape == "triangle":
        cv.poly([(x - r, y + r * 0.7), (x + r, y + r * 0.7), (x, y - r * 0.8)], color)
        return cv.p(x - r, y - r * 0.8) + cv.p(x + r, y + r * 0.7)
    return cv.rect(x - r, y - r * 0.7, x + r, y + r * 0.7, color)


# ----------------------------------------------------------------------------- side view


def _draw_side(p: _Person, rng: np.random.Generator) -> None:
    """Side view of the person walking toward ``p.facing``.

    Drawn back to front: far arm and leg (dimmed, in shadow), near leg, lower garment, what hangs
    behind, torso, head, backpack strap, near arm, then the bag it carries.
    """
    d, a = p.facing, p.a
    stride = rng.uniform(0.12, 0.45)
    swing = rng.uniform(0.1, 0.5)
    near_sign = rng.choice((-1.0, 1.0))  # which leg is forward
    p.arm((0.0, _SHOULDER_Y + 0.01), -near_sign * d * swing, d * 0.15, 0.78)
    far_ank = p.leg((0.0, _HIP_Y), -near_sign * d * stride, -near_sign * d * 0.05 + d * 0.15, 0.82)
    p.shoe(far_ank, d, 0.82)
    near_ank = p.leg((0.0, _HIP_Y), near_sign * d * stride, d * (0.25 if near_sign < 0 else 0.05), 1.0)
    p.shoe(near_ank, d, 1.0)
    _side_lower(p)
    _side_bag_behind(p)
    _side_torso(p)
    p.neck()
    _side_head(p)
    if a["bag"] == "backpack":  # strap over the shoulder
        p.cv.limb((-d * 0.01, 0.16), (d * p.depth_f * 0.7, 0.36), 0.018, p.bag_c)
    near_hand = p.arm((0.0, _SHOULDER_Y + 0.01), near_sign * d * swing, d * 0.15, 1.0)
    if a["bag"] == "handbag" and a["bag_side"] == p.view:
        p.handbag(near_hand)
    if a["bag"] == "shoulder bag":
        p.cv.limb((0.0, 0.17), (0.0, 0.45), 0.012, _shade(p.bag_c, 0.85))
        if a["bag_side"] == p.view:
            p.boxes["bag"] = p.cv.rect(-0.045, 0.44, 0.045, 0.53, p.bag_c)


def _side_lower(p: _Person) -> None:
    """Hips of trousers or shorts, or a skirt, in profile."""
    d, db, df, t = p.facing, p.depth_b, p.depth_f, p.a["lower_type"]
    if t in ("trousers", "shorts"):
        hip = [
            (-d * db, _HIP_Y - 0.03),
            (d * df, _HIP_Y - 0.03),
            (d * df * 0.8, _HIP_Y + 0.05),
            (-d * db * 0.8, _HIP_Y + 0.05),
        ]
        p.cv.poly(hip, p.low_c)
    elif t == "skirt":
        p.cv.poly(
            [(-d * db, 0.46), (d * df, 0.46), (d * (df + 0.05), 0.68), (-d * (db + 0.05), 0.68)], p.low_c
        )
    p.boxes["lower"] = p.cv.p(-db, _HIP_Y) + p.cv.p(df, 0.9)


def _side_bag_behind(p: _Person) -> None:
    """A backpack on the back, or a shoulder bag on the far side peeking out behind the hip."""
    d, db, a = p.facing, p.depth_b, p.a
    if a["bag"] == "backpack":
        p.boxes["bag"] = p.cv.rect(-d * db, 0.19, -d * (db + 0.07), 0.4, p.bag_c)
    if a["bag"] == "shoulder bag" and a["bag_side"] != p.view:
        p.boxes["bag"] = p.cv.rect(-d * (db - 0.02), 0.43, -d * (db + 0.03), 0.52, p.bag_c)


def _side_torso(p: _Person) -> None:
    """The upper garment in profile, a coat widening to its hem, a sweater's rib band."""
    d, db, df, hem = p.facing, p.depth_b, p.depth_f, p.hem
    hem_half = 0.02 * p.b if p.a["upper_type"] == "coat" else 0.0
    torso = [
        (-d * 0.03, 0.145),
        (d * 0.03, 0.145),
        (d * df, 0.2),
        (d * df * 1.02, 0.36),
        (d * (df * 0.95 + hem_half), hem),
        (-d * (db + hem_half), hem),
        (-d * db, 0.2),
    ]
    p.cv.poly(torso, p.up_c)
    if p.a["upper_type"] == "sweater":
        p.cv.rect(-db, hem - 0.02, df, hem, _shade(p.up_c, 0.8))


def _side_head(p: _Person) -> None:
    """Head in profile: long hair behind, face, hair, eye and glasses."""
    cv, d, rx, ry = p.cv, p.facing, 0.044, 0.062
    if p.a["hair_length"] == "long":
        cv.poly([(-d * 0.01, 0.03), (-d * 0.05, 0.05), (-d * 0.058, 0.29), (-d * 0.015, 0.28)], p.hair)
    cv.ellipse(d * 0.006, _HEAD_Y, rx, ry, p.skin)
    cv.chord_top(0, _HEAD_Y - 0.002, rx * 1.04, ry * 1.02, p.hair)
    cv.ellipse(-d * 0.02, _HEAD_Y + 0.004, rx * 0.75, ry * 0.8, p.hair)  # back of the head
    cv.ellipse(d * 0.028, _HEAD_Y + 0.002, 0.004, 0.003, _EYE)  # eye
    if p.a["glasses"]:
        p.boxes["glasses"] = cv.rect(d * 0.018, _HEAD_Y - 0.006, d * 0.045, _HEAD_Y + 0.006, _GLASSES)
        cv.limb((d * 0.018, _HEAD_Y - 0.003), (-d * 0.02, _HEAD_Y - 0.005), 0.004, _GLASSES)
