"""Scene model of the bone-age phantom: a Greulich-Pyle-like left hand at a given bone age.

`build_scene(bone_age_months, male, rng)` is a pure function returning a `Scene`: every bone
with its position and size in canonical hand coordinates, which epiphyses and carpals are
ossified and the state of each growth plate. `boneage_tpu.phantom.render` draws it.

Canonical coordinates: a left hand seen palm down (PA view), x to the thumb side (image
right), y up towards the fingers, unit = 200 mm (about one adult hand length), origin at the
middle of the radius' distal joint surface.

Maturity: every event time below is in "male-equivalent years". A child's maturity is
`bone_age_years * SEX_MATURITY[male]`, so girls reach each stage at a younger bone age (all
growth plates fuse at ~15-17 y in boys, ~13-15 y in girls) and the sex input carries
information. Continuous traits (bone width, cortex, density, flare, epiphysis size, carpal
size, soft-tissue and joint-space thickness) keep changing until ~18 male-equivalent years so
that age is visible at coarse resolution, not only in 1-px growth-plate lines.

The rng only draws individual variation (proportions, small event-time jitter) and posture
(finger spread, thumb abduction); it draws the same numbers in the same order for every age
and sex, so one rng seed is one child followed through time.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from boneage_tpu.phantom.tables import (
    ADULT_YEARS,
    CARPAL_ADULT_YEARS,
    CARPAL_ONSET,
    CARPAL_SHAPE,
    FOREARM,
    JITTER_MAX,
    JITTER_SD,
    MM,
    RAYS,
    SESAMOID_ONSET,
    SEX_MATURITY,
    BoneSpec,
)

__all__ = [
    "CARPAL_ONSET",
    "Epiphysis",
    "RoundBone",
    "Scene",
    "SoftTissue",
    "TubularBone",
    "build_scene",
    "growth_progress",
    "maturity_years",
]


@dataclasses.dataclass(frozen=True)
class Epiphysis:
    """The secondary ossification centre at one end of a tubular bone and its growth plate."""

    distal: bool  # at the distal (finger-tip / hand) end of the bone
    ossified: bool
    center: tuple[float, float]
    width: float  # 0 while not ossified
    height: float  # along the bone axis
    plate: float  # dark growth-plate gap to the shaft; 0 once fused
    fused: bool
    fusion: float  # 0..1 bridging of the plate during the last months before fusion
    scar: float  # 0..1 visibility of the fusion line, fades over ~2 years after fusion
    cap: float  # 0..1 how much the epiphysis caps (wraps) the metaphysis


@dataclasses.dataclass(frozen=True)
class TubularBone:
    """A long bone's ossified shaft (diaphysis + metaphyses) and its epiphysis."""

    name: str  # mc1..mc5, pp1..pp5, mp2..mp5, dp1..dp5, radius, ulna
    start: tuple[float, float]  # proximal end of the shaft
    end: tuple[float, float]  # distal end of the shaft
    width: float  # shaft width
    base_width: float  # width at the proximal metaphysis
    head_width: float  # width at the distal metaphysis
    cortex: float  # cortical thickness / half-width
    epiphysis: Epiphysis


@dataclasses.dataclass(frozen=True)
class RoundBone:
    """A carpal bone or the thumb sesamoid: an ossified (super-)ellipse."""

    name: str
    ossified: bool
    center: tuple[float, float]
    semi_axes: tuple[float, float]  # 0 while not ossified
    angle: float  # radians
    squareness: float  # superellipse exponent: 2 round (young) .. 2.8 angular (crowded)


@dataclasses.dataclass(frozen=True)
class SoftTissue:
    """Outline of the hand: finger capsules and one palm + forearm polygon."""

    fingers: tuple[tuple[tuple[float, float], tuple[float, float], float], ...]  # p0, p1, r
    palm: tuple[tuple[float, float], ...]  # closed outline of palm, wrist and forearm
    tip: tuple[float, float]  # middle finger tip (hand length is measured to it)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything the renderer draws, in canonical coordinates (see module docstring)."""

    age_months: float
    male: bool
    maturity_years: float
    density: float  # bone attenuation relative to adult
    bones: tuple[TubularBone, ...]
    carpals: tuple[RoundBone, ...]
    sesamoid: RoundBone
    soft_tissue: SoftTissue

    @property
    def num_ossified_carpals(self) -> int:
        """Number of carpal bones with an ossification centre."""
        return sum(c.ossified for c in self.carpals)

    @property
    def num_ossified_epiphyses(self) -> int:
        """Number of tubular bones whose epiphysis has ossified."""
        return sum(b.epiphysis.ossified for b in self.bones)

    @property
    def num_fused_plates(self) -> int:
        """Number of growth plates that have fused."""
        return sum(b.epiphysis.fused for b in self.bones)

    def bone(self, name: str) -> TubularBone:
        """Returns the tubular bone called `name` (e.g. "mc3", "radius")."""
        for b in self.bones:
            if b.name == name:
                return b
        raise KeyError(f"no bone {name!r}; bones: {[b.name for b in self.bones]}")


def maturity_years(bone_age_months: float, male: bool) -> float:
    """Returns skeletal maturity in male-equivalent years (girls run FEMALE_ADVANCE faster)."""
    return bone_age_months / 12.0 * SEX_MATURITY[bool(male)]


def _ramp(x: float, a: float, b: float) -> float:
    return float(min(max((x - a) / (b - a), 0.0), 1.0))


def _smooth(x: float) -> float:
    return x * x * (3.0 - 2.0 * x)


def growth_progress(s: float) -> float:
    """Returns 0..1 progress of continuous traits at maturity `s` (fast early, never flat)."""
    s = min(max(s, 0.0), ADULT_YEARS)
    fast = (1.0 - math.exp(-s / 6.0)) / (1.0 - math.exp(-ADULT_YEARS / 6.0))
    return 0.5 * fast + 0.5 * s / ADULT_YEARS


def _unit(deg: float) -> np.ndarray:
    return np.array([math.sin(math.radians(deg)), math.cos(math.radians(deg))])


def _pt(v: np.ndarray) -> tuple[float, float]:
    return (float(v[0]), float(v[1]))


class _Individual:
    """Individual variation drawn once, in a fixed order, independent of age and sex."""

    def __init__(self, rng: np.random.Generator):
        self.size = 1.0 + 0.03 * rng.standard_normal(32).clip(-2.5, 2.5)
        self.width = 1.0 + 0.05 * rng.standard_normal(32).clip(-2.5, 2.5)
        self.jitter = (JITTER_SD * rng.standard_normal(64)).clip(-JITTER_MAX, JITTER_MAX)
        self.soft = 1.0 + 0.06 * float(rng.standard_normal())
        self.spread = float(rng.uniform())  # 0: fingers together, 1: spread wide
        self.thumb = float(rng.uniform(24.0, 46.0))  # thumb abduction, deg
        self.finger_angle = 2.0 * rng.standard_normal(6)


def _tubular(
    spec: BoneSpec,
    joint0: np.ndarray,
    u: np.ndarray,
    s: float,
    p: float,
    size: float,
    wscale: float,
    jitter: tuple[float, float],
) -> tuple[TubularBone, np.ndarray]:
    """Builds one bone whose proximal joint surface is `joint0`, along unit vector `u`."""
    onset, fusion_t = spec.onset + jitter[0], spec.fusion + jitter[1]
    length = spec.length * MM * size
    width = spec.width * MM * wscale * (0.75 + 0.35 * p)
    flare_now = 0.5 + 0.5 * p
    base_w = width * (1.0 + (spec.base_flare - 1.0) * flare_now)
    head_w = width * (1.0 + (spec.head_flare - 1.0) * flare_now)
    meta_w = head_w if spec.distal_epiphysis else base_w
    full_w = meta_w * 1.04
    full_h = full_w * spec.aspect * (1.0 + 0.5 * (1.0 - p))  # young ends are more cartilage
    narrowing = _smooth(_ramp(s, fusion_t - 3.0, fusion_t))
    plate = (0.005 + 0.004 * (1.0 - p)) * (1.0 - narrowing)
    fused = s >= fusion_t
    ossified = s >= onset
    if ossified:
        grow = _smooth(_ramp(s, onset, onset + 7.5))
        cap = _ramp(s, fusion_t - 4.0, fusion_t - 1.0)
        e_w = full_w * (0.3 + 0.7 * grow + 0.06 * cap)
        aspect = 0.9 + (spec.aspect - 0.9) * _ramp(s, onset, onset + 4.0)
        e_h = min(e_w * aspect, full_h)
    else:
        cap, e_w, e_h = 0.0, 0.0, 0.0
    zone = full_h + plate  # cartilage end zone: growth plate + (unossified) epiphysis
    joint1 = joint0 + length * u
    if spec.distal_epiphysis:
        start, end = joint0, joint1 - zone * u
        e_center = end + (plate + 0.5 * e_h) * u
    else:
        start, end = joint0 + zone * u, joint1
        e_center = start - (plate + 0.5 * e_h) * u
    epi = Epiphysis(
        distal=spec.distal_epiphysis,
        ossified=ossified,
        center=_pt(e_center),
        width=e_w,
        height=e_h,
        plate=0.0 if fused else plate,
        fused=fused,
        fusion=_ramp(s, fusion_t - 0.6, fusion_t),
        scar=(1.0 - _ramp(s, fusion_t, fusion_t + 2.0)) if fused else 0.0,
        cap=cap,
    )
    bone = TubularBone(
        name=spec.name,
        start=_pt(start),
        end=_pt(end),
        width=width,
        base_width=base_w,
        head_width=head_w,
        cortex=0.22 + 0.18 * p,
        epiphysis=epi,
    )
    return bone, joint1


def build_scene(bone_age_months: float, male: bool, rng: np.random.Generator) -> Scene:
    """Returns the hand of a child with this true bone age and sex (see module docstring).

    Args:
      bone_age_months: true bone age, >= 0 (values past adulthood look adult).
      male: the child's sex; girls of the same bone age are more mature.
      rng: draws individual variation and posture only, never age-dependent amounts.
    """
    if not bone_age_months >= 0.0:
        raise ValueError(f"bone_age_months must be >= 0, got {bone_age_months}")
    ind = _Individual(rng)
    s = maturity_years(bone_age_months, male)
    p = growth_progress(s)
    joint_gap = (2.0 + 4.0 * (1.0 - p)) * MM
    bones, tips, heads = [], {}, {}
    k = 0
    for d, (base, mc_angle, specs) in RAYS.items():
        if d == 1:
            angles = [ind.thumb, ind.thumb - 8.0, ind.thumb - 12.0]
        else:
            spread = ind.spread * (10.0, 1.0, -8.0, -16.0)[d - 2] + ind.finger_angle[d]
            angles = [mc_angle, mc_angle + spread, mc_angle + spread, mc_angle + spread]
        joint = np.array(base) * MM
        for spec, angle in zip(specs, angles, strict=True):
            u = _unit(angle)
            jit = (float(ind.jitter[2 * k]), float(ind.jitter[2 * k + 1]))
            bone, joint = _tubular(spec, joint, u, s, p, ind.size[k], ind.width[k], jit)
            bones.append(bone)
            if spec.name.startswith("mc"):
                heads[d] = (joint, u)
            joint = joint + joint_gap * u
            k += 1
        tips[d] = (joint + (3.0 + 2.0 * (1.0 - p)) * MM * u, u)
    for surface, spec in FOREARM.values():
        u = _unit(0.0)
        jit = (float(ind.jitter[2 * k]), float(ind.jitter[2 * k + 1]))
        joint0 = np.array(surface) * MM - spec.length * MM * u
        bone, _ = _tubular(spec, joint0, u, s, p, 1.0, ind.width[k], jit)
        bones.append(bone)
        k += 1
    carpals = tuple(
        _carpal(name, s, ind.size[21 + i], float(ind.jitter[42 + i]))
        for i, name in enumerate(CARPAL_ONSET)
    )
    sesamoid = _sesamoid(s, heads[1], float(ind.jitter[50]))
    return Scene(
        age_months=float(bone_age_months),
        male=bool(male),
        maturity_years=s,
        density=0.62 + 0.38 * p,
        bones=tuple(bones),
        carpals=carpals,
        sesamoid=sesamoid,
        soft_tissue=_soft_tissue(bones, heads, tips, p, ind.soft),
    )


def _carpal(name: str, s: float, size: float, jitter: float) -> RoundBone:
    (cx, cy), (a, b), angle = CARPAL_SHAPE[name]
    # Scaled so that the first-months centres cannot appear before birth.
    onset = CARPAL_ONSET[name] + 0.45 * jitter * min(1.0, CARPAL_ONSET[name] / 2.0)
    ossified = s >= onset
    end = max(onset + 5.0, CARPAL_ADULT_YEARS)
    grow = _ramp(s, onset, end) ** 0.7 if ossified else 0.0
    scale = (0.2 + 0.8 * grow) * size * MM if ossified else 0.0
    return RoundBone(
        name=name,
        ossified=ossified,
        center=(cx * MM, cy * MM),
        semi_axes=(a * scale, b * scale),
        angle=math.radians(angle),
        squareness=2.0 + 0.8 * grow,
    )


def _sesamoid(s: float, mc1_head: tuple[np.ndarray, np.ndarray], jitter: float) -> RoundBone:
    head, u = mc1_head
    ossified = s >= SESAMOID_ONSET + jitter
    r = (1.2 + 1.6 * _ramp(s, SESAMOID_ONSET, SESAMOID_ONSET + 3.0)) * MM if ossified else 0.0
    normal = np.array([-u[1], u[0]])  # towards the index finger
    center = head - 4.0 * MM * u + 3.0 * MM * normal
    return RoundBone("sesamoid", ossified, _pt(center), (r, r), 0.0, 2.0)


def _chaikin(points: np.ndarray, rounds: int) -> np.ndarray:
    """Rounds the corners of an open polyline (end points kept)."""
    for _ in range(rounds):
        a, b = points[:-1], points[1:]
        cut = np.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], 1).reshape(-1, 2)
        points = np.concatenate([points[:1], cut, points[-1:]])
    return points


def _soft_tissue(bones, heads, tips, p: float, soft: float) -> SoftTissue:
    """Outlines the hand around the bones; young hands have relatively more soft tissue."""
    chub = (1.2 - 0.2 * p) * soft
    by_name = {b.name: b for b in bones}
    fingers = []
    for d, (tip, u) in tips.items():
        radius = (9.5 if d == 1 else (7.8, 8.2, 7.8, 7.0)[d - 2]) * MM * chub
        first = "mc1" if d == 1 else f"pp{d}"
        fingers.append((by_name[first].start, _pt(tip - radius * u), radius))
    margin = 8.0 * MM * chub

    def side(d: int, sign: float, where: float = 1.0) -> np.ndarray:
        head, u = heads[d]
        bone = by_name[f"mc{d}"]
        at = np.array(bone.start) + where * (head - np.array(bone.start))
        return at + sign * margin * np.array([u[1], -u[0]]) + 3.0 * MM * u * where

    wrist = 28.0 * MM * chub
    mc1 = by_name["mc1"]
    thenar = np.array(mc1.start) + 0.45 * (np.array(mc1.end) - np.array(mc1.start))
    thenar_u = np.array(heads[1][1])
    outline = np.array(
        [
            (-wrist - 4.0 * MM, -300.0 * MM),
            (-wrist, -12.0 * MM),
            _pt(side(5, -1.0, 0.0) + np.array([-3.0 * MM * chub, 0.0])),
            _pt(side(5, -1.0, 0.6)),
            _pt(side(5, -1.0)),
            _pt(side(4, 0.0)),
            _pt(side(3, 0.0)),
            _pt(side(2, 1.0)),
            _pt(0.5 * side(2, 1.0, 0.5) + 0.5 * heads[1][0]),
            _pt(thenar + 1.3 * margin * np.array([thenar_u[1], -thenar_u[0]])),
            (wrist + 2.0 * MM, 2.0 * MM),
            (wrist, -12.0 * MM),
            (wrist + 4.0 * MM, -300.0 * MM),
        ]
    )
    palm = tuple(_pt(v) for v in _chaikin(outline, 3))
    return SoftTissue(tuple(fingers), palm, _pt(tips[3][0]))
