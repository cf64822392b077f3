"""The released VAR / VQ-VAE key sets (from the research notes, printed from the original modules) load strictly."""
from pathlib import Path

import pytest
import torch

from var import hub
from var.errors import CheckpointMismatchError
from var.models import create
from var.tokenizers import VAR_PATCH_NUMS_256, VAR_PATCH_NUMS_512

DATA = Path(__file__).parent / "data"


def spec_state_dict(filename: str, patch_nums) -> dict:
    """Meta tensors with the released keys/shapes; ``lvl_1L`` holds real values (config inference reads it)."""
    sd = {}
    for line in (DATA / filename).read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        sd[key] = torch.empty(eval(shape), dtype=getattr(torch, dtype.split(".")[1]), device="meta")
    if "lvl_1L" in sd:
        sd["lvl_1L"] = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)]).view(1, -1)
    return sd


def meta_model(name: str, **overrides):
    with torch.device("meta"):
        return create(name, **overrides)


def test_var_d16_released_keys_load_strictly():
    sd = spec_state_dict("var_keys_d16.txt", VAR_PATCH_NUMS_256)
    assert len(sd) == 220
    config = hub.var_config_from_state_dict(sd)
    assert (config.depth, config.width, config.num_heads, config.vocab_size, config.num_classes) == (
        16, 1024, 16, 4096, 1000)
    assert config.patch_nums == VAR_PATCH_NUMS_256 and not config.shared_aln
    hub.load_strict(meta_model("var_d16"), sd, "VAR-d16")


def test_var_d36_shared_adaln_released_keys_load_strictly():
    sd = spec_state_dict("var_keys_d36_saln.txt", VAR_PATCH_NUMS_512)
    config = hub.var_config_from_state_dict(sd)
    assert config.depth == 36 and config.shared_aln and config.patch_nums == VAR_PATCH_NUMS_512
    hub.load_strict(meta_model("var_d36"), sd, "VAR-d36-s")


def test_released_vqvae_keys_load_strictly():
    sd = spec_state_dict("vae_ch160v4096z32_keys.txt", VAR_PATCH_NUMS_256)
    assert len(sd) == 324
    config = hub.vqvae_config_from_state_dict(sd)
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.vocab_size, config.z_channels,
            config.share_quant_resi) == (160, (1, 1, 2, 2, 4), 2, 4096, 32, 4)
    hub.load_strict(meta_model("msvq_var"), sd, "VQ-VAE")


def test_d16_file_into_d20_model_names_shape_mismatches():
    sd = spec_state_dict("var_keys_d16.txt", VAR_PATCH_NUMS_256)
    with pytest.raises(CheckpointMismatchError) as err:
        hub.load_strict(meta_model("var_d20"), sd, "VAR-d20")
    assert "missing keys" in str(err.value) and "blocks.16." in str(err.value)
    assert "pos_1LC: checkpoint (1, 680, 1024) vs model (1, 680, 1280)" in str(err.value)


def test_tokenizer_file_given_as_transformer_is_rejected():
    sd = spec_state_dict("vae_ch160v4096z32_keys.txt", VAR_PATCH_NUMS_256)
    with pytest.raises(CheckpointMismatchError, match="pos_1LC"):
        hub.var_config_from_state_dict(sd)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        hub.load_strict(meta_model("var_d16"), sd, "VAR-d16")
