"""The decoder's padding mode and the decoder-only fine-tune (var.train.decoder_finetune): tokens never change."""
import pytest
import torch

from var.errors import ConfigError
from var.hub import load_var_tokenizer, save_pretrained
from var.tokenizers.multiscale_vqvae import MultiScaleVQVAE, MultiScaleVQVAEConfig
from var.train.data import ProceduralShapes
from var.train.decoder_finetune import finetune_decoder, main, with_decoder_padding

TINY = dict(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, using_sa=False,
            using_mid_sa=False, patch_nums=(1, 2, 4))  # 8 px images


def _tiny(**kw):
    torch.manual_seed(0)
    return MultiScaleVQVAE(MultiScaleVQVAEConfig(**TINY, **kw)).eval()


def _modes(module):
    return {m.padding_mode for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.padding == (1, 1)}


def test_decoder_padding_mode_config():
    assert MultiScaleVQVAEConfig().decoder_padding_mode == "zeros"  # the released VAR
    tok = _tiny(decoder_padding_mode="replicate")
    assert _modes(tok.decoder) == {"replicate"} and _modes(tok.post_quant_conv) == {"replicate"}
    assert _modes(tok.encoder) == {"zeros"} and _modes(tok.quantize) == {"zeros"} and _modes(tok.quant_conv) == {"zeros"}
    assert tok.state_dict().keys() == _tiny().state_dict().keys()
    with pytest.raises(ConfigError, match="decoder_padding_mode"):
        MultiScaleVQVAEConfig(decoder_padding_mode="circularish")


def test_with_decoder_padding_keeps_weights_and_tokens():
    tok = _tiny()
    x, _ = ProceduralShapes(6, image_size=8, seed=1).tensors()
    new = with_decoder_padding(tok, "replicate")
    assert new.config.decoder_padding_mode == "replicate" and tok.config.decoder_padding_mode == "zeros"
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), new.state_dict().values()))
    idx = tok.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(idx, new.encode(x)))
    assert not torch.allclose(tok.decode(idx), new.decode(idx))  # the borders are padded differently
    with pytest.raises(ConfigError):
        with_decoder_padding(tok, "wrap")


def test_finetune_trains_only_the_decoder_and_lowers_its_error():
    tok = with_decoder_padding(_tiny(), "replicate")
    data = ProceduralShapes(64, image_size=8, seed=0)
    x, _ = ProceduralShapes(16, image_size=8, seed=1).tensors()
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    idx = tok.encode(x)
    err0 = (tok.decode(idx) - x).abs().mean()
    finetune_decoder(tok, data, steps=40, batch_size=16, lr=3e-3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(idx, tok.encode(x)))
    after = tok.state_dict()
    frozen = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # encoder, codebook, phi
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    assert not torch.equal(after["post_quant_conv.weight"], before["post_quant_conv.weight"])
    assert (tok.decode(idx) - x).abs().mean() < 0.8 * err0
    assert not any(p.requires_grad for p in tok.parameters())
    with pytest.raises(ConfigError):
        finetune_decoder(tok, data, steps=0)


def test_module_command_line(tmp_path):
    save_pretrained(_tiny(), tmp_path / "tok")
    assert main(["--tokenizer", str(tmp_path / "tok"), "--export-dir", str(tmp_path / "out"), "--steps", "2",
                 "--batch-size", "4", "--num-images", "16", "--decoder-padding-mode", "replicate"]) == 0
    tok = load_var_tokenizer(tmp_path / "out")
    assert tok.config.decoder_padding_mode == "replicate" and _modes(tok.decoder) == {"replicate"}
