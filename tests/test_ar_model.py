"""Next-token stack: LlamaGen key layout, cached vs teacher-forced logits, KV rollback, VQ contract, loading."""
import argparse

import pytest
import torch

from var import hub
from var.errors import CheckpointMismatchError, ClassIdError, ConfigError, ImageSizeError
from var.hub.llamagen import gpt_config_from_state_dict, read_llamagen_state_dict, vq_config_from_state_dict
from var.models import GPT, create
from var.models.gpt import rope_2d_table
from var.samplers.next_token import sample_next_token
from var.tokenizers import SingleScaleVQ


def tiny_gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = create("gpt_tiny", **overrides).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # LlamaGen zero-inits the head: make logits matter
    return model


# ---- released key specifications (from the research notes, built independently of the model code) ------------
def gpt_b_spec() -> dict:
    d, V = 768, 16384
    spec = {"cls_embedding.embedding_table.weight": (1001, d), "tok_embeddings.weight": (V, d),
            "norm.weight": (d,), "output.weight": (V, d)}
    for i in range(12):
        p = f"layers.{i}."
        spec.update({p + "attention.wqkv.weight": (3 * d, d), p + "attention.wo.weight": (d, d),
                     p + "feed_forward.w1.weight": (2048, d), p + "feed_forward.w3.weight": (2048, d),
                     p + "feed_forward.w2.weight": (d, 2048), p + "attention_norm.weight": (d,),
                     p + "ffn_norm.weight": (d,)})
    return spec


def _conv(spec, name, cout, cin, k):
    spec[name + ".weight"], spec[name + ".bias"] = (cout, cin, k, k), (cout,)


def _norm(spec, name, c):
    spec[name + ".weight"], spec[name + ".bias"] = (c,), (c,)


def _res(spec, name, cin, cout):
    _norm(spec, name + ".norm1", cin)
    _conv(spec, name + ".conv1", cout, cin, 3)
    _norm(spec, name + ".norm2", cout)
    _conv(spec, name + ".conv2", cout, cout, 3)
    if cin != cout:
        _conv(spec, name + ".nin_shortcut", cout, cin, 1)


def _attn(spec, name, c):
    _norm(spec, name + ".norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(spec, f"{name}.{n}", c, c, 1)


def vq_ds16_spec() -> dict:
    """vq_ds16_c2i: ch 128, mult (1,1,2,2,4), 2 res/level (decoder 3), attn at the lowest level + mid."""
    spec, ch, mult = {}, 128, (1, 1, 2, 2, 4)
    _conv(spec, "encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(2):
            _res(spec, f"encoder.conv_blocks.{i}.res.{j}", cin, ch * m)
            cin = ch * m
            if i == 4:
                _attn(spec, f"encoder.conv_blocks.{i}.attn.{j}", cin)
        if i < 4:
            _conv(spec, f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3)
    _res(spec, "encoder.mid.0", 512, 512)
    _attn(spec, "encoder.mid.1", 512)
    _res(spec, "encoder.mid.2", 512, 512)
    _norm(spec, "encoder.norm_out", 512)
    _conv(spec, "encoder.conv_out", 256, 512, 3)
    _conv(spec, "quant_conv", 8, 256, 1)
    spec["quantize.embedding.weight"], spec["quantize.codebook_used"] = (16384, 8), (65536,)
    _conv(spec, "post_quant_conv", 256, 8, 1)
    _conv(spec, "decoder.conv_in", 512, 256, 3)
    _res(spec, "decoder.mid.0", 512, 512)
    _attn(spec, "decoder.mid.1", 512)
    _res(spec, "decoder.mid.2", 512, 512)
    cin = 512
    for i, cout in enumerate((512, 256, 256, 128, 128)):
        for j in range(3):
            _res(spec, f"decoder.conv_blocks.{i}.res.{j}", cin, cout)
            cin = cout
            if i == 0:
                _attn(spec, f"decoder.conv_blocks.{i}.attn.{j}", cin)
        if i < 4:
            _conv(spec, f"decoder.conv_blocks.{i}.upsample.conv", cin, cin, 3)
    _norm(spec, "decoder.norm_out", 128)
    _conv(spec, "decoder.conv_out", 3, 128, 3)
    return spec


def _meta(spec):
    return {k: torch.empty(shape, device="meta") for k, shape in spec.items()}


def test_released_gpt_b_keys_load_strictly():
    sd = _meta(gpt_b_spec())
    config = gpt_config_from_state_dict(sd)
    assert (config.n_layer, config.n_head, config.dim, config.ffn_hidden) == (12, 12, 768, 2048)
    model = hub.load_strict(hub.build_on_meta(GPT, config), sd, "GPT-B")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(111e6, rel=0.01)


def test_released_vq_keys_load_strictly():
    sd = _meta(vq_ds16_spec())
    config = vq_config_from_state_dict(sd)
    assert config.ch_mult == (1, 1, 2, 2, 4) and config.codebook_size == 16384
    vq = hub.load_strict(hub.build_on_meta(SingleScaleVQ, config), sd, "vq_ds16")
    assert vq.downsample == 16 and sum(p.numel() for p in vq.parameters()) == pytest.approx(72e6, rel=0.01)


def test_wrong_file_is_named():
    sd = _meta(gpt_b_spec())
    with pytest.raises(CheckpointMismatchError):
        vq_config_from_state_dict(sd)
    del sd["layers.3.ffn_norm.weight"]
    with pytest.raises(CheckpointMismatchError, match="layers.3.ffn_norm.weight"):
        hub.load_strict(hub.build_on_meta(GPT, gpt_config_from_state_dict(sd)), sd, "GPT-B")


def test_llamagen_pickles_and_directories_load(tmp_path):
    gpt, vq = tiny_gpt(), create("vq_tiny").eval()
    args = argparse.Namespace(gpt_model="GPT-tiny", image_size=16)
    torch.save({"model": gpt.state_dict(), "args": args, "steps": 3}, tmp_path / "gpt.pt")
    torch.save({"model": {**vq.state_dict()}, "args": args}, tmp_path / "vq.pt")
    assert set(read_llamagen_state_dict(tmp_path / "gpt.pt")) == set(gpt.state_dict())
    vq2, gpt2 = hub.load_llamagen(tmp_path / "vq.pt", tmp_path / "gpt.pt", image_size=16, n_head=4, norm_groups=8)
    assert gpt2.config.grid_size == 4 and gpt2.config.ffn_hidden == gpt.config.ffn_hidden
    assert vq2.config.norm_groups == vq.config.norm_groups
    labels, idx = torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gpt2.teacher_forcing_logits(labels, idx), gpt.teacher_forcing_logits(labels, idx))
    hub.save_pretrained(gpt, tmp_path / "bundle" / "transformer")
    hub.save_pretrained(vq, tmp_path / "bundle" / "tokenizer")
    vq3, gpt3 = hub.load_llamagen(tmp_path / "bundle" / "tokenizer", tmp_path / "bundle" / "transformer")
    torch.testing.assert_close(gpt3.teacher_forcing_logits(labels, idx), gpt.teacher_forcing_logits(labels, idx))
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(vq3.encode(images)[0], vq.encode(images)[0])


def test_rope_prefix_is_zeroed_like_llamagen():
    table = rope_2d_table(grid_size=3, head_dim=8, base=10000.0, prefix_len=1)
    assert table.shape == (10, 4, 2) and torch.all(table[0] == 0)
    # token (row 1, col 2): pairs 0-1 rotate with the row, pairs 2-3 with the column; f = (1, 1e-2)
    expected = torch.tensor([1.0, 1e-2, 2.0, 2e-2])
    torch.testing.assert_close(table[1 + 1 * 3 + 2, :, 0], expected.cos())
    torch.testing.assert_close(table[1 + 1 * 3 + 2, :, 1], expected.sin())


def test_cached_logits_equal_teacher_forcing():
    model = tiny_gpt()
    labels, idx = torch.tensor([3, 10]), torch.randint(0, 64, (2, 16))
    ref = model.teacher_forcing_logits(labels, idx)
    cache = model.new_kv_cache(2)
    step = [model.prefill(labels, cache)]
    for i in range(15):
        step.append(model.decode(idx[:, i:i + 1], cache))
    torch.testing.assert_close(torch.cat(step, 1), ref, rtol=1e-5, atol=1e-5)
    # multi-token windows, and a rejected window rolled back with truncate
    cache = model.new_kv_cache(2)
    out = [model.prefill(labels, cache), model.decode(idx[:, 0:5], cache)]
    model.decode(torch.randint(0, 64, (2, 6)), cache)
    cache.truncate(6)
    out.append(model.decode(idx[:, 5:15], cache))
    torch.testing.assert_close(torch.cat(out, 1), ref, rtol=1e-5, atol=1e-5)


def test_per_row_positions_and_masks_match():
    """Rows at different sequence positions in one call (what per-sample speculative acceptance needs)."""
    model = tiny_gpt(1)
    labels, idx = torch.tensor([0, 1]), torch.randint(0, 64, (2, 16))
    ref = model.teacher_forcing_logits(labels, idx)
    cache = model.new_kv_cache(2, capacity=12)
    model.prefill(labels, cache)
    model.decode(idx[:, :7], cache)  # row 0 keeps 7 inputs, row 1 only 4 (slots 5..7 are garbage for it)
    n = torch.tensor([8, 5])
    pos = n[:, None] + torch.arange(3)  # absolute positions of the 3 new inputs per row
    slots = torch.arange(11)
    mask = (slots[None, None] < n[:, None, None]) | (
        (slots[None, None] >= 8) & (slots[None, None] - 8 <= torch.arange(3)[None, :, None]))
    new = torch.stack((idx[0, 7:10], idx[1, 4:7]))
    logits = model.decode(new, cache, positions=pos, attn_mask=mask[:, None])
    torch.testing.assert_close(logits[0], ref[0, 8:11], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], ref[1, 5:8], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_named_errors():
    model = tiny_gpt()
    with pytest.raises(ClassIdError):
        model.teacher_forcing_logits(torch.tensor([11]), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError):
        model.teacher_forcing_logits(torch.tensor([1]), torch.full((1, 4), 64))
    with pytest.raises(ImageSizeError):
        create("vq_tiny").encode(torch.zeros(1, 3, 10, 16))


def test_vq_contract_and_training_pass():
    vq = create("vq_tiny")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = vq.encode(images)
    assert len(idx) == 1 and idx[0].shape == (2, 4, 4) and idx[0].dtype == torch.long
    out = vq.decode(idx)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(vq.decode([idx[0].flatten(1)]), out)
    codes = vq.quantize.codebook()
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(64))  # L2-normalised codebook
    vq.train()
    recon, loss, usage = vq(images)
    (recon.square().mean() + loss).backward()
    assert recon.shape == images.shape and usage.shape == (1, 64) and usage.sum() == 32
    assert vq.encoder.conv_in.weight.grad is not None and vq.quantize.embedding.weight.grad is not None


def test_next_token_sampler_shapes_and_per_sample_generators():
    model, vq = tiny_gpt(), create("vq_tiny").eval()
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    out = sample_next_token(model, vq, [1, 2], cfg_scale=3.0, top_k=20, generator=gens)
    assert out.tokens.shape == (2, 16) and out.images.shape == (2, 3, 16, 16)
    assert 0 <= out.images.min() and out.images.max() <= 1
    assert out.stats.forward_passes == 16 and out.stats.tokens_per_pass == 1.0
    single = sample_next_token(model, None, [2], cfg_scale=3.0, top_k=20, generator=[torch.Generator().manual_seed(6)])
    assert torch.equal(single.tokens[0], out.tokens[1])
    with pytest.raises(ConfigError, match="cfg_scale"):
        sample_next_token(model, vq, [1], cfg_scale=0.5)


@pytest.mark.parametrize("name", ["next_token", "sjd", "mcsjd", "lantern", "gsd", "zipar", "nar", "coarse_to_fine"])
def test_next_token_samplers_take_cfg_scale_and_still_accept_cfg_with_a_warning(name):
    import warnings

    import var.samplers as samplers
    if name == "nar":
        models = (create("nar_tiny").eval(),)
    elif name == "coarse_to_fine":
        models = (create("ctf_stage1_tiny").eval(), create("ctf_stage2_tiny").eval())
    else:
        models = (tiny_gpt(),)
    fn = getattr(samplers, f"sample_{name}")
    tokenizer = create("vq_tiny").eval() if name == "lantern" else None  # LANTERN's neighbours come from the codes
    new = fn(*models, tokenizer, [1, 2], cfg_scale=3.0, top_k=5, generator=torch.Generator().manual_seed(0),
             decode=False)
    with pytest.warns(DeprecationWarning, match="cfg_scale"):
        old = fn(*models, tokenizer, [1, 2], cfg=3.0, top_k=5, generator=torch.Generator().manual_seed(0),
                 decode=False)
    assert torch.equal(new.tokens, old.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name itself never warns
        fn(*models, tokenizer, [1], cfg_scale=1.0, generator=torch.Generator().manual_seed(0), decode=False)
