"""Issue 14: one-line loading of the bundled models (no paths) and saving a sampler's output."""
import numpy as np
import pytest
import torch
from PIL import Image

from var import hub
from var.assets import bundled_ar_dir, bundled_var_dir
from var.errors import ConfigError
from var.samplers import sample_next_scale


@pytest.mark.skipif(bundled_var_dir() is None or bundled_ar_dir() is None, reason="bundled models not installed")
def test_no_paths_load_the_bundled_models_like_their_directories():
    tok, model = hub.load_var()
    tok2, model2 = hub.load_var(bundled_var_dir() / "tokenizer", bundled_var_dir() / "transformer")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    vq, gpt = hub.load_llamagen()
    assert gpt.config.grid_size == hub.load_llamagen(bundled_ar_dir() / "tokenizer",
                                                     bundled_ar_dir() / "transformer")[1].config.grid_size
    with pytest.raises(ConfigError, match="give both vae_path and var_path"):
        hub.load_var(bundled_var_dir() / "tokenizer")
    with pytest.raises(ConfigError, match="give both vq_path and gpt_path"):
        hub.load_llamagen(gpt_path=bundled_ar_dir() / "transformer")


def test_sampler_output_saves_a_grid_and_one_png_per_image(tmp_path):
    from var.models import create
    torch.manual_seed(0)
    tok, model = create("msvq_tiny").eval(), create("var_tiny").eval()
    out = sample_next_scale(model, tok, [0, 1, 2], generator=torch.Generator().manual_seed(0))
    grid = out.save(tmp_path / "grid.png", nrow=3)
    assert Image.open(grid).size[0] >= 3 * out.images.shape[-1]
    paths = out.save_images(tmp_path / "pngs")
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    first = torch.from_numpy(np.array(Image.open(paths[0]))).permute(2, 0, 1).float() / 255  # array: a writable copy
    assert (first - out.images[0]).abs().max() <= 1 / 255 + 1e-6  # lossless up to 8-bit rounding
    empty = sample_next_scale(model, tok, [0], generator=torch.Generator().manual_seed(0), decode=False)
    with pytest.raises(ConfigError, match="decode=False"):
        empty.save(tmp_path / "x.png")
