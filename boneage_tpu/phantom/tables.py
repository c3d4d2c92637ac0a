"""Adult hand geometry and the Greulich-Pyle-like maturity timeline of the bone-age phantom.

All event times are in male-equivalent years of skeletal maturity (see
`boneage_tpu.phantom.anatomy.maturity_years`); all sizes are in millimetres of an adult hand unless
a name says otherwise. Timings are approximate, after Greulich & Pyle: carpals appear from the
first months (capitate, hamate) to ~11 y (pisiform), epiphyses at ~1-3 y (distal ulna ~6 y),
growth plates fuse distal phalanges first and radius last.
"""

from __future__ import annotations

import dataclasses

MM = 1.0 / 200.0  # canonical units per millimetre
FEMALE_ADVANCE = 1.15  # girls' skeletal maturity runs this much faster
SEX_MATURITY = {True: 1.0, False: FEMALE_ADVANCE}
ADULT_YEARS = 18.0  # continuous traits saturate at this maturity

# Carpal ossification onsets (male-equivalent years), in their order of appearance.
CARPAL_ONSET = {
    "capitate": 0.15,
    "hamate": 0.35,
    "triquetrum": 2.6,
    "lunate": 3.6,
    "trapezium": 5.2,
    "trapezoid": 5.5,
    "scaphoid": 5.8,
    "pisiform": 11.0,
}
SESAMOID_ONSET = 13.0
# Carpals reach adult size (and crowd each other) at this maturity, or 5 years after onset.
CARPAL_ADULT_YEARS = 16.0

# Adult carpal shapes: centre (x, y) mm, semi-axes (a, b) mm, angle deg.
CARPAL_SHAPE = {
    "capitate": ((1.0, 25.0), (7.5, 11.0), 0.0),
    "hamate": ((-11.5, 24.0), (7.0, 10.0), -12.0),
    "triquetrum": ((-17.5, 10.5), (6.5, 5.5), 25.0),
    "lunate": ((-4.5, 8.5), (7.5, 6.5), 0.0),
    "trapezium": ((20.0, 22.0), (7.0, 6.5), 30.0),
    "trapezoid": ((12.5, 27.5), (5.5, 6.5), 0.0),
    "scaphoid": ((11.0, 9.5), (10.5, 5.5), 50.0),
    "pisiform": ((-20.0, 8.0), (4.5, 4.5), 0.0),
}


@dataclasses.dataclass(frozen=True)
class BoneSpec:
    """Adult size, shape and maturity timeline of one tubular bone."""

    name: str
    length: float  # articular end to articular end, mm
    width: float  # adult shaft width, mm
    distal_epiphysis: bool  # metacarpals 2-5, radius, ulna; else proximal
    aspect: float  # adult epiphysis height / width
    base_flare: float  # adult proximal end width / shaft width
    head_flare: float  # adult distal end width / shaft width
    onset: float  # epiphysis ossification, male-equivalent years
    fusion: float  # growth-plate fusion, male-equivalent years


def _digit(d: int, lengths, widths, onsets, fusions) -> tuple[BoneSpec, ...]:
    names = ("mc", "pp", "mp", "dp") if d != 1 else ("mc", "pp", "dp")
    specs = []
    for i, kind in enumerate(names):
        distal = kind == "mc" and d != 1
        aspect = 0.7 if distal else 0.3
        base, head = {"mc": (1.5, 1.55), "pp": (1.55, 1.35), "mp": (1.45, 1.3), "dp": (1.5, 0.9)}[
            kind
        ]
        specs.append(
            BoneSpec(
                f"{kind}{d}",
                lengths[i],
                widths[i],
                distal,
                aspect,
                base,
                head,
                onsets[i],
                fusions[i],
            )
        )
    return tuple(specs)


# Per digit: (metacarpal base joint (x, y) mm, metacarpal direction deg from +y to the thumb
# side, bones). Lengths and widths follow adult hand anatomy; onsets and fusions G&P-like.
RAYS = {
    1: ((26.0, 27.0), None, _digit(1, (46, 31, 22), (9.5, 8.5, 7.0), (2.6, 2.2, 1.8), (15.8, 15.6, 14.6))),
    2: ((12.0, 38.0), 9.0, _digit(2, (68, 40, 23, 17), (8.0, 8.0, 7.0, 6.0), (1.6, 1.5, 2.5, 2.8), (15.9, 15.6, 15.3, 14.8))),
    3: ((1.0, 40.0), 1.0, _digit(3, (65, 45, 28, 19), (8.5, 8.5, 7.5, 6.3), (1.8, 1.4, 2.2, 2.4), (15.9, 15.6, 15.3, 14.8))),
    4: ((-10.5, 37.0), -7.0, _digit(4, (58, 42, 26, 19), (7.0, 7.8, 7.0, 6.0), (2.0, 1.6, 2.3, 2.5), (15.9, 15.6, 15.3, 14.8))),
    5: ((-20.0, 33.0), -15.0, _digit(5, (53, 33, 18, 17), (6.8, 7.0, 6.0, 5.5), (2.3, 1.9, 3.0, 3.0), (15.9, 15.6, 15.3, 14.8))),
}  # fmt: skip
# Forearm bones: distal joint surface (x, y) mm and the bone.
FOREARM = {
    "radius": ((8.0, 0.0), BoneSpec("radius", 200.0, 11.0, True, 0.3, 1.0, 2.6, 1.1, 17.2)),
    "ulna": ((-17.0, -3.0), BoneSpec("ulna", 200.0, 7.5, True, 0.5, 1.0, 1.9, 5.8, 16.6)),
}
# Individual event-time variation (years), small enough to keep the documented orders
# (distal phalanges fuse first, radius last; carpals appear one after another).
JITTER_SD, JITTER_MAX = 0.1, 0.2
