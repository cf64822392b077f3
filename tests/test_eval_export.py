"""PNG folder and ADM-style .npz export round-trips."""
import numpy as np
import pytest
import torch

from var.errors import ConfigError, ImageSizeError
from var.eval.export import list_pngs, load_images, pack_npz, write_pngs


def test_npz_roundtrip_shape_dtype_count(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 12, 12, 3), dtype=np.uint8)
    write_pngs(images, tmp_path / "imgs", range(7))
    assert [p.name for p in list_pngs(tmp_path / "imgs")] == [f"{i:06d}.png" for i in range(7)]
    path = pack_npz(tmp_path / "imgs", expected_count=7)
    assert path == tmp_path / "imgs.npz"
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 12, 12, 3)
    np.testing.assert_array_equal(arr, images)  # PNG is lossless
    np.testing.assert_array_equal(load_images(path), images)
    np.testing.assert_array_equal(load_images(tmp_path / "imgs"), images)
    np.testing.assert_array_equal(load_images(path, limit=3), images[:3])


def test_float_images_are_rounded_like_var_utils(tmp_path):
    x = torch.rand(3, 3, 8, 8)
    write_pngs(x, tmp_path, [10, 11, 12])
    expected = x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(load_images(tmp_path), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000010.png", "000011.png", "000012.png"]


def test_pack_checks_count_and_sizes(tmp_path):
    write_pngs(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "a", [0, 1])
    with pytest.raises(ConfigError):
        pack_npz(tmp_path / "a", expected_count=3)
    write_pngs(np.zeros((1, 9, 9, 3), np.uint8), tmp_path / "a", [2])
    with pytest.raises(ImageSizeError):
        pack_npz(tmp_path / "a")
    assert not (tmp_path / "a.npz").exists()
    with pytest.raises(ImageSizeError):
        write_pngs(np.zeros((2, 8, 8), np.uint8), tmp_path / "b", [0, 1])
    np.save(tmp_path / "bad.npy", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ImageSizeError):
        load_images(tmp_path / "bad.npy")
