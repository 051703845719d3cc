"""The front's pure functions, checked against hand-computed values and a brute-force count."""

import numpy as np
import pandas as pd
import pytest

from search.results.pareto import hypervolume, hypervolume_2d, pareto_mask


def test_hypervolume_of_known_points():
    assert hypervolume_2d(np.array([[-0.5, 0.5]]), (0.0, 1.0)) == pytest.approx(0.25)
    # two rectangles of 0.5 and 0.375 overlapping by 0.25
    two = np.array([[-1.0, 0.5], [-0.5, 0.25]])
    assert hypervolume_2d(two, (0.0, 1.0)) == pytest.approx(0.625)
    # a dominated point and one outside the box add nothing
    more = np.vstack([two, [[-0.4, 0.6], [0.5, 0.1]]])
    assert hypervolume_2d(more, (0.0, 1.0)) == pytest.approx(0.625)
    assert hypervolume_2d(np.empty((0, 2)), (0.0, 1.0)) == 0.0


def _cells(points: np.ndarray, ref: tuple[float, float]) -> float:
    """The same area counted cell by cell on the grid of the points' coordinates (exact)."""
    xs = np.unique(np.append(points[:, 0], ref[0]))
    ys = np.unique(np.append(points[:, 1], ref[1]))
    area = 0.0
    for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
        for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
            if ((points[:, 0] <= x0) & (points[:, 1] <= y0)).any():
                area += (x1 - x0) * (y1 - y0)
    return area


def test_hypervolume_matches_a_cell_count_on_random_fronts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        points = rng.uniform([-1, 0], [0, 1], size=(12, 2))
        ours = hypervolume_2d(points, (0.0, 1.0))
        assert ours == pytest.approx(_cells(points, (0.0, 1.0)))
        assert 0 < ours < 1


def test_study_hypervolume_is_the_share_of_the_box():
    df = pd.DataFrame({"trial": [0, 1], "accuracy": [99.0, 99.0], "latency_ms": [1.0, 0.5],
                       "reference": [True, False], "feasible": [True, True]})
    # no loss at half the latency: half of the box's latency side, all of its accuracy side
    assert hypervolume(df) == pytest.approx(0.5)


def test_pareto_mask_keeps_the_non_dominated():
    mask = pareto_mask(np.array([99.0, 98.0, 97.0, 98.0]), np.array([1.0, 0.5, 0.6, 0.5]))
    assert mask.tolist() == [True, True, False, True]
