"""Host read-backs of device values in the sampling paths, counted on the CPU with helpers.HostReads (the GPU tier
checks the same paths with torch.cuda.set_sync_debug_mode)."""
import torch

from helpers import HostReads, tiny_var_pair
from var.kernels import HACK, ScaleKV
from var.kernels.kv_cache import FullCache


def _scale_steps(model, tok, cache):
    """The forward passes of one VAR sample (random next-scale inputs): what the cache does per scale."""
    g = torch.Generator().manual_seed(0)
    cond = model.class_condition(torch.tensor([1, 2, 10, 10]))
    x = model.first_scale_input(cond)
    for si, pn in enumerate(tok.patch_nums):
        model.forward_scale(x, cond, cache)
        if si + 1 < len(tok.patch_nums):
            nxt = tok.patch_nums[si + 1]
            x = model.scale_input(si + 1, torch.randn(4, nxt * nxt, tok.embed_dim, generator=g))


@torch.no_grad()
def test_scale_steps_read_back_only_to_size_a_compaction():
    """The full cache reads nothing back; a compressed cache reads once per compaction (the new pool's size with the
    min/max segment lengths, one batched read), nothing to attend (the padded length is mirrored on the host)."""
    tok, model = tiny_var_pair()
    with HostReads() as reads:
        _scale_steps(model, tok, FullCache().new_cache(model, 4))
    assert reads.count == 0
    for policy in (ScaleKV(budget=0.5), HACK(budget=0.5)):
        _scale_steps(model, tok, policy.new_cache(model, 4))  # warm-up: host-side tables built once per size
        cache = policy.new_cache(model, 4)
        compactions = []
        compact = cache._compact
        cache._compact = lambda *a, **k: (compactions.append(1), compact(*a, **k))[1]
        with HostReads() as reads:
            _scale_steps(model, tok, cache)
        assert compactions and reads.names == ["tolist"] * len(compactions), (policy, reads.names)


@torch.no_grad()
def test_next_scale_sampler_reads_back_once_after_the_loop():
    """The label check before the loop and the deferred finiteness check after it: nothing per scale."""
    from var.samplers import sample_next_scale

    tok, model = tiny_var_pair()
    with HostReads() as reads:
        sample_next_scale(model, tok, [1, 2, 3], cfg=1.5, generator=torch.Generator().manual_seed(0), decode=False)
    assert reads.count == 2, reads.names
