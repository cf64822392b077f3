"""LlamaGen text-to-image GPT: released key sets, caption prefix and padding mask, CFG null caption, feature
files, and every next-token sampler conditioned on captions (SJD / MC-SJD exact, statistically)."""
import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from var import hub
from var.errors import CheckpointMismatchError, ClassIdError, ConfigError
from var.hub.llamagen import gpt_config_from_state_dict, load_llamagen_gpt, vq_config_from_state_dict
from var.models import create
from var.models.conditioning import CaptionCondition
from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
from var.samplers.jacobi import sample_mcsjd, sample_sjd
from var.samplers.neighbor import sample_zipar
from var.samplers.next_token import sample_next_token
from var.samplers.registry import get_sampler

from helpers import chi_square_pvalue, exact_distribution, key_spec, preset_gpt
from test_ar_exactness import ALPHA

DATA = Path(__file__).parent / "data"


def meta(name: str, **overrides):
    with torch.device("meta"):
        return create(name, **overrides)


def tiny_t2i(seed=0, **overrides) -> GPTT2I:
    return preset_gpt("gpt_tiny_t2i", seed, **overrides)


def captions(lengths, dim=16, length=8, seed=0) -> CaptionCondition:
    g = torch.Generator().manual_seed(seed)
    return CaptionCondition.left_padded([torch.randn(n, dim, generator=g) for n in lengths], length)


# ---- released key specifications ------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [16, 32])  # t2i_XL_stage1_256.pt and t2i_XL_stage2_512.pt share one key set
def test_released_t2i_xl_keys_load_strictly(grid):
    sd = key_spec(DATA / "llamagen_t2i_xl_keys.txt")
    assert len(sd) == 258 and tuple(sd["cls_embedding.uncond_embedding"].shape) == (120, 2048)
    config = gpt_config_from_state_dict(sd, grid_size=grid)
    assert isinstance(config, GPTT2IConfig)
    assert (config.dim, config.n_layer, config.n_head, config.vocab_size, config.caption_dim, config.caption_len,
            config.ffn_hidden) == (1280, 36, 20, 16384, 2048, 120, 3584)
    hub.load_strict(meta("gpt_xl_t2i", grid_size=grid), sd, "t2i XL")
    hub.load_strict(hub.build_on_meta(GPTT2I, config), sd, "t2i XL (inferred)")


def test_released_vq_ds16_t2i_keys_load_strictly():
    sd = key_spec(DATA / "llamagen_vq_ds16_t2i_keys.txt")
    assert len(sd) == 344
    config = vq_config_from_state_dict(sd)
    assert (config.codebook_size, config.codebook_embed_dim, config.z_channels, config.ch_mult) == (
        16384, 8, 256, (1, 1, 2, 2, 4))
    hub.load_strict(meta("vq_ds16_t2i"), sd, "vq_ds16_t2i")


def test_c2i_and_t2i_files_are_not_interchangeable():
    t2i = key_spec(DATA / "llamagen_t2i_xl_keys.txt")
    with pytest.raises(CheckpointMismatchError, match="cls_embedding.cap_proj.fc1.weight"):
        hub.load_strict(meta("gpt_xl"), t2i, "c2i XL")
    with pytest.raises(CheckpointMismatchError, match="uncond_embedding"):
        hub.load_strict(meta("gpt_xl_t2i"), {k: v for k, v in t2i.items() if "uncond" not in k}, "t2i XL")


@pytest.mark.parametrize("wrapper", ["model", "module", None])
def test_pt_file_round_trip_dispatches_to_the_t2i_class(tmp_path, wrapper):
    model = tiny_t2i()
    sd = model.state_dict()
    obj = {wrapper: sd, "args": argparse.Namespace(gpt_model="GPT-XL")} if wrapper else sd
    torch.save(obj, tmp_path / "t2i.pt")
    loaded = load_llamagen_gpt(tmp_path / "t2i.pt", grid_size=4, n_head=4)
    assert isinstance(loaded, GPTT2I) and loaded.config.caption_len == 8
    cond, idx = captions([3, 8]), torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(loaded(cond, idx), model(cond, idx))
    hub.save_pretrained(model, tmp_path / "dir")
    again = load_llamagen_gpt(tmp_path / "dir")
    assert isinstance(again, GPTT2I)
    torch.testing.assert_close(again(cond, idx), model(cond, idx))


# ---- caption prefix, padding mask, CFG -------------------------------------------------------------------------
def test_cached_decoding_matches_teacher_forcing_with_mixed_padding():
    model = tiny_t2i()
    cond, idx = captions([1, 5, 8]), torch.randint(0, 64, (3, 16))
    ref = model.teacher_forcing_logits(cond, idx)
    cache = model.new_kv_cache(3)
    step = [model.prefill(cond, cache)[:, -1]] + [model.decode(idx[:, i:i + 1], cache)[:, -1] for i in range(15)]
    torch.testing.assert_close(torch.stack(step, 1), ref, atol=1e-5, rtol=1e-5)
    cache = model.new_kv_cache(3)
    chunked = torch.cat((model.prefill(cond, cache), model.decode(idx[:, :15], cache)), 1)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)


def test_padded_slots_are_invisible_and_rows_independent():
    model = tiny_t2i()
    cond, idx = captions([2, 6]), torch.randint(0, 64, (2, 16))
    ref = model(cond, idx)
    garbage = cond.features_BTC.clone()
    garbage[~cond.mask_BT] = 100.0  # whatever sits at padded rows never reaches the image tokens
    torch.testing.assert_close(model(CaptionCondition(garbage, cond.mask_BT), idx), ref)
    for b in range(2):  # a batch of mixed paddings equals one caption at a time
        one = CaptionCondition(cond.features_BTC[b:b + 1], cond.mask_BT[b:b + 1])
        torch.testing.assert_close(model(one, idx[b:b + 1]), ref[b:b + 1], atol=1e-5, rtol=1e-5)


def test_cfg_rows_are_the_null_caption_with_the_caption_mask():
    model = tiny_t2i()
    cond = captions([3, 7])
    rows = model.condition_rows(cond, guided=True)
    assert len(rows) == 4 and torch.equal(rows.mask_BT, torch.cat((cond.mask_BT, cond.mask_BT)))
    null = model.cls_embedding.uncond_embedding
    assert torch.equal(rows.features_BTC[2], null) and torch.equal(rows.features_BTC[3], null)
    assert model.condition_rows(cond, guided=False) is cond
    dropped = model.drop_captions(cond.cat(cond), torch.Generator().manual_seed(0))
    assert all(torch.equal(f, null) or torch.equal(f, c) for f, c in
               zip(dropped.features_BTC, cond.cat(cond).features_BTC))


def test_left_padding_and_truncation():
    feats = [torch.ones(3, 4), torch.arange(40.).view(10, 4)]
    cond = CaptionCondition.left_padded(feats, 8)
    assert cond.mask_BT.tolist()[0] == [False] * 5 + [True] * 3
    assert cond.features_BTC[0, :5].abs().sum() == 0 and torch.equal(cond.features_BTC[0, 5:], feats[0])
    assert cond.mask_BT[1].all() and torch.equal(cond.features_BTC[1], feats[1][:8])  # first 8 tokens kept


def test_precomputed_feature_files_as_llamagen_writes_them(tmp_path):
    feats = [np.random.rand(1, n, 16).astype(np.float32) for n in (4, 9)]  # extract_t5_feature.py: [1, n, C]
    paths = []
    for i, f in enumerate(feats):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], f)
    cond = CaptionCondition.from_feature_files(paths, 8)
    assert cond.mask_BT.sum(1).tolist() == [4, 8]
    torch.testing.assert_close(cond.features_BTC[0, 4:], torch.from_numpy(feats[0][0]))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="cannot read"):
        CaptionCondition.from_feature_files([tmp_path / "obj.npy"], 8)


def test_prompt_embeddings_duck_type():
    class Emb:  # the text encoder's output: right-padded features and lengths
        features_BNC = torch.randn(2, 5, 16)
        lengths_B = torch.tensor([2, 5])
    cond = CaptionCondition.from_prompt_embeddings(Emb, 8)
    assert cond.mask_BT.sum(1).tolist() == [2, 5]
    torch.testing.assert_close(cond.features_BTC[0, 6:], Emb.features_BNC[0, :2])


def test_wrong_conditions_are_named_errors():
    t2i, c2i = tiny_t2i(), create("gpt_tiny").eval()
    with pytest.raises(ConfigError, match="CaptionCondition"):
        sample_next_token(t2i, None, [1, 2], decode=False)
    with pytest.raises(ClassIdError, match="class ids"):
        sample_next_token(c2i, None, captions([2]), decode=False)
    with pytest.raises(ConfigError, match=r"\[B, 8, 16\]"):
        sample_next_token(t2i, None, captions([2], dim=12), decode=False)
    empty = CaptionCondition(torch.zeros(1, 8, 16), torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ConfigError, match="empty prompt"):
        sample_next_token(t2i, None, empty, decode=False)
    with pytest.raises(ConfigError, match="float features"):
        CaptionCondition(torch.zeros(1, 8, 16), torch.ones(1, 8))


# ---- every next-token sampler with captions ---------------------------------------------------------------------
def test_every_next_token_sampler_runs_on_captions():
    model, vq = tiny_t2i(), create("vq_tiny").eval()
    cond = captions([2, 8])
    for name in ("next_token", "sjd", "mcsjd", "lantern", "gsd", "zipar"):
        knobs = {"k": 8} if name == "lantern" else {}
        out = get_sampler(name)({"model": model, "tokenizer": vq}, cond, cfg_scale=3.0,
                                generator=torch.Generator().manual_seed(0), **knobs)
        assert out.tokens.shape == (2, 16) and out.images.shape == (2, 3, 16, 16), name


def test_greedy_samplers_agree_on_captions():
    model = tiny_t2i(grid_size=5)
    cond = captions([1, 4, 8])
    ref = sample_next_token(model, None, cond, cfg_scale=3.0, top_k=1, decode=False)
    for kwargs in (dict(window=5), dict(window=7, coupling="gumbel", init="repeat_vertical")):
        out = sample_sjd(model, None, cond, cfg_scale=3.0, top_k=1, decode=False, **kwargs)
        assert torch.equal(out.tokens, ref.tokens), kwargs
    out = sample_zipar(model, None, cond, window=5, cfg_scale=3.0, generator=torch.Generator().manual_seed(2),
                       decode=False)  # window = width: plain decoding, same draws
    ref = sample_next_token(model, None, cond, cfg_scale=3.0, generator=torch.Generator().manual_seed(2), decode=False)
    assert torch.equal(out.tokens, ref.tokens)


V, GRID, NUM_SAMPLES = 4, 2, 3000
SETTINGS = dict(cfg_scale=2.0, temperature=1.3, top_k=3)


@pytest.fixture(scope="module")
def exact_model():
    torch.manual_seed(3)
    model = GPTT2I(GPTT2IConfig(dim=32, n_layer=2, n_head=2, multiple_of=16, vocab_size=V, grid_size=GRID,
                                caption_dim=8, caption_len=4))
    torch.nn.init.normal_(model.output.weight, std=0.6)
    torch.nn.init.normal_(model.tok_embeddings.weight, std=1.0)
    torch.nn.init.normal_(model.cls_embedding.cap_proj.fc2.weight, std=0.5)
    return model.eval()


def exact_t2i_distribution(model, cond, **settings):
    """``{sequence: probability}`` for one caption (:func:`helpers.exact_distribution`; null caption: the model's
    learned unconditional embedding under the caption's mask)."""
    def rows(n):
        caption = CaptionCondition(cond.features_BTC.expand(n, -1, -1), cond.mask_BT.expand(n, -1))
        return caption, CaptionCondition(model.cls_embedding.uncond_embedding.expand(n, -1, -1), caption.mask_BT)
    return exact_distribution(model, rows, **settings)


@pytest.mark.parametrize("name, sampler, kwargs", [
    ("next_token", sample_next_token, {}),
    ("sjd", sample_sjd, dict(window=3, init="random")),
    ("mcsjd_maximal", sample_mcsjd, dict(window=3, coupling="maximal")),
    ("mcsjd_gumbel", sample_mcsjd, dict(window=4, coupling="gumbel", init="repeat_vertical")),
])
def test_samplers_exact_with_text_conditioning(exact_model, name, sampler, kwargs):
    """Two captions of different padding share each batch; each half follows its own exact distribution."""
    two = captions([1, 3], dim=8, length=4, seed=5)
    both = CaptionCondition(two.features_BTC.repeat(NUM_SAMPLES // 2, 1, 1), two.mask_BT.repeat(NUM_SAMPLES // 2, 1))
    out = sampler(exact_model, None, both, generator=torch.Generator().manual_seed(11), decode=False, **SETTINGS,
                  **kwargs)
    for b in range(2):
        one = CaptionCondition(two.features_BTC[b:b + 1], two.mask_BT[b:b + 1])
        exact = exact_t2i_distribution(exact_model, one, **SETTINGS)
        p = chi_square_pvalue(out.tokens[b::2], exact)
        assert p > ALPHA, f"{name}, caption {b}: chi-square p = {p:.2e}"
    if name != "next_token":
        assert out.stats.forward_passes < 1 + GRID * GRID


def test_chi_square_tells_the_two_captions_apart(exact_model):
    """Power check: samples of one caption are rejected against the other caption's distribution."""
    two = captions([1, 3], dim=8, length=4, seed=5)
    n = NUM_SAMPLES // 3
    first = CaptionCondition(two.features_BTC[:1].expand(n, -1, -1), two.mask_BT[:1].expand(n, -1))
    out = sample_next_token(exact_model, None, first, generator=torch.Generator().manual_seed(1), decode=False,
                            **SETTINGS)
    other = CaptionCondition(two.features_BTC[1:], two.mask_BT[1:])
    assert chi_square_pvalue(out.tokens, exact_t2i_distribution(exact_model, other, **SETTINGS)) < ALPHA
