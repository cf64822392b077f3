"""Multi-scale residual quantizer: schedule, phi selection, f_hat accumulation and encode/decode contracts."""
import pytest
import torch

from var.errors import ImageSizeError
from var.models import create
from var.tokenizers.multiscale_quantizer import MultiScaleQuantizer


def test_phi_index_map_of_the_released_schedule():
    q = MultiScaleQuantizer(16, 4, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), share_quant_resi=4)
    assert [q.quant_resi.index_for(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def _data_codebook_tokenizer():
    """Tiny tokenizer whose codebook is spread over the latent distribution (as after training)."""
    tok = create("msvq_tiny", vocab_size=256).eval()
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        f = tok.encode_latent(images)
        rows = f.permute(0, 2, 3, 1).reshape(-1, tok.embed_dim)
        scales = torch.rand(256, 1) * 1.5  # residuals shrink scale by scale: codes at several magnitudes
        tok.quantize.embedding.weight.copy_(rows[torch.randperm(len(rows))[:256]] * scales)
    return tok, images[:8]


def test_fhat_error_decreases_scale_by_scale():
    tok, images = _data_codebook_tokenizer()
    with torch.no_grad():
        f = tok.encode_latent(images)
        partial = tok.quantize.indices_to_fhat(tok.encode(images), cumulative=True)
    errors = [(f - f_hat).pow(2).mean().item() for f_hat in partial]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0]


def test_encode_shapes_and_decode_is_deterministic_and_in_range():
    tok, images = _data_codebook_tokenizer()
    idx = tok.encode(images)
    assert [tuple(i.shape) for i in idx] == [(8, pn, pn) for pn in tok.patch_nums]
    assert all(i.dtype == torch.long and 0 <= i.min() and i.max() < tok.vocab_size for i in idx)
    rec1, rec2 = tok.decode(idx), tok.decode([i.clone() for i in idx])
    assert rec1.shape == images.shape and torch.equal(rec1, rec2)
    assert rec1.min() >= -1 and rec1.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(idx, tok.encode(images)))


@torch.no_grad()
def test_decode_equals_decoding_the_accumulated_latent_and_next_scale_recurrence():
    tok, images = _data_codebook_tokenizer()
    idx = tok.encode(images)
    f_hat = torch.zeros(8, tok.embed_dim, 4, 4)
    inputs = []
    for si in range(len(idx)):
        f_hat, nxt = tok.next_scale_input(si, f_hat, tok.embed(idx[si]))
        inputs.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tok.decode(idx), tok.latent_to_image(f_hat), rtol=0, atol=0)
    torch.testing.assert_close(tok.teacher_forcing_input(idx), torch.cat(inputs[:-1], 1), rtol=1e-6, atol=1e-6)


def test_training_forward_has_gradients_and_reports_usage():
    tok, images = _data_codebook_tokenizer()
    tok.train()
    recon, vq_loss, usage = tok(images)
    (recon.pow(2).mean() + vq_loss).backward()
    assert recon.shape == images.shape and vq_loss.item() > 0
    assert usage.shape == (len(tok.patch_nums), tok.vocab_size)
    assert usage.sum(1).tolist() == [8 * pn * pn for pn in tok.patch_nums]
    assert tok.encoder.conv_in.weight.grad is not None and tok.quantize.embedding.weight.grad is not None


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 16, 16), (3, 16, 16)])
def test_wrong_image_size_is_named(shape):
    tok = create("msvq_tiny")
    with pytest.raises(ImageSizeError, match=r"\[B, 3, 16, 16\]"):
        tok.encode(torch.zeros(shape))
