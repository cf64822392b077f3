"""Infinity transformer: cached == teacher-forced, block causality, text masking, RoPE, released keys."""
import pytest
import torch

from infinity_helpers import TINY_SCHEDULE, random_text, spec_state_dict, tiny_infinity, tiny_vae
from var import hub
from var.hub import infinity as hub_infinity
from var.errors import CheckpointMismatchError, ConfigError
from var.models.infinity import Infinity
from var.models.infinity_layers import rope_angles
from var.tokenizers.scale_schedules import dynamic_schedule
from var.utils.scales import ScaleSchedule


def _inputs(batch=2, seed=0):
    vae = tiny_vae()
    g = torch.Generator().manual_seed(seed)
    bits = [torch.randint(0, 2, (batch, h, w, 6), generator=g) for h, w in TINY_SCHEDULE.grids]
    return vae, bits, vae.teacher_forcing_input(bits, TINY_SCHEDULE)


@torch.no_grad()
def test_cached_logits_equal_teacher_forced():
    model = tiny_infinity()
    vae, bits, x = _inputs()
    text = model.encode_text(*random_text())
    full = model(text, x, TINY_SCHEDULE)
    assert full.shape == (2, TINY_SCHEDULE.seq_len, 12)
    cache = model.new_kv_cache(2, TINY_SCHEDULE)
    inp = model.first_scale_input(text)
    summed = None
    for si, hw in enumerate(TINY_SCHEDULE.grids):
        logits = model.logits(model.forward_scale(inp, text, si, TINY_SCHEDULE, cache), text.cond_BD)
        b, e = TINY_SCHEDULE.begin_ends[si]
        torch.testing.assert_close(logits, full[:, b:e], rtol=1e-4, atol=1e-4)
        if si + 1 < TINY_SCHEDULE.num_scales:
            summed = vae.add_scale(summed, bits[si], TINY_SCHEDULE.grids[-1])
            inp = model.scale_input(vae.scale_input(summed, TINY_SCHEDULE.grids[si + 1]))
    assert cache.length == TINY_SCHEDULE.seq_len
    with pytest.raises(ConfigError):  # a scale out of order
        model.forward_scale(inp, text, 1, TINY_SCHEDULE, cache)


@torch.no_grad()
def test_block_causal_and_text_padding():
    model = tiny_infinity()
    _, _, x = _inputs()
    feats, mask = random_text()
    text = model.encode_text(feats, mask)
    ref = model(text, x, TINY_SCHEDULE)
    b2, _ = TINY_SCHEDULE.begin_ends[2]
    x2 = x.clone()
    x2[:, b2 - 1:] += 1.0  # inputs of scales >= 2 (x has no start token: position p is x[p - 1])
    out = model(text, x2, TINY_SCHEDULE)
    torch.testing.assert_close(out[:, :b2], ref[:, :b2])
    assert not torch.allclose(out[:, b2:], ref[:, b2:])
    noisy = feats + torch.randn_like(feats) * (~mask)[..., None]  # only padding rows change
    torch.testing.assert_close(model(model.encode_text(noisy, mask), x, TINY_SCHEDULE), ref)
    other = model(model.encode_text(feats.flip(0), mask.flip(0)), x, TINY_SCHEDULE)
    assert not torch.allclose(other, ref)
    with pytest.raises(ConfigError):
        model.encode_text(feats[..., :8], mask)


@torch.no_grad()
def test_cfg_mix_of_identical_halves_is_identity():
    model = tiny_infinity()
    feats, mask = random_text(batch=1)
    text = model.encode_text(feats.repeat(2, 1, 1), mask.repeat(2, 1))
    x = model.first_scale_input(text)
    plain = model.forward_scale(x, text, 0, TINY_SCHEDULE, model.new_kv_cache(2, TINY_SCHEDULE))
    mixed = model.forward_scale(x, text, 0, TINY_SCHEDULE, model.new_kv_cache(2, TINY_SCHEDULE), cfg_mix=(0, 3.0))
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-5)


def test_uncond_features_use_each_prompt_length():
    model = tiny_infinity()
    un = model.uncond_features(torch.tensor([3, 1]), 4)
    assert un.shape == (2, 4, 16)
    torch.testing.assert_close(un[0, :3], model.cfg_uncond[:3])
    assert torch.all(un[0, 3:] == 0) and torch.all(un[1, 1:] == 0)


def test_rope_positions_on_the_1m_grid():
    s = dynamic_schedule(1.0, "0.25M")  # final 32 x 32 placed on the 64 x 64 grid: even positions
    ang = rope_angles(s, head_dim=8)
    b, e = s.begin_ends[-1]
    last = ang[b:e].view(32, 32, 4)
    inv0 = 1.0  # first frequency of each half
    torch.testing.assert_close(last[:, 0, 0], torch.arange(0, 64, 2).float() * inv0)
    torch.testing.assert_close(last[0, :, 2], torch.arange(0, 64, 2).float() * inv0)
    assert ang.shape == (s.seq_len, 4)
    torch.testing.assert_close(rope_angles(ScaleSchedule(((1, 1), (2, 2))), 8)[1:, 0], torch.tensor([0., 0., 1., 1.]))


@pytest.mark.parametrize("name,expect", [
    ("infinity_2b.txt", dict(depth=32, width=2048, num_heads=16, codebook_dim=32, pool_heads=16, block_chunks=8)),
    ("infinity_8b.txt", dict(depth=40, width=3584, num_heads=28, codebook_dim=56, pool_heads=16, block_chunks=8)),
])
def test_released_transformer_keys_load_strictly(name, expect):
    released = spec_state_dict(name)
    sd, chunks = hub_infinity.convert_infinity_state_dict(released)
    config = hub_infinity.infinity_config_from_state_dict(sd, chunks)
    assert {k: getattr(config, k) for k in expect} == expect
    assert (config.text_channels, config.text_maxlen, config.num_levels, config.ffn_hidden) == (
        2048, 512, 15, 4 * config.width)
    with torch.device("meta"):
        model = Infinity(config)
    hub_infinity.load_strict(model, sd, name)
    extra = dict(sd, **{"blocks.0.sa.extra": torch.empty(1, device="meta")})
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        hub_infinity.load_strict(model, extra, name)
    del extra["blocks.0.sa.extra"], extra["head.bias"]
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        hub_infinity.load_strict(model, extra, name)


def test_wrong_files_are_named(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="Infinity transformer"):
        hub_infinity.infinity_config_from_state_dict(spec_state_dict("vae_d32.txt"))
    model = tiny_infinity()
    sd = {k.replace("blocks.", "block_chunks.0.module."): v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "inf.pth")
    loaded = hub_infinity.load_infinity_transformer(tmp_path / "inf.pth")
    assert loaded.config.depth == 2 and loaded.config.block_chunks == 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointMismatchError):
        hub_infinity.load_bsq_vae(tmp_path / "inf.pth")


def test_released_key_sets_are_told_apart():
    """check_file_kind on the released key specs: each file is accepted as its own kind and named as what it is
    when given as another."""
    from pathlib import Path

    from var.hub.io import FILE_KINDS, check_file_kind
    def keys(name):  # the VAR key dumps: "key<TAB>shape<TAB>dtype" per line
        return {line.split()[0]: None for line in (Path(__file__).parent / "data" / name).read_text().splitlines()
                if line.strip()}
    specs = {"an Infinity transformer": spec_state_dict("infinity_2b.txt"),
             "an Infinity BSQ VAE": spec_state_dict("vae_d32.txt"),
             "a VAR transformer": keys("var_keys_d16.txt"), "VAR's multi-scale VQ-VAE": keys("vae_ch160v4096z32_keys.txt")}
    assert set(specs) == set(FILE_KINDS)
    for kind, sd in specs.items():
        for want in FILE_KINDS:
            if want == kind:
                check_file_kind(sd, want, "f.pth")
            else:
                with pytest.raises(CheckpointMismatchError, match=f"{want}: f.pth is {kind} file"):
                    check_file_kind(sd, want, "f.pth")


def test_save_pretrained_round_trip(tmp_path):
    model, vae = tiny_infinity(), tiny_vae()
    hub.save_pretrained(model, tmp_path / "m")
    hub.save_pretrained(vae, tmp_path / "v")
    vae2, model2 = hub_infinity.load_infinity(tmp_path / "v", tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(vae2.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(CheckpointMismatchError):
        hub_infinity.load_infinity(tmp_path / "m", tmp_path / "v")
