"""CompressedKVCache: same results as KVCache when nothing is dropped, byte accounting, truncate, errors."""
import pytest
import torch

from var.errors import ConfigError
from var.kernels import CompressedKVCache, KVCache
from var.kernels.selection import Selection
from var.kernels.ragged_attention import ragged_attention_reference
from var.utils.scales import ScaleSchedule

SCALES = (1, 2, 3)  # 1 + 4 + 9 = 14 tokens
SCHEDULE = ScaleSchedule(SCALES)


def _scale_inputs(B, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(B, H, pn * pn, D, generator=g) for _ in range(3)) for pn in SCALES]


def _run(cache, inputs, layers=2):
    outs = []
    for q, k, v in inputs:
        outs.append([cache.attend(layer, q, k, v, scale=0.8) for layer in range(layers)])
        cache.advance(q.shape[2])
    return outs


class RandomKeep:
    """A test policy: keep a random subset per head (at least one token) after every scale."""

    tracks_scores = False

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def wants_selection(self, layer, start, n, max_key_len):
        return True

    def select(self, ctx):
        keep = torch.rand(ctx.valid_BHP.shape, generator=self.g) < 0.6
        return Selection(keep & ctx.valid_BHP)


def test_matches_full_cache_exactly_without_policy():
    B, H, D = 2, 3, 16
    inputs = _scale_inputs(B, H, D)
    full = _run(KVCache(2, B, H, 14, D), inputs)
    comp = CompressedKVCache(2, B, H, D, capacity=14, schedule=SCHEDULE, backend="torch")
    ours = _run(comp, inputs)
    for a_layers, b_layers in zip(full, ours):
        for a, b in zip(a_layers, b_layers):
            assert torch.equal(a, b)
    # the last scale reached capacity: attended to but not stored
    assert comp.kept_tokens() == 2 * B * H * 5


def test_byte_accounting_matches_held_tensors_and_formula():
    B, H, D, layers = 2, 3, 16, 2
    comp = CompressedKVCache(layers, B, H, D, capacity=14, schedule=SCHEDULE, dtype=torch.bfloat16,
                             k_dtype=torch.float32, backend="torch", keep_last_scale=True)
    assert comp.nbytes() == sum(t.numel() * t.element_size() for t in comp.held_tensors())
    _run(comp, [tuple(t.bfloat16() for t in x) for x in _scale_inputs(B, H, D)], layers)
    tokens = 14 * B * H * layers
    assert comp.kv_nbytes() == tokens * D * (4 + 2)          # fp32 K, bf16 V
    metadata = tokens * 4 + layers * 2 * B * H * 4           # int32 positions + segment starts/lengths
    assert comp.nbytes() == comp.kv_nbytes() + metadata
    assert comp.nbytes() == sum(t.numel() * t.element_size() for t in comp.held_tensors())
    assert comp.k_pool[0].dtype == torch.float32 and comp.v_pool[0].dtype == torch.bfloat16
    assert comp.peak_nbytes() >= comp.nbytes()


def test_ragged_policy_attention_and_positions_are_consistent():
    """After random per-head eviction, the kept rows are the original K/V at their recorded positions and the
    next scale's attention equals the reference over exactly those rows."""
    B, H, D = 1, 4, 16
    inputs = _scale_inputs(B, H, D, seed=3)
    comp = CompressedKVCache(1, B, H, D, capacity=14, schedule=SCHEDULE, policy=RandomKeep(), backend="torch")
    all_k = torch.cat([k for _, k, _ in inputs], dim=2)
    all_v = torch.cat([v for _, _, v in inputs], dim=2)
    for si, (q, k, v) in enumerate(inputs):
        if si == 2:
            lens = comp.seg_len[0]
            assert len(set(lens.tolist())) > 1, "test needs ragged lengths"
            ref = ragged_attention_reference(q, comp.k_pool[0], comp.v_pool[0], comp.seg_start[0], lens, k, v,
                                             scale=0.8)
        out = comp.attend(0, q, k, v, scale=0.8)
        comp.advance(q.shape[2])
        if si < 2:
            start, pos = comp.seg_start[0].long(), comp.pos_pool[0].long()
            head = torch.repeat_interleave(torch.arange(H), comp.seg_len[0].long())
            assert torch.equal(comp.k_pool[0], all_k[0, head, pos])
            assert torch.equal(comp.v_pool[0], all_v[0, head, pos])
            for h in range(H):  # each head's positions increasing (sequence order kept)
                seg = pos[start[h]:start[h] + comp.seg_len[0][h]]
                assert torch.all(seg[1:] > seg[:-1])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_truncate_drops_later_positions():
    B, H, D = 1, 2, 16
    inputs = _scale_inputs(B, H, D)
    comp = CompressedKVCache(2, B, H, D, capacity=14, schedule=SCHEDULE, backend="torch", keep_last_scale=True)
    _run(comp, inputs)
    comp.truncate(5)
    assert comp.length == 5 and comp.kept_tokens() == 2 * B * H * 5
    assert int(comp.pos_pool[0].max()) == 4
    ref = CompressedKVCache(2, B, H, D, capacity=14, schedule=SCHEDULE, backend="torch", keep_last_scale=True)
    _run(ref, inputs[:2])
    q, k, v = inputs[2]
    torch.testing.assert_close(comp.attend(0, q, k, v, scale=0.8), ref.attend(0, q, k, v, scale=0.8))
    with pytest.raises(ConfigError, match="truncate"):
        comp.truncate(7)


def test_truncate_into_unstored_last_scale_raises():
    comp = CompressedKVCache(1, 1, 2, 16, capacity=14, schedule=SCHEDULE, backend="torch")
    _run(comp, _scale_inputs(1, 2, 16), layers=1)
    with pytest.raises(ConfigError, match="not stored"):
        comp.truncate(8)
    comp.truncate(5)
    assert comp.length == 5


def test_errors_are_named():
    comp = CompressedKVCache(1, 1, 2, 16, capacity=5, backend="torch")
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(ConfigError, match="overflow"):
        comp.attend(0, q, q, q, scale=1.0)
    q = torch.randn(1, 2, 1, 16)
    with pytest.raises(ConfigError, match="attn_mask"):
        comp.attend(0, q, q, q, scale=1.0, attn_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ConfigError, match="heads"):
        comp.attend(0, torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16), scale=1.0)
    with pytest.raises(ConfigError, match="positive"):
        CompressedKVCache(1, 0, 2, 16, capacity=5)
