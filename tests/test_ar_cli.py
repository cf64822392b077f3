"""``var-sample --family ar``: every next-token sampler runs offline; checkpoints load from --vq/--gpt."""
import pytest
import torch

from var import hub
from var.cli.sample import main as sample_main
from var.errors import ConfigError
from var.models import create


@pytest.mark.parametrize("sampler, flags", [
    ("next_token", []), ("sjd", ["--window", "4"]), ("mcsjd", ["--window", "4", "--coupling", "gumbel"]),
    ("lantern", ["--window", "4", "--lantern-k", "8"]), ("gsd", ["--gsd-group", "3"]),
    ("zipar", ["--zipar-window", "2"]), ("nar", []), ("coarse_to_fine", ["--no-constrained"]),
])
def test_cli_next_token_family_samplers_run_on_random_weights(tmp_path, sampler, flags):
    out = tmp_path / "grid.png"
    rc = sample_main(["--random-init", "--sampler", sampler, "--classes", "1", "2", "--cfg-scale", "1.5", *flags,
                      "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 0


def test_cli_ar_loads_saved_directories(tmp_path):
    torch.manual_seed(0)
    hub.save_pretrained(create("vq_tiny"), tmp_path / "ar" / "tokenizer")
    hub.save_pretrained(create("gpt_tiny"), tmp_path / "ar" / "transformer")
    rc = sample_main(["--family", "ar", "--vq", str(tmp_path / "ar" / "tokenizer"), "--gpt",
                      str(tmp_path / "ar" / "transformer"), "--sampler", "mcsjd", "--coupling", "gumbel",
                      "--num-images", "3", "--batch-size", "2", "--out", str(tmp_path / "g.png"),
                      "--out-dir", str(tmp_path / "pngs")])
    assert rc == 0 and len(list((tmp_path / "pngs").iterdir())) == 3


def test_cli_rejects_mixed_family_flags(tmp_path):
    with pytest.raises(ConfigError, match="sjd is a next_token sampler"):
        sample_main(["--family", "var", "--sampler", "sjd", "--out", str(tmp_path / "g.png")])
    with pytest.raises(ConfigError, match="--gpt"):
        sample_main(["--family", "ar", "--vq", "x", "--out", str(tmp_path / "g.png")])
    with pytest.raises(ConfigError, match="--vq is not used by sampler next_scale"):
        sample_main(["--vq", "x", "--out", str(tmp_path / "g.png")])
    with pytest.raises(ConfigError, match="--cfg-scale is not a setting of sampler next_scale"):
        sample_main(["--random-init", "--cfg-scale", "2", "--out", str(tmp_path / "g.png")])


def test_cli_cfg_is_a_deprecated_alias_of_cfg_scale_for_next_token_samplers(tmp_path, caplog):
    run = ["--random-init", "--sampler", "next_token", "--classes", "1", "--out-dir"]
    sample_main([*run, str(tmp_path / "new"), "--cfg-scale", "3", "--out", str(tmp_path / "a.png")])
    sample_main([*run, str(tmp_path / "old"), "--cfg", "3", "--out", str(tmp_path / "b.png")])
    assert "deprecated" in caplog.text
    assert (tmp_path / "new" / "000000.png").read_bytes() == (tmp_path / "old" / "000000.png").read_bytes()
    with pytest.raises(ConfigError, match="--cfg-scale only"):
        sample_main([*run, str(tmp_path / "x"), "--cfg", "3", "--cfg-scale", "3"])


def test_cli_refuses_a_model_the_sampler_cannot_drive(tmp_path):
    torch.manual_seed(0)
    hub.save_pretrained(create("vq_tiny"), tmp_path / "vq")
    hub.save_pretrained(create("gpt_tiny"), tmp_path / "gpt")
    with pytest.raises(ConfigError, match="sampler nar drives a NAR as model, got GPT"):
        sample_main(["--sampler", "nar", "--vq", str(tmp_path / "vq"), "--gpt", str(tmp_path / "gpt"),
                     "--out", str(tmp_path / "g.png")])
