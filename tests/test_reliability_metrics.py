"""Issue 13: metrics that were silently wrong or misnamed (see docs/reliability.md)."""
import numpy as np
import pytest

from var.errors import ConfigError


def test_statistics_that_give_a_negative_fid_are_refused_not_shown_as_zero():
    from var.eval.metrics import frechet_distance
    mu = np.zeros(2)
    with pytest.raises(ConfigError, match="positive semi-definite"):
        frechet_distance(mu, np.eye(2), mu, np.diag([4.0, -3.0]))  # raw value -1, used to print 0.0000


def test_identical_statistics_still_give_exactly_zero():
    from var.eval.metrics import frechet_distance
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    sigma = np.cov(a, rowvar=False)
    assert frechet_distance(a.mean(0), sigma, a.mean(0), sigma) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("limit", [-1, 0])
def test_a_limit_below_one_is_an_error_not_one_image_fewer(tmp_path, limit):
    from var.eval.export import load_images
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="limit"):
        load_images(tmp_path / "x.npz", limit=limit)
