"""The converter's plan: which split every row goes to, and the digest of a conversion.

The digest (`plan_key`) names everything that determines the output except the shard count:
a rerun with the same key resumes, another key is refused (see `boneage_tpu.convert.job`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from boneage_tpu.core import schema
from boneage_tpu.data.layouts import ConvertError, Row

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")


def check_split_name(name: str) -> None:
    """Rejects split names that are not usable in shard file names (letters, digits, _)."""
    # fullmatch: `re.match` with `$` accepts a trailing newline ("test\n").
    if not _SPLIT_NAME.fullmatch(name):
        raise ConvertError(f"split name {name!r} must be letters, digits or '_'")


def assign_splits(
    rows: Sequence[Row], *, val_fraction: float, seed: int, split_name: str, num_folds: int = 0
) -> dict[str, list[Row]]:
    """Splits rows into `train`/`val` stratified by age band x sex, or all into `split_name`.

    The validation size is round(val_fraction * rows), shared among strata by largest remainder
    so that small strata still add up. Each split is then shuffled (seeded), so shards mix ages.
    With `num_folds` K >= 2 the rows go instead into K stratified folds `fold0..fold{K-1}`
    (`schema.fold_split`): each stratum, shuffled, is dealt round-robin, continuing where the
    previous stratum stopped, so fold sizes differ by at most one and every fold has every
    stratum in proportion.
    """
    rng = np.random.default_rng(seed)
    ordered = sorted(rows, key=lambda r: r.image_id)
    if split_name:
        if num_folds:
            raise ConvertError("--num_folds and --split_name exclude each other")
        check_split_name(split_name)
        return {split_name: _shuffled(ordered, rng)}
    if num_folds:
        return _assign_folds(ordered, num_folds, rng)
    if not 0.0 <= val_fraction < 1.0:
        raise ConvertError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if any(r.boneage is None for r in ordered):
        raise ConvertError("unlabeled rows cannot be split into train/val: pass --split_name")
    strata: list[list[Row]] = [[] for _ in range(schema.NUM_STRATA)]
    for row in ordered:
        strata[row.stratum].append(row)
    quotas = [val_fraction * len(s) for s in strata]
    counts = [math.floor(q) for q in quotas]
    remaining = math.floor(val_fraction * len(ordered) + 0.5) - sum(counts)
    by_remainder = sorted(range(len(strata)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: max(remaining, 0)]:
        counts[i] += 1
    train, val = [], []
    for members, count in zip(strata, counts, strict=True):
        order = rng.permutation(len(members))
        val.extend(members[i] for i in order[:count])
        train.extend(members[i] for i in order[count:])
    splits = {"train": _shuffled(train, rng), "val": _shuffled(val, rng)}
    return {name: members for name, members in splits.items() if members}


def _assign_folds(ordered: list[Row], num_folds: int, rng: np.random.Generator) -> dict:
    if num_folds < 2:
        raise ConvertError(f"--num_folds must be >= 2 (or 0 for train/val), got {num_folds}")
    if num_folds > len(ordered):
        raise ConvertError(f"--num_folds {num_folds} is more than the {len(ordered)} rows")
    if any(r.boneage is None for r in ordered):
        raise ConvertError("unlabeled rows cannot be split into folds: pass --split_name")
    folds: list[list[Row]] = [[] for _ in range(num_folds)]
    dealt = 0
    for stratum in range(schema.NUM_STRATA):
        members = [r for r in ordered if r.stratum == stratum]
        for i in rng.permutation(len(members)):
            folds[dealt % num_folds].append(members[i])
            dealt += 1
    return {schema.fold_split(k): _shuffled(rows, rng) for k, rows in enumerate(folds)}


def _shuffled(rows: list[Row], rng: np.random.Generator) -> list[Row]:
    return [rows[i] for i in rng.permutation(len(rows))]


def plan_key(
    options: dict[str, Any], csv_sha256: str, splits: dict[str, list[Row]], skipped: list[dict]
) -> str:
    """Returns a digest of everything that determines the output except the shard count."""
    content = {
        "options": options,
        "csv_sha256": csv_sha256,
        "splits": {
            name: [[r.line, r.image_id, r.path, r.boneage, r.male] for r in rows]
            for name, rows in sorted(splits.items())
        },
        "skipped": skipped,
    }
    return hashlib.sha256(repr(content).encode("utf-8")).hexdigest()
