"""runtime.metrics: the one definition of the error figures and the latency percentile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.metrics import difference, percentile, relative_l2


def test_relative_l2_and_max_abs_by_hand():
    got, expected = np.array([3.0, 4.0, 0.0]), np.array([0.0, 0.0, 5.0])
    figures = difference(got, expected)
    assert figures.rel_l2 == pytest.approx(np.sqrt(9 + 16 + 25) / 5)
    assert figures.max_abs == 5.0 and figures.ref_max_abs == 5.0 and figures.finite


def test_a_zero_reference_gives_zero_for_zero_and_a_huge_figure_otherwise():
    assert relative_l2(np.zeros(4), np.zeros(4)) == 0.0
    assert relative_l2(np.ones(4), np.zeros(4)) > 1e29


def test_torch_half_tensors_are_compared_in_float64():
    expected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got = expected.half()
    assert relative_l2(got, expected) == 0.0  # these values are exact in fp16
    assert not difference(torch.tensor([float("nan"), 1.0]), torch.ones(2)).finite


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"cannot compare shape \(2,\) with \(3,\)"):
        difference(np.zeros(2), np.zeros(3))


def test_nearest_rank_percentile():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.2) == 1.0 and percentile(values, 0.21) == 2.0
    assert percentile(values, 0.99) == 5.0 and percentile(values, 0.0) == 1.0
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError, match="within 0..1"):
        percentile(values, 50)
