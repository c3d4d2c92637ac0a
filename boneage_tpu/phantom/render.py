"""Renderer of the bone-age phantom: `Scene` + nuisance parameters -> 8-bit radiograph.

Bones and soft tissue become projected thickness maps (hollow tubes with a cortex for the
long bones, ellipsoids for epiphyses, superellipsoids for carpals), attenuated like an X-ray
and displayed bone-bright. Everything that must not carry age is drawn here from its own rng,
independently of the scene: placement, rotation (+-15 deg), scale (hand length = 60-90 % of
the frame height), exposure, background, noise, blur, collimation borders and an L/R marker.
Exposure is a display gamma chosen per image so that the mean signal hits a random target
that depends on the hand's share of the frame only: the bone area, which grows with age,
therefore cannot make older hands brighter.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from boneage_tpu.phantom.anatomy import RoundBone, Scene, TubularBone, build_scene

_MU_SOFT, _MU_BONE = 5.0, 28.0  # attenuation per canonical unit of thickness
_SOFT_THICKNESS = 0.12  # canonical thickness of the palm
_REF_HEIGHT = 800.0  # blur and marker sizes are given for this image height


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """Imaging conditions of one radiograph; none of them depends on age."""

    fill: float  # hand length (wrist to middle finger tip) / image height
    rotation: float  # radians, counter-clockwise
    offset: tuple[float, float]  # 0..1 position of the hand inside the room the frame leaves
    soft_contrast: float
    bone_contrast: float
    background: float
    blur: float  # Gaussian sigma in pixels at _REF_HEIGHT
    noise: float
    signal_mean: float  # target mean of the attenuation signal (0..1) over the image
    marker: str  # "L" or "R"
    marker_corner: int  # 0 top-left, 1 top-right, 2 bottom-right, 3 bottom-left
    marker_size: float  # letter height / image height
    collimation: tuple[float, float, float, float]  # border depth / size: top, right, bottom, left
    collimation_level: float
    collimation_tilt: float  # radians


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draws imaging conditions (a fixed number of draws, so streams stay aligned)."""
    u = [float(v) for v in rng.uniform(size=24)]  # u[6] is unused (kept for stream stability)
    b = [0.01 + 0.06 * u[12 + i] if u[8 + i] < 0.3 else 0.0 for i in range(4)]
    return Nuisance(
        fill=0.6 + 0.3 * u[0],
        rotation=math.radians(-15.0 + 30.0 * u[1]),
        offset=(u[2], u[3]),
        soft_contrast=0.8 + 0.4 * u[4],
        bone_contrast=0.9 + 0.2 * u[5],
        background=0.12 * u[7],
        blur=0.3 + 1.2 * u[16],
        noise=0.002 + 0.008 * u[17],
        # The hand's share of the frame grows with fill**2; the exposure follows it, not age.
        signal_mean=0.265 * (0.6 + 0.3 * u[0]) ** 2 * (0.8 + 0.45 * u[18]),
        marker="R" if u[19] < 0.2 else "L",
        marker_corner=min(int(4 * u[20]), 3),
        marker_size=0.04 + 0.03 * u[21],
        collimation=(b[0], b[1], b[2], b[3]),
        collimation_level=0.55 + 0.4 * u[22],
        collimation_tilt=math.radians(-2.0 + 4.0 * u[23]),
    )


class _Frame:
    """Similarity transform from canonical hand coordinates (y up) to pixels (y down)."""

    def __init__(self, scene: Scene, nz: Nuisance, width: int, height: int):
        tip = np.array(scene.soft_tissue.tip)
        self.scale = float(nz.fill * height / np.hypot(*tip))
        self.cos, self.sin = math.cos(nz.rotation), math.sin(nz.rotation)
        self.shift = np.zeros(2)
        # The frame keeps the hand down to the distal forearm metaphyses; the rest may be cut.
        pts = [np.array(p) for p in scene.soft_tissue.palm if p[1] > -0.06]
        for p0, p1, r in scene.soft_tissue.fingers:
            for p in (p0, p1):
                pts += [np.array(p) + r * np.array(v) for v in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        box = self.points(np.array(pts))
        for axis, size in ((0, width), (1, height)):
            lo, hi = -box[:, axis].min(), size - box[:, axis].max()
            if hi > lo:
                self.shift[axis] = lo + nz.offset[axis] * (hi - lo)
            else:  # Too big for the frame: centre it across, keep the finger tips in view.
                self.shift[axis] = 0.5 * (lo + hi) if axis == 0 else lo

    def vectors(self, v: np.ndarray) -> np.ndarray:
        """Maps canonical vectors (..., 2) to pixel vectors."""
        x, y = v[..., 0], v[..., 1]
        return self.scale * np.stack(
            [x * self.cos - y * self.sin, -(x * self.sin + y * self.cos)], -1
        )

    def points(self, p: np.ndarray) -> np.ndarray:
        """Maps canonical points (..., 2) to pixel coordinates."""
        return self.vectors(np.asarray(p, dtype=np.float64)) + self.shift


def _window(out: np.ndarray, centers: np.ndarray, reach: float):
    """Returns (slices, xs, ys) of the pixel box around `centers` +- reach, or None if empty."""
    h, w = out.shape
    x0 = max(int(math.floor(centers[:, 0].min() - reach)), 0)
    x1 = min(int(math.ceil(centers[:, 0].max() + reach)) + 1, w)
    y0 = max(int(math.floor(centers[:, 1].min() - reach)), 0)
    y1 = min(int(math.ceil(centers[:, 1].max() + reach)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    return (slice(y0, y1), slice(x0, x1)), xs, ys


def _chord(r2: np.ndarray) -> np.ndarray:
    return 2.0 * np.sqrt(np.maximum(r2, 0.0))


def _draw_tubular(out: np.ndarray, bone: TubularBone, fr: _Frame) -> None:
    """Adds one long bone's projected thickness (canonical units) into `out`."""
    epi = bone.epiphysis
    p0, p1 = fr.points(np.array(bone.start)), fr.points(np.array(bone.end))
    length = float(np.hypot(*(p1 - p0)))
    d = (p1 - p0) / max(length, 1e-6)
    nrm = np.array([-d[1], d[0]])
    s = fr.scale
    rs, rb, rh = bone.width * s / 2, bone.base_width * s / 2, bone.head_width * s / 2
    ew, eh = epi.width * s, epi.height * s
    ce = fr.points(np.array(epi.center))
    reach = max(rb, rh, ew, eh) + 2.0
    win = _window(out, np.stack([p0, p1, ce]), reach)
    if win is None:
        return
    sl, xs, ys = win
    rx, ry = xs - np.float32(p0[0]), ys - np.float32(p0[1])
    t = rx * np.float32(d[0]) + ry * np.float32(d[1])
    n = rx * np.float32(nrm[0]) + ry * np.float32(nrm[1])
    # Shaft: flared metaphyses, dome-shaped ends; the end next to a fusing epiphysis grows into it.
    ext = epi.fusion * 0.5 * eh
    lo, hi = (0.0, length + ext) if epi.distal else (-ext, length)
    zone = 0.22 * min(length, 0.5 * s)  # metaphysis length: long forearm bones flare locally
    bump_b = np.square(np.clip(1.0 - t / zone, 0.0, 1.0))
    bump_h = np.square(np.clip(1.0 - (length - t) / zone, 0.0, 1.0))
    radius = rs + (rb - rs) * bump_b + (rh - rs) * bump_h
    c0 = 0.3 * rb * (1.0 - (0.0 if epi.distal else epi.fusion)) + 1e-3
    c1 = 0.3 * rh * (1.0 - (epi.fusion if epi.distal else 0.0)) + 1e-3
    f0 = 1.0 - np.square(np.clip((lo + c0 - t) / c0, 0.0, None))
    f1 = 1.0 - np.square(np.clip((t - hi + c1) / c1, 0.0, None))
    radius = radius * np.sqrt(np.clip(np.minimum(f0, f1), 0.0, 1.0))
    ends = np.maximum(bump_b, bump_h)
    inner = radius * (1.0 - bone.cortex * (1.0 - 0.6 * ends))
    n2 = np.square(n)
    thick = _chord(np.square(radius) - n2) - 0.85 * (1.0 - 0.6 * ends) * _chord(
        np.square(inner) - n2
    )
    if epi.ossified and ew > 0.0:
        de = d if epi.distal else -d
        ex, ey = xs - np.float32(ce[0]), ys - np.float32(ce[1])
        along = ex * np.float32(de[0]) + ey * np.float32(de[1])
        across = ex * np.float32(nrm[0]) + ey * np.float32(nrm[1])
        a, b = ew / 2 + 1e-3, eh / 2 + 1e-3
        q = np.square(across / a)
        shape = 1.0 - q - np.square((along + 0.6 * epi.cap * b * q) / b)
        thick = np.maximum(thick, 0.55 * ew * np.sqrt(np.maximum(shape, 0.0)))
        if epi.scar > 0.0:
            # A thin sclerotic line where the plate was, fading after fusion.
            t_plate = length if epi.distal else 0.0
            line = np.exp(-np.square((t - t_plate) / max(0.0025 * s, 0.5)))  # ~0.5 mm wide
            thick = thick * (1.0 + 0.3 * epi.scar * line)
    out[sl] += thick / s


def _draw_round(out: np.ndarray, bone: RoundBone, fr: _Frame) -> None:
    """Adds a carpal's (or the sesamoid's) projected thickness into `out`."""
    if not bone.ossified:
        return
    a, b = (v * fr.scale + 1e-3 for v in bone.semi_axes)
    c = fr.points(np.array(bone.center))
    ua = fr.vectors(np.array([math.cos(bone.angle), math.sin(bone.angle)]))
    ub = fr.vectors(np.array([-math.sin(bone.angle), math.cos(bone.angle)]))
    ua, ub = ua / np.hypot(*ua), ub / np.hypot(*ub)
    win = _window(out, c[None, :], max(a, b) + 2.0)
    if win is None:
        return
    sl, xs, ys = win
    rx, ry = xs - np.float32(c[0]), ys - np.float32(c[1])
    x = np.abs(rx * np.float32(ua[0]) + ry * np.float32(ua[1])) / a
    y = np.abs(rx * np.float32(ub[0]) + ry * np.float32(ub[1])) / b
    rho2 = np.power(
        np.power(x, bone.squareness) + np.power(y, bone.squareness), 2.0 / bone.squareness
    )
    depth = 0.9 * (a + b) / 2
    thick = depth * (_chord(1.0 - rho2) - 0.35 * _chord(0.6 - rho2))
    out[sl] += thick / fr.scale


def _soft_tissue(scene: Scene, fr: _Frame, width: int, height: int, mu: float) -> np.ndarray:
    """Returns the soft-tissue attenuation map: a filled outline with rounded-off edges."""
    st = scene.soft_tissue
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([tuple(p) for p in fr.points(np.array(st.palm))], fill=255)
    for p0, p1, r in st.fingers:
        q0, q1 = fr.points(np.array(p0)), fr.points(np.array(p1))
        rp = r * fr.scale
        draw.line([tuple(q0), tuple(q1)], fill=255, width=max(int(round(2 * rp)), 1))
        for q in (q0, q1):
            draw.ellipse([q[0] - rp, q[1] - rp, q[0] + rp, q[1] + rp], fill=255)
    finger_px = min(r for _, _, r in st.fingers) * fr.scale
    soft = np.array(mask.filter(ImageFilter.GaussianBlur(float(0.6 * finger_px))))
    soft[np.asarray(mask) == 0] = 0  # the blur only rounds the thickness off inside the edge
    lut = (mu * _SOFT_THICKNESS) * np.sqrt(np.arange(256, dtype=np.float32) / 255.0)
    return lut[soft]


def _marker_and_borders(img: np.ndarray, nz: Nuisance) -> None:
    """Burns the L/R marker and collimation borders (both age-independent) into `img`."""
    h, w = img.shape
    size = max(nz.marker_size * h, 6.0)
    box_w, box_h = int(0.8 * size) + 4, int(size) + 4
    pad = int(0.04 * min(w, h) + 0.5 * size)
    x0 = pad if nz.marker_corner in (0, 3) else w - pad - box_w
    y0 = pad if nz.marker_corner in (0, 1) else h - pad - box_h
    if x0 >= 0 and y0 >= 0:
        overlay = Image.new("L", (box_w, box_h), 0)
        draw = ImageDraw.Draw(overlay)
        stroke = max(int(size / 7), 1)
        o = 2.0
        if nz.marker == "L":
            strokes = [[(o, o), (o, o + size - 1), (o + 0.65 * size, o + size - 1)]]
        else:
            strokes = [
                [(o, o + size), (o, o), (o + 0.45 * size, o)],
                [(o, o + 0.5 * size), (o + 0.45 * size, o + 0.5 * size)],
                [(o + 0.3 * size, o + 0.5 * size), (o + 0.7 * size, o + size)],
            ]
            draw.arc([o + 0.2 * size, o, o + 0.7 * size, o + 0.5 * size], -90, 90, 255, stroke)
        for line in strokes:
            draw.line(line, fill=255, width=stroke)
        crop = img[y0 : y0 + box_h, x0 : x0 + box_w]
        np.maximum(crop, np.asarray(overlay, dtype=np.float32) * (0.95 / 255.0), out=crop)
    if not any(nz.collimation):
        return
    ys = np.arange(h, dtype=np.float32)[:, None] / h - 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    tilt = math.tan(nz.collimation_tilt)
    for side, depth in enumerate(nz.collimation):
        if depth <= 0.0:
            continue
        # Signed distance into the unexposed strip (positive inside), per side.
        dist = (
            -0.5 + depth - ys + tilt * xs,
            xs - 0.5 + depth + tilt * ys,
            ys - 0.5 + depth - tilt * xs,
            -0.5 + depth - xs - tilt * ys,
        )[side]
        edge = np.clip(dist * (min(h, w) / 2.0) + 0.5, 0.0, 1.0)
        img -= edge * (img - nz.collimation_level)


def _gamma_for_mean(signal: np.ndarray, target: float) -> float:
    """Returns the gamma that gives `signal` (values in 0..1) the mean `target`, if reachable.

    Setting the exposure per image this way keeps the mean intensity independent of how much
    of the frame bone and soft tissue cover (which changes with age). Zero stays zero, so the
    background keeps its level; the gamma is limited to [1/3, 3] to keep contrast plausible.
    """
    sample = signal[::4, ::4]
    lo, hi = math.log(1.0 / 3.0), math.log(3.0)
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        if float(np.power(sample, math.exp(mid)).mean()) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def render(
    scene: Scene, nz: Nuisance, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """Renders a scene under imaging conditions `nz`; `rng` draws the pixel noise only.

    Returns:
      uint8 array (height, width), bone bright on a dark background.
    """
    fr = _Frame(scene, nz, width, height)
    bone = np.zeros((height, width), np.float32)
    for b in scene.bones:
        _draw_tubular(bone, b, fr)
    for c in (*scene.carpals, scene.sesamoid):
        _draw_round(bone, c, fr)
    # In place from here on: full-frame temporaries dominate the cost at 640x800.
    atten = _soft_tissue(scene, fr, width, height, _MU_SOFT * nz.soft_contrast)
    bone *= _MU_BONE * nz.bone_contrast * scene.density
    atten += bone
    signal = np.exp(np.negative(atten, out=atten), out=atten)
    np.subtract(1.0, signal, out=signal)
    np.power(signal, _gamma_for_mean(signal, nz.signal_mean), out=signal)
    img = signal
    img *= 1.0 - nz.background
    img += nz.background
    sigma = nz.blur * height / _REF_HEIGHT
    if sigma > 0.25:
        pixels = Image.fromarray(np.round(img * 255.0).astype(np.uint8))
        blurred = pixels.filter(ImageFilter.GaussianBlur(float(sigma)))
        img = np.asarray(blurred, dtype=np.float32) * np.float32(1.0 / 255.0)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= img + 0.5
    noise *= nz.noise
    img += noise
    _marker_and_borders(img, nz)
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    return np.round(img, out=img).astype(np.uint8)


def render_phantom(age_months: float, male: bool, seed: int, width: int, height: int) -> np.ndarray:
    """Renders one phantom radiograph of a child with this true bone age and sex.

    Args:
      age_months: true bone age in months (>= 0).
      male: sex of the child.
      seed: picks the individual (proportions, posture) and the imaging conditions.
      width, height: image size in pixels.

    Returns:
      uint8 array (height, width), 8-bit grayscale.
    """
    if width < 32 or height < 32:
        raise ValueError(f"image size must be at least 32x32, got {width}x{height}")
    scene_ss, nuisance_ss, noise_ss = np.random.SeedSequence(seed).spawn(3)
    scene = build_scene(age_months, male, np.random.default_rng(scene_ss))
    nz = sample_nuisance(np.random.default_rng(nuisance_ss))
    return render(scene, nz, width, height, np.random.default_rng(noise_ss))
