"""``var-sample --family ar``: every next-token sampler runs offline; checkpoints load from --vq/--gpt."""
import pytest
import torch

from var import hub
from var.errors import ConfigError
from var.cli.sample import main as sample_main
from var.models import create


@pytest.mark.parametrize("sampler", ["next_token", "sjd", "mcsjd", "lantern", "gsd", "zipar"])
def test_cli_ar_samplers_run_on_random_weights(tmp_path, sampler):
    out = tmp_path / "grid.png"
    rc = sample_main(["--family", "ar", "--random-init", "--sampler", sampler, "--classes", "1", "2",
                      "--window", "4", "--zipar-window", "2", "--lantern-k", "8", "--out", str(out)])
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
    with pytest.raises(SystemExit):
        sample_main(["--sampler", "sjd", "--out", str(tmp_path / "g.png")])
    with pytest.raises(ConfigError, match="--gpt"):
        sample_main(["--family", "ar", "--vq", "x", "--out", str(tmp_path / "g.png")])
