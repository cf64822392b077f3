"""Infinity's bitwise multi-scale tokenizer: schedules, BSQ, next-scale inputs, released keys."""
import pytest
import torch

from infinity_helpers import TINY_SCHEDULE, spec_state_dict, tiny_vae
from var.hub import infinity as hub_infinity
from var.errors import AspectRatioError, CheckpointError, CheckpointMismatchError, ConfigError, ImageSizeError
from var.tokenizers.bsq_vae import BSQVAE, bits_to_codes, quantize_bits
from var.tokenizers.scale_schedules import TEMPLATES, dynamic_schedule, nearest_template
from var.utils.scales import ScaleSchedule


def test_schedules_match_the_released_tables():
    s = dynamic_schedule(1.0, "1M")
    assert s.num_scales == 13 and s.grids[-1] == (64, 64) and s.seq_len == 10521 and s.image_size() == (1024, 1024)
    assert [dynamic_schedule(1.0, p).seq_len for p in ("0.06M", "0.25M", "0.60M")] == [521, 2521, 6425]
    small = dynamic_schedule(1.0, "0.25M")
    assert small.grids[-1] == (32, 32) and small.rope_grid == (64, 64)  # RoPE on the 1M grid
    assert len(TEMPLATES) == 15
    wide = dynamic_schedule(0.8, "1M")  # the swapped 1.25 template, keyed int(1/1.25*1000)/1000
    assert wide.grids[-1] == (56, 70) and wide.image_size() == (896, 1120)
    assert nearest_template(1.27) == 1.25 and nearest_template(0.34) == 0.333
    with pytest.raises(AspectRatioError):
        dynamic_schedule(5.0)
    with pytest.raises(AspectRatioError):
        nearest_template(-1)
    with pytest.raises(ConfigError):
        dynamic_schedule(1.0, "2M")
    with pytest.raises(ConfigError):
        ScaleSchedule(((1, 1), (0, 2)))


def test_bsq_bits_and_codes():
    r = torch.randn(2, 6, 3, 5)
    bits, codes = quantize_bits(r)
    assert bits.shape == (2, 3, 5, 6) and bits.dtype == torch.int64
    assert torch.equal(bits, (r > 0).long().permute(0, 2, 3, 1))
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, 6 ** -0.5))
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, 3, 5))
    torch.testing.assert_close(bits_to_codes(bits, 6), codes)


def test_encode_decode_shapes_and_residual_accumulation():
    vae = tiny_vae()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    latent = vae.encode_latent(img)
    assert latent.shape == (2, 6, 4, 4)
    bits_list, summed = vae.quantize(latent, TINY_SCHEDULE)
    assert [tuple(b.shape) for b in bits_list] == [(2, 1, 1, 6), (2, 2, 2, 6), (2, 2, 3, 6), (2, 4, 4, 6)]
    torch.testing.assert_close(vae.latent_from_bits(bits_list, TINY_SCHEDULE), summed)
    out = vae.decode(bits_list, TINY_SCHEDULE)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    # each scale quantises the residual left by the earlier ones
    residual = latent.clone()
    for bits, hw in zip(bits_list, TINY_SCHEDULE.grids):
        r = torch.nn.functional.interpolate(residual, size=hw, mode="area")
        assert torch.equal(bits, (r > 0).long().permute(0, 2, 3, 1))
        residual -= torch.nn.functional.interpolate(bits_to_codes(bits, 6), size=(4, 4), mode="bilinear")
    with pytest.raises(ImageSizeError):
        vae.encode(torch.rand(1, 3, 12, 12), TINY_SCHEDULE)
    with pytest.raises(ImageSizeError):
        vae.encode(torch.rand(1, 3, 32, 32), TINY_SCHEDULE)


def test_a_code_map_is_quantised_exactly():
    vae = tiny_vae()
    bits = torch.randint(0, 2, (2, 4, 4, 6))
    latent = bits_to_codes(bits, 6) * 3.0  # BSQ keeps only the direction
    bits_list, summed = vae.quantize(latent, ScaleSchedule(((4, 4),)))
    assert torch.equal(bits_list[0], bits)
    torch.testing.assert_close(summed, latent / 3.0)


def test_teacher_forcing_input_is_the_stepwise_next_scale_input():
    vae = tiny_vae()
    bits_list = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1, TINY_SCHEDULE)
    x = vae.teacher_forcing_input(bits_list, TINY_SCHEDULE)
    assert x.shape == (2, TINY_SCHEDULE.seq_len - 1, 6)
    summed, pieces = None, []
    for si in range(TINY_SCHEDULE.num_scales - 1):
        summed = vae.add_scale(summed, bits_list[si], TINY_SCHEDULE.grids[-1])
        pieces.append(vae.scale_input(summed, TINY_SCHEDULE.grids[si + 1]))
    torch.testing.assert_close(x, torch.cat(pieces, 1))
    with pytest.raises(ConfigError):
        vae.teacher_forcing_input(bits_list[:2], TINY_SCHEDULE)


@pytest.mark.parametrize("name,d", [("vae_d16.txt", 16), ("vae_d24.txt", 24), ("vae_d32.txt", 32),
                                    ("vae_d64.txt", 64)])
def test_released_vae_keys_load_strictly(name, d):
    """The key specs of the released VAEs; ``infinity_vae_d32reg.pth`` (Infinity-2B's) is built by the same
    ``vae_model(vae_type=32)`` as ``infinity_vae_d32.pth``, so ``vae_d32.txt`` is its spec too."""
    released = spec_state_dict(name)
    released["quantizer.lfq.mask"] = released["quantize.lfq.mask"] = 2 ** torch.arange(d - 1, -1, -1)
    sd = hub_infinity.convert_infinity_vae_state_dict(released)
    assert not any(".conv.conv." in k or ".norm.norm." in k for k in sd)
    config = hub_infinity.bsq_vae_config_from_state_dict(sd)
    assert (config.codebook_dim, config.ch, config.ch_mult, config.num_res_blocks) == (d, 128, (1, 2, 4, 4, 4), 2)
    with torch.device("meta"):
        model = BSQVAE(config)
    hub_infinity.load_strict(model, sd, name)
    # the same file without the wrapper segments (the original's load_cnn accepts both spellings)
    plain = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias").replace(".norm.weight", ".weight")
             .replace(".norm.bias", ".bias"): v for k, v in released.items() if "lfq" not in k}
    plain = {k.replace("downsample.weight", "downsample.conv.weight").replace("downsample.bias", "downsample.conv.bias")
             .replace("upsample.weight", "upsample.conv.weight").replace("upsample.bias", "upsample.conv.bias"): v
             for k, v in plain.items()}
    assert set(hub_infinity.convert_infinity_vae_state_dict(plain)) == set(sd)


def test_vae_bad_files(tmp_path):
    released = spec_state_dict("vae_d16.txt")
    released["quantizer.lfq.mask"] = 2 ** torch.arange(15, -1, -1)
    released["quantize.lfq.mask"] = torch.arange(16)
    with pytest.raises(CheckpointError, match="bit-weight"):
        hub_infinity.convert_infinity_vae_state_dict(released)
    with pytest.raises(CheckpointMismatchError):
        hub_infinity.bsq_vae_config_from_state_dict(spec_state_dict("infinity_2b.txt"))


def test_vae_file_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = BSQVAE(codebook_dim=6, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1).eval()  # widths the original allows
    # a file in the released layout: {"vae": sd} with the wrapper segments and the mask buffers
    wrapped = {}
    for k, v in vae.state_dict().items():
        mod = k.rsplit(".", 2)[-2]
        seg = "conv" if mod in hub_infinity._CONV_WRAPPED else "norm" if mod in hub_infinity._NORM_WRAPPED else None
        wrapped[k.replace(f".{k.rsplit('.', 1)[1]}", f".{seg}.{k.rsplit('.', 1)[1]}") if seg else k] = v
    wrapped["quantizer.lfq.mask"] = 2 ** torch.arange(5, -1, -1)
    torch.save({"vae": wrapped, "ema": {}}, tmp_path / "vae.pth")
    loaded = hub_infinity.load_bsq_vae(tmp_path / "vae.pth", norm_groups=32)  # not stored in a plain file
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(img, TINY_SCHEDULE), vae.encode(img, TINY_SCHEDULE)))
