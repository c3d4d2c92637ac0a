"""Tests of tools.benchmark_tta: the sets' parsing and the per-view and per-subset MAEs."""

from __future__ import annotations

import numpy as np
import pytest

from boneage_tpu.core.errors import UsageError
from tools import benchmark_tta

ORDER = list(benchmark_tta.SUBSETS["rotflip"])


def test_sets_are_name_equals_folder_and_unique():
    assert benchmark_tta.parse_sets(["val=a", "g=b/c"]) == {"val": "a", "g": "b/c"}
    with pytest.raises(UsageError, match="not name=folder"):
        benchmark_tta.parse_sets(["val"])
    with pytest.raises(UsageError, match="given twice"):
        benchmark_tta.parse_sets(["v=a", "v=b"])


def test_each_view_and_subset_mae_is_of_its_own_views():
    rng = np.random.default_rng(0)
    boneage = rng.uniform(10, 200, 50)
    # View i is off by i + 1 months on every record; unlabelled records are left out.
    offsets = np.arange(1, len(ORDER) + 1, dtype=float)
    views = boneage[None, :] + offsets[:, None]
    boneage_with_gap = boneage.copy()
    boneage_with_gap[0] = -1.0
    views[:, 0] = 1e6  # an unlabelled record's prediction must not count
    table = benchmark_tta.view_table(views, ORDER, boneage_with_gap)
    assert table["n"] == 49
    assert [v["mae_months"] for v in table["views"]] == pytest.approx(list(offsets))
    for name, members in benchmark_tta.SUBSETS.items():
        expected = np.mean([offsets[ORDER.index(m)] for m in members])
        assert table["subsets"][name]["mae_months"] == pytest.approx(expected), name
        assert table["subsets"][name]["bias_months"] == pytest.approx(expected), name
    # The plain view is (0 degrees, unmirrored): rotflip's fifth view.
    assert table["subsets"]["none"]["mae_months"] == pytest.approx(5.0)


def test_errors_of_opposite_sign_cancel_in_the_mean_not_in_the_views():
    boneage = np.full(4, 100.0)
    views = np.full((len(ORDER), 4), 100.0)
    views[ORDER.index((0.0, False))] += 4.0
    views[ORDER.index((0.0, True))] -= 4.0
    table = benchmark_tta.view_table(views, ORDER, boneage)
    assert table["subsets"]["none"]["mae_months"] == pytest.approx(4.0)
    assert table["subsets"]["flip"]["mae_months"] == pytest.approx(0.0)


def test_a_split_without_labels_or_a_missing_view_is_a_usage_error():
    views = np.zeros((len(ORDER), 3))
    with pytest.raises(UsageError, match="no labelled record"):
        benchmark_tta.view_table(views, ORDER, np.full(3, -1.0))
    with pytest.raises(UsageError, match="subset flip needs views"):
        benchmark_tta.view_table(views[:1], [(0.0, False)], np.full(3, 10.0))
