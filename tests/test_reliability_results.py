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


def test_eval_resume_refuses_a_checkpoint_replaced_under_the_same_path(tmp_path):
    from var.cli.eval import main
    from var.hub import save_pretrained
    tok, model = tiny_var_pair(seed=0)
    save_pretrained(tok, tmp_path / "tok")
    save_pretrained(model, tmp_path / "var")
    args = ["sample", "--vae", str(tmp_path / "tok"), "--var", str(tmp_path / "var"), "--out", str(tmp_path / "s"),
            "--num-images", "2", "--shard-size", "1", "--no-pack", "--device", "cpu"]
    assert main(args) == 0
    (tmp_path / "s" / "shards" / "00001.json").unlink()  # as if killed before the second shard
    save_pretrained(tiny_var_pair(seed=1)[1], tmp_path / "var")  # other weights under the same path
    with pytest.raises(VarError, match="changed|differs"):
        main(args)
