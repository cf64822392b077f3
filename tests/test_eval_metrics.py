"""Offline FID / KID / precision-recall: formulas against references, behaviour on known distribution shifts."""
import numpy as np
import pytest
import torch

from var.errors import ConfigError
from var.eval import metrics
from var.eval.features import RandomConvFeatures, extract_features, load_offline_extractor


def smooth_images(n, seed, size=32):
    """Deterministic smooth random colour images, uint8 [n, size, size, 3]."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def add_noise(images_u8, sigma, seed=1):
    rng = np.random.default_rng(seed)
    return np.clip(images_u8.astype(np.float64) + rng.normal(0, sigma, images_u8.shape), 0, 255).round().astype(np.uint8)


def test_frechet_distance_matches_scipy_sqrtm_reference():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = metrics.feature_statistics(a)
    mu2, s2 = metrics.feature_statistics(b)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # 1-D closed form: (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_against_itself_is_zero_and_grows_with_noise():
    ext = RandomConvFeatures(seed=0)
    images = smooth_images(256, seed=0)
    ref = extract_features(ext, images)
    assert metrics.frechet_distance_features(ref, ref) == pytest.approx(0.0, abs=1e-6)
    fids = [metrics.frechet_distance_features(extract_features(ext, add_noise(images, s)), ref)
            for s in (0, 4, 16, 48, 96)]
    assert fids[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


def test_extractor_is_deterministic_and_seed_dependent():
    images = smooth_images(8, seed=3)
    f_a = extract_features(RandomConvFeatures(seed=0), images)
    f_b = extract_features(RandomConvFeatures(seed=0), images)
    f_c = extract_features(RandomConvFeatures(seed=1), images)
    np.testing.assert_array_equal(f_a, f_b)
    assert not np.allclose(f_a, f_c)
    # float [0, 1] input and uint8 input give the same features
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(extract_features(RandomConvFeatures(seed=0), x), f_a, rtol=1e-6)


def test_precision_recall_and_kid_on_known_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    same = rng.normal(size=(300, 8))
    far = rng.normal(size=(300, 8)) + 50.0
    collapsed = real[:1] + 0.01 * rng.normal(size=(300, 8))  # mode collapse onto one real point
    p, r = metrics.precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    p_c, r_c = metrics.precision_recall(real, collapsed)
    assert p_c == 1.0 and r_c < 0.1  # high fidelity, no diversity
    kid_same, _ = metrics.kernel_distance(real, same, num_subsets=10, subset_size=200)
    kid_far, _ = metrics.kernel_distance(real, far, num_subsets=10, subset_size=200)
    assert abs(kid_same) < 0.05 < kid_far


def test_offline_metrics_report_their_evaluator():
    images = smooth_images(64, seed=0)
    ext = RandomConvFeatures(seed=0)
    res = metrics.offline_metrics(add_noise(images, 30), images, extractor=ext, kid_subset_size=32)
    assert res["evaluator"] == f"offline:{ext.name}"
    assert res["fd_random_conv"] > 0 and res["num_samples"] == 64
    text = metrics.format_metrics(res)
    assert all(line.endswith(f"[offline:{ext.name}]") for line in text.splitlines())


def test_reference_statistics_file_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 6))
    path = metrics.save_reference_statistics(feats, tmp_path / "ref.npz", evaluator="offline:x")
    assert metrics.fid_against_statistics(feats, path, evaluator="offline:x") == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ConfigError):
        metrics.fid_against_statistics(feats, path, evaluator="offline:y")


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ConfigError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ConfigError):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
    with pytest.raises(ConfigError):
        load_offline_extractor("inception-from-the-internet")
    with pytest.raises(ConfigError):
        extract_features(RandomConvFeatures(), np.zeros((2, 8, 8), dtype=np.uint8))


def test_torch_fidelity_wrapper_maps_keys_and_names_evaluator(tmp_path, monkeypatch):
    """The wrapper passes the offline weights path through and labels every number (fake module: no download)."""
    import sys
    import types
    calls = {}

    def calculate_metrics(**kwargs):
        calls.update(kwargs)
        return {"frechet_inception_distance": 3.3, "inception_score_mean": 274.4, "inception_score_std": 2.0,
                "kernel_inception_distance_mean": 0.001, "kernel_inception_distance_std": 0.0001,
                "precision": 0.84, "recall": 0.51}

    fake = types.SimpleNamespace(calculate_metrics=calculate_metrics, __version__="0.0-fake")
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    weights = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    res = metrics.fidelity_metrics(tmp_path / "samples", tmp_path / "ref", weights_path=weights, cuda=False,
                                   input2_cache_name="ref-cache")
    assert calls["feature_extractor_weights_path"] == str(weights) and calls["input2_cache_name"] == "ref-cache"
    assert calls["fid"] and calls["isc"] and calls["kid"] and calls["prc"]
    assert calls["feature_extractor"] == "inception-v3-compat"  # also for precision/recall (default: VGG-16)
    assert res["fid"] == 3.3 and res["is_mean"] == 274.4 and res["recall"] == 0.51
    assert res["evaluator"].startswith("torch-fidelity 0.0-fake")
    with pytest.raises(ConfigError):
        metrics.fidelity_metrics(tmp_path, tmp_path, weights_path=tmp_path / "missing.pth")


def test_auto_extractor_prefers_the_offline_classifier_and_falls_back(monkeypatch):
    import sys
    import types

    class TinyClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)

        def features(self, x):
            return self.conv(x).mean(dim=(2, 3))

    import var.eval
    fake = types.ModuleType("var.eval.classifier")
    fake.load_classifier = lambda *a, **k: TinyClassifier()
    monkeypatch.setitem(sys.modules, "var.eval.classifier", fake)
    monkeypatch.setattr(var.eval, "classifier", fake, raising=False)  # the package attribute wins once imported
    ext = load_offline_extractor("auto")
    assert ext.name.startswith("offline-classifier(TinyClassifier,")
    assert extract_features(ext, smooth_images(3, seed=0)).shape == (3, 5)

    def missing(*a, **k):
        raise FileNotFoundError("no weights")

    fake.load_classifier = missing
    assert load_offline_extractor("auto").name.startswith("random-conv")
    with pytest.raises(ConfigError):
        load_offline_extractor("classifier")


# ---- choosing the evaluator and the Inception weights (fake torch-fidelity modules; the real one runs in
# tests/test_eval_fidelity_venv.py) ------------------------------------------------------------------------------
def _fake_torch_fidelity(monkeypatch, calls=None):
    import sys
    import types
    fake = types.ModuleType("torch_fidelity")
    fake.__version__ = "0.0-fake"
    fake.calculate_metrics = lambda **kw: (calls.update(kw) if calls is not None else None) or {
        "frechet_inception_distance": 1.0}
    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    sub.URL_INCEPTION_V3 = "https://example.invalid/" + metrics.INCEPTION_WEIGHTS_FILE
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)
    return fake


def test_auto_evaluator_falls_back_to_offline_without_weights(tmp_path, monkeypatch, caplog):
    """No --inception-weights and nothing cached: one warning line and the offline evaluator, never a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _fake_torch_fidelity(monkeypatch)
    with caplog.at_level("INFO", logger="var.eval.metrics"):
        assert metrics.choose_evaluator("auto") == "offline"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no --inception-weights" in lines[0] and "\n" not in lines[0], lines
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(1)}, weights)
    assert metrics.choose_evaluator("auto", weights) == "torch-fidelity"
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / metrics.INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1)}, cached)
    assert metrics.choose_evaluator("auto") == "torch-fidelity"
    assert metrics.inception_weights() == str(cached)  # the cached file is what torch-fidelity is given
    assert metrics.choose_evaluator("offline", weights) == "offline"
    with pytest.raises(ConfigError, match="unknown evaluator"):
        metrics.choose_evaluator("inception")


def test_auto_evaluator_without_or_with_a_broken_torch_fidelity(tmp_path, monkeypatch):
    """Not installed, or installed beside a torchvision of another torch (RuntimeError at import): auto takes the
    offline evaluator, an explicit torch-fidelity is one ConfigError naming the cause."""
    import sys
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import raises ImportError
    assert metrics.choose_evaluator("auto") == "offline"
    with pytest.raises(ConfigError, match="not installed"):
        metrics.choose_evaluator("torch-fidelity")
    broken = tmp_path / "broken" / "torch_fidelity"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "torch_fidelity")
    monkeypatch.syspath_prepend(str(broken.parent))
    assert metrics.choose_evaluator("auto") == "offline"
    with pytest.raises(ConfigError, match="torchvision::nms.*torchvision must be the build"):
        metrics.choose_evaluator("torch-fidelity")


def test_inception_weights_are_checked_and_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import pickle
    import urllib.error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _fake_torch_fidelity(monkeypatch)

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match="could not download the Inception weights.*--inception-weights") as err:
        metrics.inception_weights()
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        metrics.inception_weights(tmp_path / "missing.pth")
    code = tmp_path / "code.pth"  # a pickle that would run code when torch-fidelity unpickles it
    code.write_bytes(pickle.dumps(Exception("not weights"), protocol=2))
    with pytest.raises(ConfigError, match="not a plain state dict"):
        metrics.inception_weights(code)
    with pytest.raises(ConfigError, match="not a plain state dict"):
        metrics.fidelity_metrics(tmp_path, tmp_path, weights_path=code)


def test_fidelity_kid_subsets_and_is_splits_shrink_to_small_folders(tmp_path, monkeypatch):
    """torch-fidelity refuses KID subsets larger than a set (its default 1000) and gives NaN for IS splits with no
    image (10 splits): small sets must still run."""
    calls = {}
    _fake_torch_fidelity(monkeypatch, calls)
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(1)}, weights)
    for name, n in (("a", 12), ("b", 7)):
        (tmp_path / name / "sub").mkdir(parents=True)
        for i in range(n):
            (tmp_path / name / "sub" / f"{i}.png").write_bytes(b"")
    metrics.fidelity_metrics(tmp_path / "a", tmp_path / "b", weights_path=weights, cuda=False)
    assert calls["kid_subset_size"] == 7 and calls["isc_splits"] == 6  # IS of the samples (a): 2 images a split
