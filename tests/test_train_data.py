"""Offline dataset, folder dataset, resumable sampler and the shapes classifier."""
import numpy as np
import pytest
import torch
from PIL import Image

from var.errors import CheckpointError, ConfigError
from var.eval.classifier import (ClassifierConfig, ShapeClassifier, accuracy, load_classifier, save_classifier,
                                 train_classifier)
from var.train.data import SHAPE_CLASSES, ImageFolderDataset, ProceduralShapes, ResumableBatchSampler


def test_procedural_is_deterministic_and_balanced():
    a, b = ProceduralShapes(40, seed=3), ProceduralShapes(40, seed=3, cache=False)
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (40, 3, 32, 32) and xa.min() >= -1 and xa.max() <= 1
    assert torch.bincount(ya).tolist() == [4] * 10
    xc, _ = ProceduralShapes(40, seed=4).tensors()
    assert not torch.equal(xa, xc)
    assert len(SHAPE_CLASSES) >= 10


def test_procedural_classes_differ_in_colour():
    x, y = ProceduralShapes(200, seed=0).tensors()
    # mean foreground colour per class: classes are separated by hue, so per-class means must be distinct
    means = torch.stack([x[y == c].mean(dim=(0, 2, 3)) for c in range(10)])
    dist = torch.cdist(means, means) + torch.eye(10) * 10
    assert dist.min() > 0.02


def test_hflip_uses_item_seed():
    ds = ProceduralShapes(8, hflip=True)
    img0, _ = ds[0]
    flips = [torch.equal(ds[(0, s)][0], img0.flip(-1)) for s in range(20)]
    assert any(flips) and not all(flips)
    assert torch.equal(ds[(0, 5)][0], ds[(0, 5)][0])


def test_bad_config_raises():
    with pytest.raises(ConfigError):
        ProceduralShapes(10, num_classes=99)
    with pytest.raises(ConfigError):
        ImageFolderDataset("/nonexistent/folder")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("b_cat", "a_dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, 16, hflip=True)
    assert ds.classes == ["a_dog", "b_cat"] and len(ds) == 4
    x, y = ds[(3, 11)]
    assert x.shape == (3, 16, 16) and y == 1 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[(3, 11)][0], x)
    val = ImageFolderDataset(tmp_path, 16, train=False)
    assert torch.equal(val[0][0], val[0][0])


def test_sampler_shards_and_resumes():
    n, bs = 50, 4
    s0 = ResumableBatchSampler(n, bs, seed=1, rank=0, world_size=2)
    s1 = ResumableBatchSampler(n, bs, seed=1, rank=1, world_size=2)
    assert len(s0) == 6
    it0, it1 = iter(s0), iter(s1)
    seen = []
    for _ in range(len(s0)):
        seen += [i for i, _ in next(it0)] + [i for i, _ in next(it1)]
    assert len(set(seen)) == len(seen) == 48  # one epoch, disjoint across ranks
    ref = ResumableBatchSampler(n, bs, seed=1)
    it = iter(ref)
    batches = [next(it) for _ in range(20)]
    resumed = ResumableBatchSampler(n, bs, seed=1)
    for _ in range(9):
        resumed.advance()
    state = resumed.state_dict()
    fresh = ResumableBatchSampler(n, bs, seed=1)
    fresh.load_state_dict(state)
    it = iter(fresh)
    assert [next(it) for _ in range(11)] == batches[9:]
    with pytest.raises(ConfigError):
        ResumableBatchSampler(n, 5, seed=1).load_state_dict(state)


def test_classifier_learns_and_round_trips(tmp_path):
    ds = ProceduralShapes(300, seed=0)
    clf = train_classifier(ds, steps=60, batch_size=32, config=ClassifierConfig(widths=(8, 16, 32), norm_groups=4))
    x, y = ProceduralShapes(100, seed=9).tensors()
    assert accuracy(clf, x, y) > 0.5  # chance is 0.1
    save_classifier(clf, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    assert torch.equal(loaded(x[:4]), clf(x[:4]))
    assert loaded.features(x[:4]).shape == (4, 32)
    assert loaded.features(torch.nn.functional.interpolate(x[:2], size=64)).shape == (2, 32)  # resized input
    with pytest.raises(CheckpointError):
        load_classifier(tmp_path / "nothing")


def test_classifier_forward_shape():
    clf = ShapeClassifier(num_classes=10)
    assert clf(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
