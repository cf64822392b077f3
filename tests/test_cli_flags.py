"""Issue 13: a command-line flag that the chosen sampler (or command) does not use is an error naming the flag,
never silently ignored."""
import pytest
import torch

from var.cli.eval import main as eval_main
from var.cli.sample import main as sample_main
from var.errors import ConfigError

REFUSED = (ConfigError, SystemExit)


@pytest.mark.parametrize("extra, flag", [
    (["--window", "4"], "--window"),  # a Jacobi window on the VAR sampler
    (["--coupling", "gumbel"], "--coupling"),
    (["--zipar-window", "2"], "--zipar-window"),
])
def test_var_sample_refuses_next_token_flags_on_the_var_sampler(tmp_path, extra, flag):
    with pytest.raises(REFUSED, match=flag):
        sample_main(["--random-init", "--classes", "1", "--out", str(tmp_path / "g.png"), *extra])


@pytest.mark.parametrize("sampler, extra, flag", [
    ("next_token", ["--more-smooth"], "--more-smooth"),  # VAR's smoothing on a GPT
    ("sjd", ["--coupling", "gumbel"], "--coupling"),  # MC-SJD's coupling on SJD
    ("next_token", ["--window", "4"], "--window"),
    ("zipar", ["--lantern-k", "8"], "--lantern-k"),
])
def test_var_sample_refuses_flags_the_next_token_sampler_does_not_take(tmp_path, sampler, extra, flag):
    with pytest.raises(REFUSED, match=flag):
        sample_main(["--family", "ar", "--random-init", "--sampler", sampler, "--classes", "1",
                     "--out", str(tmp_path / "g.png"), *extra])


def test_var_sample_refuses_num_images_with_classes(tmp_path):
    with pytest.raises(REFUSED, match="--num-images"):
        sample_main(["--random-init", "--classes", "1", "2", "--num-images", "5", "--out", str(tmp_path / "g.png")])


def test_var_eval_refuses_a_budget_without_a_cache_policy(tmp_path):
    with pytest.raises(REFUSED, match="budget"):
        eval_main(["sample", "--random-init", "--out", str(tmp_path / "x"), "--num-images", "2", "--budget", "0.1",
                   "--device", "cpu"])
    assert not (tmp_path / "x" / "images").exists()  # refused before anything was written


def test_var_eval_refuses_a_setting_the_sampler_does_not_take(tmp_path):
    with pytest.raises(REFUSED, match="window"):
        eval_main(["sample", "--random-init", "--out", str(tmp_path / "x"), "--num-images", "2", "--window", "4",
                   "--device", "cpu"])


def test_var_sample_refuses_compile_for_a_sampler_without_a_compiled_path(tmp_path):
    with pytest.raises(REFUSED, match="--compile"):
        sample_main(["--family", "ar", "--random-init", "--sampler", "zipar", "--classes", "1",
                     "--out", str(tmp_path / "g.png"), "--compile"])


def test_var_sample_takes_class_names_and_images_per_class(tmp_path, caplog):
    import logging

    from var.cli.sample import class_labels, main
    assert class_labels(["pink_star", "0"], per_class=2).tolist() == [9, 9, 0, 0]
    with pytest.raises(ConfigError, match="red_disc, orange_square"):
        class_labels(["purple_star"])
    with pytest.raises(ConfigError, match="per-class"):
        class_labels(["1"], per_class=0)
    with caplog.at_level(logging.INFO):
        assert main(["--random-init", "--device", "cpu", "--classes", "red_disc", "teal_hstripes", "--per-class",
                     "2", "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "pngs")]) == 0
    assert "classes [0, 0, 5, 5]" in caplog.text and len(list((tmp_path / "pngs").iterdir())) == 4


def test_var_sample_writes_labels_under_the_grid_tiles(tmp_path):
    from PIL import Image

    from var.cli.sample import class_names, main
    assert class_names(torch.tensor([0, 9]), 10) == ["red_disc", "pink_star"]
    assert class_names(torch.tensor([3]), 1000) == ["3"]
    argv = ["--random-init", "--device", "cpu", "--classes", "0", "1", "2", "--nrow", "3"]
    main([*argv, "--out", str(tmp_path / "plain.png")])
    main([*argv, "--labels", "--out", str(tmp_path / "labelled.png")])
    plain, labelled = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "labelled.png")
    assert labelled.width == plain.width and labelled.height == plain.height + 12  # one caption strip per row
    strip = torch.from_numpy(__import__("numpy").asarray(labelled)[plain.height - 2:])
    assert int(strip.max()) > 200  # light text in the strip
