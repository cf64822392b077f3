"""Per-class accuracy (var.eval.class_accuracy): the texture column catches images drawn without their texture,
which the overall class accuracy hides."""
import dataclasses

import numpy as np
import pytest
import torch

from var.errors import ConfigError
from var.eval.class_accuracy import class_accuracy_report, corner_colours, sample_per_class
from var.train.data import SHAPE_CLASSES, ProceduralShapes, render_shape, to_model_range

TEXTURED = [c for c, cls in enumerate(SHAPE_CLASSES) if cls.texture != "solid"]


def _renders(per_class: int, *, plain: bool = False, seed: int = 5):
    """Held-out renders of every class; ``plain`` draws the textured classes with a solid fill."""
    images, labels = [], []
    for c, cls in enumerate(SHAPE_CLASSES):
        cls = dataclasses.replace(cls, texture="solid") if plain else cls
        for i in range(per_class):
            images.append(to_model_range(render_shape(cls, np.random.default_rng([seed, c, i]))))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def test_real_images_score_high_on_every_column():
    rep = class_accuracy_report(*_renders(6))
    assert rep.classes == [c.name for c in SHAPE_CLASSES] and rep.num_images == [6] * 10
    assert rep.overall["class"] >= 0.95 and rep.overall["texture"] == 1.0 and rep.overall["shape"] >= 0.85
    assert all(a == 1.0 for a in rep.texture_accuracy)
    md = rep.to_markdown()
    assert "| teal_hstripes | 6 |" in md and "**all** | 60" in md


def test_plain_fills_fail_the_texture_column_only():
    rep = class_accuracy_report(*_renders(6, plain=True))
    assert [rep.texture_accuracy[c] for c in TEXTURED] == [0.0] * len(TEXTURED)
    solid = [c for c in range(10) if c not in TEXTURED]
    assert all(rep.texture_accuracy[c] == 1.0 for c in solid)
    assert rep.overall["class"] >= 0.8  # colour and shape still give the class away: why the texture column exists


def test_without_attribute_judge():
    rep = class_accuracy_report(*_renders(2), attributes=False)
    assert rep.shape_accuracy is None and set(rep.overall) == {"class"}
    assert "texture" not in rep.to_markdown()


def test_sample_per_class_is_class_major_and_seeded():
    data = ProceduralShapes(100, seed=3)
    calls = []

    def fake_sampler(labels_B, gen):
        calls.append(len(labels_B))
        pick = torch.randint(0, 10, (len(labels_B),), generator=gen)  # consumes the shared generator
        return torch.stack([(to_model_range(data.image_uint8(int(c) + 10 * int(k))) + 1) / 2
                            for c, k in zip(labels_B, pick)])

    x1, y1 = sample_per_class(fake_sampler, num_classes=3, per_class=4, batch_size=5, seed=7)
    x2, _ = sample_per_class(fake_sampler, num_classes=3, per_class=4, batch_size=5, seed=7)
    assert y1.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and calls[:3] == [5, 5, 2]
    assert torch.equal(x1, x2) and x1.min() >= -1 and x1.max() <= 1
    with pytest.raises(ConfigError):
        sample_per_class(fake_sampler, num_classes=3, per_class=0)


def test_corner_colours_and_bad_input():
    x = torch.full((4, 3, 8, 8), -1.0)
    x[:, 1, 0, 7] = 1.0  # green top-right pixel
    c = corner_colours(x)
    assert c["top_right"] == [0.0, 255.0, 0.0] and c["inner_top_right"] == [0.0, 0.0, 0.0]
    assert c["bottom_left"] == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError):
        corner_colours(x[:, :2])
    with pytest.raises(ConfigError):
        class_accuracy_report(x, torch.tensor([0, 1, 2, 10]), attributes=False)
    with pytest.raises(ConfigError):
        class_accuracy_report(x, torch.tensor([0, 1]), attributes=False)


# ---- var-eval accuracy (the user's own model) ---------------------------------------------------------------
def _run_cli(argv):
    from var.cli.eval import main
    return main(argv)


def test_var_eval_accuracy_on_a_saved_model_with_fewer_classes(tmp_path, capsys):
    """A user's own (here: random tiny) VAR with 4 classes, saved as var-train exports it: per-class report of its 4
    classes, JSON with the settings and corner colours."""
    import json

    from var.hub import save_pretrained
    from var.models import create
    torch.manual_seed(0)
    save_pretrained(create("msvq_tiny"), tmp_path / "tok")
    save_pretrained(create("var_tiny", num_classes=4), tmp_path / "var")
    out = tmp_path / "acc.json"
    assert _run_cli(["accuracy", "--vae", str(tmp_path / "tok"), "--var", str(tmp_path / "var"), "--per-class", "2",
                     "--batch", "5", "--top-k", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| yellow_triangle | 2 |" in printed and "lime_ring | 2" in printed and "green_cross" not in printed
    rec = json.loads(out.read_text())
    assert rec["sampler"] == "next_scale" and rec["settings"]["top_k"] == 10 and rec["per_class"] == 2
    rep = rec["report"]
    assert rep["num_images"] == [2, 2, 2, 2] and len(rep["texture_accuracy"]) == 4
    assert all(0 <= a <= 1 for a in rep["class_accuracy"] + rep["shape_accuracy"] + rep["texture_accuracy"])
    assert set(rec["corner_colours"]) >= {"top_right", "inner_top_right"}


def test_var_eval_accuracy_next_token_random_init_and_errors(tmp_path, capsys):
    assert _run_cli(["accuracy", "--sampler", "next_token", "--random-init", "--per-class", "1", "--batch", "10",
                     "--no-attributes"]) == 0
    printed = capsys.readouterr().out
    assert "random-weight gpt_tiny" in printed and "texture" not in printed and "**all** | 10" in printed
    from var.hub import save_pretrained
    from var.models import create
    save_pretrained(create("msvq_tiny"), tmp_path / "tok")
    save_pretrained(create("var_tiny", num_classes=12), tmp_path / "var")
    with pytest.raises(ConfigError, match="12 classes"):
        _run_cli(["accuracy", "--vae", str(tmp_path / "tok"), "--var", str(tmp_path / "var"), "--per-class", "1"])
    with pytest.raises(ConfigError):
        _run_cli(["accuracy", "--random-init", "--per-class", "0"])
    with pytest.raises(ConfigError):  # a next-scale setting with a next-token sampler
        _run_cli(["accuracy", "--sampler", "next_token", "--random-init", "--more-smooth"])
