"""Issue 13, "silent wrong results": each test reproduces one case where bad weights, files or settings used to
give a wrong result with exit status 0 (see docs/reliability.md)."""
import pytest
import torch

from var.errors import VarError
from tests.helpers import tiny_var_pair


def test_nan_decoder_weights_raise_instead_of_black_images():
    from var.errors import NonFiniteImagesError
    from var.samplers import sample_next_scale
    tok, model = tiny_var_pair()
    with torch.no_grad():
        next(tok.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteImagesError, match="non-finite"):
        sample_next_scale(model, tok, torch.tensor([0, 1]), cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert issubclass(NonFiniteImagesError, VarError)


def test_one_inf_codebook_entry_is_caught_in_the_decoded_images():
    from var.errors import NonFiniteImagesError
    from var.samplers.next_token import sample_next_token
    from var.models import create
    torch.manual_seed(0)
    vq, gpt = create("vq_tiny").eval(), create("gpt_tiny").eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteImagesError):
        sample_next_token(gpt, vq, torch.tensor([0]), generator=torch.Generator().manual_seed(0))
