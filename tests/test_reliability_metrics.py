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


class _Named:
    """Feature arrays are passed directly; the extractor only names the numbers."""
    name = "random-conv(seed=0,32px,32-64-128)"


def _gauss(n, shift=0.0, seed=0, d=16):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_offline_metrics_name_the_extractor_in_the_key_not_fid():
    from var.eval.metrics import offline_metrics
    res = offline_metrics(_gauss(300), _gauss(300, seed=1), extractor=_Named())
    assert "fid" not in res and "kid_mean" not in res
    assert {"fd_random_conv", "kd_random_conv", "kd_random_conv_std", "precision", "recall"} <= set(res)


def test_kid_std_is_computed_over_subsets_smaller_than_the_sets():
    from var.eval.metrics import kernel_distance
    _, std = kernel_distance(_gauss(100), _gauss(100, seed=1), subset_size=1000)
    assert std > 1e-6  # subsets of the whole set are all the same set: std was 0.0000 in every run


def test_every_offline_number_has_a_bootstrap_interval_and_kid_of_one_distribution_is_zero_within_it():
    from var.eval.metrics import format_metrics, offline_metrics
    same = offline_metrics(_gauss(300), _gauss(300, seed=1), extractor=_Named())
    for key in ("fd_random_conv", "kd_random_conv", "precision", "recall"):
        lo, hi = same[f"{key}_ci95"]
        assert lo <= same[key] <= hi, key
    lo, hi = same["kd_random_conv_ci95"]
    assert lo <= 0.0 <= hi  # two independent draws of one distribution
    shifted = offline_metrics(_gauss(300, shift=1.0), _gauss(300, seed=1), extractor=_Named())
    assert shifted["kd_random_conv_ci95"][0] > 0  # a real difference is outside the interval
    assert "95% CI" in format_metrics(same)


def test_small_sample_sizes_carry_a_warning():
    from var.eval.metrics import MIN_RELIABLE_SAMPLES, offline_metrics
    res = offline_metrics(_gauss(50), _gauss(50, seed=1), extractor=_Named())
    assert "warning" in res and str(MIN_RELIABLE_SAMPLES) in res["warning"]
    big = offline_metrics(_gauss(MIN_RELIABLE_SAMPLES), _gauss(MIN_RELIABLE_SAMPLES, seed=1), extractor=_Named())
    assert "warning" not in big
