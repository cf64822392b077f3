"""The released CoDe files (``Zigeng/VAR_CoDe``: ``drafter_<N>.pth`` = VAR-d30, ``refiner_<N>.pth`` = VAR-d16,
plain state dicts of the same VAR class, loaded strictly by the release's ``infer_CoDe.py``) load through the VAR
loader. Synthetic files with the released key sets and shapes (meta tensors: no weights are stored or read)."""
import pytest
import torch

from test_var_checkpoint_keys import spec_state_dict
from var import hub
from var.models import VAR
from var.tokenizers import VAR_PATCH_NUMS_256


@pytest.mark.parametrize("filename, spec, depth", [
    ("drafter_8.pth", "var_keys_d30.txt", 30),
    ("refiner_8.pth", "var_keys_d16.txt", 16),
])
def test_code_release_files_load_through_the_var_loader(tmp_path, filename, spec, depth):
    path = tmp_path / filename
    torch.save(spec_state_dict(spec, VAR_PATCH_NUMS_256), path)
    model = hub.load_var_transformer(path, device="meta", depth=depth)
    assert isinstance(model, VAR) and model.config.depth == depth and model.config.width == 64 * depth
    assert tuple(model.config.patch_nums) == tuple(VAR_PATCH_NUMS_256)
