"""Drawing of one procedural frontal face whose Action Units are visible by construction.

Every AU is a distinct shape in a fixed region of the face, drawn thick and anti-aliased: the
face is rendered at ``oversample`` times the output size and box-downsampled. Geometry is in
*face units*: 1.0 is the canvas side times the face scale, y grows downwards, (0, 0) is the
face centre. :func:`sample_style` draws the nuisance parameters (shape, skin tone, position,
scale, rotation, noise, per-AU intensity); :func:`draw_face` renders a set of AUs with them.

>>> import random
>>> img = draw_face({"AU6", "AU12"}, sample_style(random.Random(0)), size=56)
>>> img.size, img.mode
((56, 56), 'RGB')
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# The AUs this module can draw, each in its region (see the module docstring of demo_faces).
DRAWABLE_AUS: tuple[str, ...] = (
    "AU1",
    "AU2",
    "AU4",
    "AU5",
    "AU6",
    "AU7",
    "AU9",
    "AU10",
    "AU12",
    "AU14",
    "AU15",
    "AU16",
    "AU17",
    "AU20",
    "AU23",
    "AU24",
    "AU25",
    "AU26",
    "AU43",
)

# Skin tones from light to dark (RGB); a per-face jitter is added.
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (255, 224, 196),
    (241, 194, 160),
    (229, 178, 138),
    (205, 145, 105),
    (176, 118, 80),
    (140, 92, 62),
    (112, 74, 50),
)
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (30, 22, 18),
    (60, 40, 25),
    (95, 60, 35),
    (140, 100, 55),
    (190, 150, 90),
    (110, 110, 110),
    (150, 60, 30),
)
IRIS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (60, 40, 25),
    (40, 70, 120),
    (60, 100, 60),
    (30, 30, 30),
    (100, 80, 50),
)
Point = tuple[float, float]


@dataclass
class FaceStyle:
    """The nuisance parameters of one face (everything except which AUs are active)."""

    cx: float = 0.5  # face centre, canvas units
    cy: float = 0.5
    scale: float = 0.96  # face unit, canvas units
    half_width: float = 0.35  # face half-width, face units
    half_height: float = 0.42
    jaw: float = 0.15  # narrowing of the lower half (0 = ellipse)
    skin: tuple[int, int, int] = (229, 178, 138)
    hair: tuple[int, int, int] = (60, 40, 25)
    hair_style: int = 1  # 0 bald, 1 cap, 2 cap and side locks
    fringe: float = -0.35
    fringe_slant: float = 0.0
    background: tuple[int, int, int] = (200, 210, 220)
    background2: tuple[int, int, int] = (170, 180, 200)
    iris: tuple[int, int, int] = (60, 40, 25)
    eye_dx: float = 0.15
    eye_y: float = -0.07
    brow_y: float = -0.20
    brow_width: float = 0.034
    line_width: float = 0.022
    mouth_y: float = 0.22
    mouth_w: float = 0.11
    rotation: float = 0.0  # degrees
    noise: float = 3.0  # std of Gaussian pixel noise, 0-255 scale
    contempt_side: int = 1  # which lip corner a unilateral AU12/AU14 moves (-1 left, +1 right)
    intensity: dict[str, float] = field(default_factory=dict)  # per AU, about 0.85-1.15

    def k(self, au: str) -> float:
        return self.intensity.get(au, 1.0)


def _jitter(rng: random.Random, colour: Sequence[int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c + rng.randint(-amount, amount)))) for c in colour)  # type: ignore[return-value]


def sample_style(rng: random.Random) -> FaceStyle:
    """Draw the nuisance parameters of one face from ``rng`` (deterministic for a seed)."""
    bg = (rng.randint(40, 250), rng.randint(40, 250), rng.randint(40, 250))
    return FaceStyle(
        cx=0.5 + rng.uniform(-0.035, 0.035),
        cy=0.5 + rng.uniform(-0.03, 0.025),
        scale=rng.uniform(0.9, 1.02),
        half_width=rng.uniform(0.33, 0.38),
        half_height=rng.uniform(0.40, 0.44),
        jaw=rng.uniform(0.0, 0.3),
        skin=_jitter(rng, rng.choice(SKIN_TONES), 10),
        hair=_jitter(rng, rng.choice(HAIR_COLOURS), 12),
        hair_style=rng.choice((0, 1, 1, 2, 2)),
        fringe=rng.uniform(-0.39, -0.34),
        fringe_slant=rng.uniform(-0.05, 0.05),
        background=bg,
        background2=_jitter(rng, bg, 40),
        iris=rng.choice(IRIS_COLOURS),
        eye_dx=rng.uniform(0.14, 0.16),
        eye_y=rng.uniform(-0.08, -0.06),
        brow_y=rng.uniform(-0.21, -0.195),
        brow_width=rng.uniform(0.03, 0.038),
        line_width=rng.uniform(0.02, 0.025),
        mouth_y=rng.uniform(0.21, 0.23),
        mouth_w=rng.uniform(0.10, 0.12),
        rotation=rng.uniform(-5.0, 5.0),
        noise=rng.uniform(1.0, 7.0),
        contempt_side=rng.choice((-1, 1)),
        intensity={au: rng.uniform(0.85, 1.15) for au in DRAWABLE_AUS},
    )


def _shade(colour: Sequence[int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> tuple[int, int, int]:
    return tuple(int(x + (y - x) * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _bezier(p0: Point, p1: Point, p2: Point, n: int = 14) -> list[Point]:
    """Points of the quadratic Bezier curve p0 -> p2 with control p1."""
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t * t
        out.append((a * p0[0] + b * p1[0] + c * p2[0], a * p0[1] + b * p1[1] + c * p2[1]))
    return out


def _through(p0: Point, mid_y: float, p2: Point, n: int = 14) -> list[Point]:
    """A quadratic curve from p0 to p2 whose middle point (t = 0.5) lies at height ``mid_y``."""
    ctrl = ((p0[0] + p2[0]) / 2, 2 * mid_y - (p0[1] + p2[1]) / 2)
    return _bezier(p0, ctrl, p2, n)


class _Canvas:
    """An ImageDraw that speaks face units."""

    def __init__(self, style: FaceStyle, side: int):
        self.style = style
        self.side = side
        self.img = Image.new("RGB", (side, side), style.background)
        self.draw = ImageDraw.Draw(self.img)
        self.unit = style.scale * side
        self.ox = style.cx * side
        self.oy = style.cy * side
        ang = math.radians(style.rotation)  # the face is rotated about its centre
        self.cos, self.sin = math.cos(ang), math.sin(ang)

    def p(self, x: float, y: float) -> tuple[float, float]:
        u = self.unit
        return (
            self.ox + (x * self.cos - y * self.sin) * u,
            self.oy + (x * self.sin + y * self.cos) * u,
        )

    def pts(self, points: Iterable[Point]) -> list[tuple[float, float]]:
        return [self.p(x, y) for x, y in points]

    def w(self, width: float) -> int:
        return max(1, round(width * self.unit))

    def line(self, points: Iterable[Point], colour, width: float, round_ends: bool = True):
        pts = self.pts(points)
        px = self.w(width)
        self.draw.line(pts, fill=colour, width=px, joint="curve")
        if round_ends:
            r = px / 2
            for x, y in (pts[0], pts[-1]):
                self.draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def polygon(self, points: Iterable[Point], colour):
        self.draw.polygon(self.pts(points), fill=colour)

    def ellipse(self, centre: Point, rx: float, ry: float, colour, outline=None, width=0.0):
        x, y = self.p(*centre)
        box = (x - rx * self.unit, y - ry * self.unit, x + rx * self.unit, y + ry * self.unit)
        self.draw.ellipse(box, fill=colour, outline=outline, width=self.w(width) if width else 0)


def _face_outline(style: FaceStyle, jaw_drop: float, n: int = 48) -> list[Point]:
    pts = []
    a, b = style.half_width, style.half_height
    for i in range(n):
        ang = 2 * math.pi * i / n
        x, y = a * math.cos(ang), b * math.sin(ang)
        if y > 0:  # lower half: narrower jaw, longer when the jaw drops
            s = math.sin(ang)
            x *= 1 - style.jaw * s * s
            y += jaw_drop * s * s
        pts.append((x, y))
    return pts


def _draw_background(c: _Canvas, style: FaceStyle) -> None:
    # a two-tone background: a soft diagonal band
    side = c.side
    c.draw.polygon([(0, side * 0.6), (side * 0.6, 0), (side, 0), (0, side)], fill=style.background2)


def _draw_head(c: _Canvas, style: FaceStyle, aus: set[str]) -> None:
    skin = style.skin
    jaw_drop = 0.05 * style.k("AU26") if "AU26" in aus else 0.0
    # neck and ears behind the face
    c.polygon([(-0.13, 0.25), (0.13, 0.25), (0.16, 0.7), (-0.16, 0.7)], _shade(skin, 0.85))
    for s in (-1, 1):
        c.ellipse((s * style.half_width, -0.03), 0.045, 0.08, _shade(skin, 0.92))
    a, b = style.half_width, style.half_height
    if style.hair_style == 2:  # long hair behind the head, framing the face
        c.ellipse((0.0, -0.06), a + 0.07, b + 0.06, style.hair)
        c.polygon(
            [(-a - 0.07, -0.06), (a + 0.07, -0.06), (a + 0.05, 0.2), (-a - 0.05, 0.2)], style.hair
        )
    c.polygon(_face_outline(style, jaw_drop), skin)
    if style.hair_style:
        ha, hb = a + 0.02, b + 0.035

        def fringe_y(x: float) -> float:
            return style.fringe + style.fringe_slant * x / a + 0.26 * (abs(x) / ha) ** 4

        top = []
        for i in range(41):
            ang = math.pi + math.pi * i / 40
            x, y = ha * math.cos(ang), hb * math.sin(ang)
            if y <= fringe_y(x):
                top.append((x, y))
        if len(top) >= 2:
            xl, xr = top[0][0], top[-1][0]
            fringe = [(xr + (xl - xr) * i / 16, 0.0) for i in range(17)]
            fringe = [(x, fringe_y(x)) for x, _ in fringe]
            c.polygon(top + fringe, style.hair)


def _draw_cheeks(c: _Canvas, style: FaceStyle) -> None:
    """AU6: raised, rounded cheeks below the eyes, with crow's feet at the outer eye corners."""
    k = style.k("AU6")
    rosy = _mix(style.skin, (225, 90, 90), 0.35)
    dark = _shade(style.skin, 0.55)
    for s in (-1, 1):
        cx = s * (style.eye_dx + 0.02)
        cy = style.eye_y + 0.115
        c.ellipse((cx, cy), 0.075 * k, 0.048 * k, rosy)
        # the cheek's upper contour, a thick upward arc under the eye
        c.line(
            _through((cx - 0.075, cy - 0.01), cy - 0.06 * k, (cx + 0.075, cy - 0.01)),
            dark,
            style.line_width * 0.8,
        )
        ox = s * (style.eye_dx + 0.095)
        for dy in (-0.03, 0.0, 0.03):
            c.line(
                [(ox, style.eye_y + dy * 0.3), (ox + s * 0.05, style.eye_y + dy * 1.3)],
                dark,
                style.line_width * 0.6,
            )


def _draw_eyes(c: _Canvas, style: FaceStyle, aus: set[str]) -> None:
    line = _shade(style.skin, 0.3)
    ew = 0.072
    for s in (-1, 1):
        ex, ey = s * style.eye_dx, style.eye_y
        inner, outer = (ex - s * ew, ey), (ex + s * ew, ey)
        if "AU43" in aus:  # closed: a thick lid line curving down, with lashes
            lid = _through(inner, ey + 0.02, outer)
            c.line(lid, line, style.line_width * 1.2)
            for t in (0.3, 0.5, 0.7):
                x, y = lid[int(t * (len(lid) - 1))]
                c.line([(x, y), (x + s * 0.01, y + 0.03)], line, style.line_width * 0.6)
            continue
        up = 0.04
        low = 0.03
        if "AU5" in aus:
            up = 0.075 * style.k("AU5")
        if "AU7" in aus:
            low = 0.004
            up -= 0.008
        upper = _through(inner, ey - up, outer)
        lower = _through(inner, ey + low, outer)
        # sclera and iris on a small layer, pasted through the eye-shaped mask
        outline = c.pts(upper + lower[::-1])
        margin = 0.04 * c.unit
        x0 = int(min(x for x, _ in outline) - margin)
        y0 = int(min(y for _, y in outline) - margin)
        x1 = math.ceil(max(x for x, _ in outline) + margin)
        y1 = math.ceil(max(y for _, y in outline) + margin)
        layer = Image.new("RGB", (x1 - x0, y1 - y0), (240, 240, 236))
        mask = Image.new("L", layer.size, 0)
        ld, md = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
        shape = [(x - x0, y - y0) for x, y in outline]
        md.polygon(shape, fill=255)
        ix, iy = c.p(ex, ey + (0.004 if "AU5" not in aus else 0.0))
        r = 0.029 * c.unit
        ld.ellipse((ix - x0 - r, iy - y0 - r, ix - x0 + r, iy - y0 + r), fill=style.iris)
        r2 = r * 0.5
        ld.ellipse((ix - x0 - r2, iy - y0 - r2, ix - x0 + r2, iy - y0 + r2), fill=(10, 10, 10))
        c.img.paste(layer, (x0, y0), mask)
        c.line(upper, line, style.line_width * (1.1 if "AU5" in aus else 0.9))
        if "AU7" in aus:  # tense, straight lower lid, and a tension line below it
            c.line(lower, line, style.line_width * 1.0)
            c.line(
                [(ex - 0.05, ey + 0.035), (ex + 0.05, ey + 0.035)],
                _shade(style.skin, 0.6),
                style.line_width * 0.6,
            )
        else:
            c.line(lower, _shade(style.skin, 0.55), style.line_width * 0.5)


def _draw_brows(c: _Canvas, style: FaceStyle, aus: set[str]) -> None:
    colour = tuple(min(h, int(s * 0.35)) for h, s in zip(style.hair, style.skin, strict=True))
    for s in (-1, 1):
        ix, iy = s * 0.055, style.brow_y + 0.01
        mx, my = s * 0.14, style.brow_y - 0.02
        ox, oy = s * 0.235, style.brow_y + 0.005
        if "AU1" in aus:
            k = style.k("AU1")
            iy -= 0.065 * k
            my -= 0.025 * k
        if "AU2" in aus:
            k = style.k("AU2")
            oy -= 0.065 * k
            my -= 0.04 * k
        if "AU4" in aus:
            k = style.k("AU4")
            iy += 0.04 * k
            ix -= s * 0.025 * k
            my += 0.02 * k
        # a curve through inner, middle and outer points
        ctrl = (2 * mx - (ix + ox) / 2, 2 * my - (iy + oy) / 2)
        c.line(_bezier((ix, iy), ctrl, (ox, oy)), colour, style.brow_width)
    if "AU4" in aus:  # vertical furrows between the brows
        dark = _shade(style.skin, 0.5)
        top = style.brow_y + (-0.03 if "AU1" in aus else 0.0)
        for x in (-0.016, 0.016):
            c.line([(x, top - 0.005), (x * 0.8, top + 0.07)], dark, style.line_width * 0.7)


def _draw_nose(c: _Canvas, style: FaceStyle, aus: set[str]) -> None:
    dark = _shade(style.skin, 0.5)
    flare = 0.018 if "AU9" in aus else 0.0
    lift = -0.012 if "AU9" in aus else 0.0
    c.line([(0.018, -0.03), (0.03, 0.06 + lift)], _shade(style.skin, 0.75), style.line_width * 0.6)
    c.line(
        _through((-0.05 - flare, 0.085 + lift), 0.115 + lift, (0.05 + flare, 0.085 + lift)),
        dark,
        style.line_width * 0.7,
    )
    for s in (-1, 1):
        c.ellipse((s * (0.024 + flare * 0.5), 0.097 + lift), 0.013, 0.008, _shade(style.skin, 0.35))
    if "AU9" in aus:  # horizontal wrinkles across the bridge
        k = style.k("AU9")
        wrinkle = _shade(style.skin, 0.45)
        for y in (-0.045, -0.015, 0.015):
            c.line(
                _through((-0.04 * k, y + 0.008), y - 0.006, (0.04 * k, y + 0.008)),
                wrinkle,
                style.line_width * 0.75,
            )


def _draw_mouth(c: _Canvas, style: FaceStyle, aus: set[str], unilateral: bool) -> None:
    my, mw = style.mouth_y, style.mouth_w
    lip = _mix(style.skin, (170, 50, 60), 0.55)
    dark_line = _shade(lip, 0.45)
    skin_dark = _shade(style.skin, 0.5)
    half = mw
    if "AU20" in aus:
        half += 0.045 * style.k("AU20")
    if "AU23" in aus:
        half -= 0.035 * style.k("AU23")
    if "AU24" in aus:
        half -= 0.012
    dy = {-1: 0.0, 1: 0.0}
    if "AU12" in aus:
        if unilateral:
            dy[style.contempt_side] -= 0.08 * style.k("AU12")
        else:
            for s in (-1, 1):
                dy[s] -= 0.06 * style.k("AU12")
    if "AU15" in aus:
        for s in (-1, 1):
            dy[s] += 0.05 * style.k("AU15")
    if "AU20" in aus:
        for s in (-1, 1):
            dy[s] += 0.012
    left = (-half, my + dy[-1])
    right = (half, my + dy[1])
    if unilateral and "AU12" in aus:  # the raised corner also pulls sideways
        x = right if style.contempt_side == 1 else left
        moved = (x[0] + style.contempt_side * 0.02, x[1])
        left, right = (moved, right) if style.contempt_side == -1 else (left, moved)

    gap_up = gap_dn = 0.0
    if "AU25" in aus:
        gap_up += 0.03 * style.k("AU25")
        gap_dn += 0.035 * style.k("AU25")
    if "AU26" in aus:
        gap_up += 0.03
        gap_dn += 0.11 * style.k("AU26")
    if "AU10" in aus:
        gap_up += 0.04 * style.k("AU10")
    if "AU16" in aus:
        gap_dn += 0.045 * style.k("AU16")
    tu, tl = 0.026, 0.032
    if "AU23" in aus:
        tu, tl = 0.012, 0.012
    if "AU24" in aus:
        tu, tl = 0.006, 0.006

    upper_in = _through(left, my - gap_up, right)
    lower_in = _through(left, my + gap_dn, right)
    upper_out = _through(left, my - gap_up - tu, right)
    lower_out = _through(left, my + gap_dn + tl, right)
    opened = gap_up + gap_dn > 0.004
    if opened:
        c.polygon(upper_in + lower_in[::-1], (55, 18, 24))
        teeth = (245, 245, 238)
        if {"AU10", "AU26"} & aus:  # AU25 alone shows a dark gap, distinct from AU10/AU16
            band = [
                (x, y + min(0.026, 0.7 * (yl - y)))
                for (x, y), (_, yl) in zip(upper_in, lower_in, strict=True)
            ]
            c.polygon(upper_in + band[::-1], teeth)
        if "AU16" in aus:
            band = [
                (x, yl - min(0.022, 0.5 * (yl - y)))
                for (x, y), (_, yl) in zip(upper_in, lower_in, strict=True)
            ]
            c.polygon(band + lower_in[::-1], teeth)
    c.polygon(upper_out + upper_in[::-1], lip)
    c.polygon(lower_in + lower_out[::-1], _shade(lip, 1.08))
    if not opened:
        c.line(upper_in, dark_line, style.line_width * (1.1 if "AU24" in aus else 0.7))
    if "AU24" in aus:  # pressed: bulges above and below the lips
        k = style.k("AU24")
        for sign, base in ((-1, my - tu - 0.04), (1, my + tl + 0.04)):
            c.line(
                _through((-half * 0.7, base), base + sign * 0.012 * k, (half * 0.7, base)),
                skin_dark,
                style.line_width * 0.75,
            )
    if "AU23" in aus:  # tightened: narrow lips with vertical tension lines
        for x in (-half * 0.5, 0.0, half * 0.5):
            c.line([(x, my - 0.02), (x, my + 0.02)], dark_line, style.line_width * 0.45)
        for s, p in ((-1, left), (1, right)):
            c.line(
                [(p[0] - s * 0.01, p[1] - 0.025), (p[0] - s * 0.01, p[1] + 0.025)],
                skin_dark,
                style.line_width * 0.6,
            )
    if "AU10" in aus:  # upper lip raised: deep nasolabial folds from the nose wings
        k = style.k("AU10")
        for s, p in ((-1, left), (1, right)):
            top = (s * 0.055, 0.085)
            bot = (p[0] + s * 0.012, p[1] - 0.015)
            ctrl = (s * (abs(p[0]) + 0.03 * k), (top[1] + bot[1]) / 2)
            c.line(_bezier(top, ctrl, bot), skin_dark, style.line_width * 0.8)
    if "AU14" in aus:  # dimples: deep crescents beside the lip corners
        k = style.k("AU14")
        sides = (style.contempt_side,) if unilateral else (-1, 1)
        for s in sides:
            p = left if s == -1 else right
            x = p[0] + s * 0.035
            top, bot = (x, p[1] - 0.045 * k), (x, p[1] + 0.045 * k)
            c.line(_bezier(top, (x + s * 0.035 * k, p[1]), bot), skin_dark, style.line_width * 0.9)
            c.ellipse((p[0] + s * 0.01, p[1]), 0.012, 0.012, skin_dark)
    if "AU17" in aus:  # chin raised: a bulging chin boss under the lower lip
        k = style.k("AU17")
        cy = my + gap_dn + tl + 0.075
        c.ellipse((0.0, cy + 0.02), 0.085 * k, 0.045 * k, _shade(style.skin, 0.88))
        c.line(
            _through((-0.08 * k, cy + 0.01), cy - 0.03 * k, (0.08 * k, cy + 0.01)),
            skin_dark,
            style.line_width * 0.85,
        )
        c.line(
            _through((-0.05, my + tl + 0.02), my + tl + 0.035, (0.05, my + tl + 0.02)),
            _shade(style.skin, 0.65),
            style.line_width * 0.5,
        )


def draw_face(
    aus: Iterable[str],
    style: FaceStyle,
    *,
    size: int = 56,
    oversample: int = 4,
    unilateral: bool = False,
    noise_seed: int | None = None,
) -> Image.Image:
    """Render a face showing exactly ``aus`` (those of :data:`DRAWABLE_AUS`; others ignored).

    ``unilateral`` draws AU12/AU14 on one side only (``style.contempt_side``), as in contempt.
    Pixel noise uses ``noise_seed`` (deterministic) and ``style.noise``.
    """
    active = set(aus)
    c = _Canvas(style, size * oversample)
    _draw_background(c, style)
    _draw_head(c, style, active)
    if "AU6" in active:
        _draw_cheeks(c, style)
    _draw_eyes(c, style, active)
    _draw_brows(c, style, active)
    _draw_nose(c, style, active)
    _draw_mouth(c, style, active, unilateral)
    img = c.img
    img = img.reduce(oversample) if oversample > 1 else img
    if style.noise > 0:
        rng = np.random.default_rng(noise_seed)
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, style.noise, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img
