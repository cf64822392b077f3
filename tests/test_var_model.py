"""VAR transformer: cached scale-by-scale logits equal teacher forcing; the block-causal mask holds."""
import pytest
import torch

from helpers import random_indices, tiny_var_pair
from var.samplers.next_scale import ScaleSampling, sample_scale, scale_input


def cached_logits(model, tok, labels, idx):
    """Scale-by-scale logits with the KV cache, feeding the ground-truth tokens through the sampler's scale step."""
    cond = model.class_condition(labels)
    cache = model.new_kv_cache(len(labels))
    sampling = ScaleSampling.build(len(tok.patch_nums), cfg=0.0, top_k=0, top_p=0.0, temperature=1.0)
    x, f_hat, out = model.first_scale_input(cond), torch.zeros(len(labels), tok.embed_dim, 4, 4), []
    for si in range(len(tok.patch_nums)):
        out.append(model.forward_scale(x, cond, cache))
        _, f_hat, nxt = sample_scale(out[-1], si, tok, f_hat, sampling, forced_Bhw=idx[si])
        if si + 1 < len(tok.patch_nums):
            x = scale_input(model, si + 1, nxt, guided=False)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("shared_aln", [False, True])
@torch.no_grad()
def test_cached_logits_equal_teacher_forcing(shared_aln):
    tok, model = tiny_var_pair(shared_aln=shared_aln)
    labels = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    idx = random_indices(tok, 4)
    tf = model.teacher_forcing_logits(tok, labels, idx)
    assert tf.shape == (4, model.config.seq_len, model.config.vocab_size) and tf.dtype == torch.float32
    assert tf.std() > 0.1
    torch.testing.assert_close(cached_logits(model, tok, labels, idx), tf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1])
@torch.no_grad()
def test_changing_later_scales_leaves_earlier_logits_unchanged(k):
    tok, model = tiny_var_pair()
    labels = torch.tensor([1, 2])
    idx = random_indices(tok, 2, seed=1)
    changed = [i if si <= k else (i + 1) % tok.vocab_size for si, i in enumerate(idx)]
    a = model.teacher_forcing_logits(tok, labels, idx)
    b = model.teacher_forcing_logits(tok, labels, changed)
    # logits of scale s are predicted from the inputs of scales <= s, i.e. tokens of scales < s
    end_k1 = model.begin_ends[k + 1][1]
    torch.testing.assert_close(a[:, :end_k1], b[:, :end_k1], rtol=0, atol=0)
    assert (a[:, end_k1:] - b[:, end_k1:]).abs().max() > 1e-3


def test_mask_and_level_buffers_match_the_schedule():
    _, model = tiny_var_pair()
    levels = model.lvl_1L[0].tolist()
    assert levels == [0] + [1] * 4 + [2] * 9 + [3] * 16
    mask = model.attn_bias_for_masking[0, 0]
    for q in range(len(levels)):
        for kk in (0, len(levels) - 1, q):
            assert (mask[q, kk] == 0) == (levels[kk] <= levels[q])


def test_teacher_forcing_has_no_label_dropout_in_eval_and_is_deterministic():
    tok, model = tiny_var_pair()
    labels, idx = torch.tensor([4, 5]), random_indices(tok, 2)
    with torch.no_grad():
        assert torch.equal(model.teacher_forcing_logits(tok, labels, idx), model.teacher_forcing_logits(tok, labels, idx))


def test_training_forward_backpropagates_through_every_block():
    tok, model = tiny_var_pair()
    model.train()
    labels, idx = torch.tensor([1, 2]), random_indices(tok, 2)
    logits = model(labels, tok.teacher_forcing_input(idx))
    target = torch.cat([i.flatten(1) for i in idx], dim=1)
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), target).backward()
    for block in model.blocks:
        assert block.attn.mat_qkv.weight.grad.abs().sum() > 0 and block.ada_lin[1].weight.grad.abs().sum() > 0
