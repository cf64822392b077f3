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


def test_multinomial_draws_what_torch_multinomial_draws():
    """The sync-free draw equals torch.multinomial (one sample, with replacement) for the same generator, and leaves
    the generator in the same state, for one generator and for one per sample."""
    from var.samplers.logits import multinomial

    for dtype, shape in ((torch.float32, (5, 7)), (torch.float64, (3, 4, 100)), (torch.float32, (2, 9, 64))):
        p = torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(1)) ** 3
        p = p / p.sum(-1, keepdim=True)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref = torch.multinomial(p.reshape(-1, shape[-1]), 1, replacement=True, generator=g1).view(shape[:-1])
        assert torch.equal(multinomial(p, g2), ref)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
        gens1 = [torch.Generator().manual_seed(s) for s in range(shape[0])]
        gens2 = [torch.Generator().manual_seed(s) for s in range(shape[0])]
        ref = torch.stack([torch.multinomial(p[b].reshape(-1, shape[-1]), 1, replacement=True, generator=g)
                           .view(shape[1:-1]) for b, g in enumerate(gens1)])
        assert torch.equal(multinomial(p, gens2), ref)


@torch.no_grad()
def test_deferred_finiteness_check_names_the_first_failing_scale():
    """CoDe with a NaN refiner: the drafter's scales are finite, the error read after the loop names scale 2."""
    import pytest

    from var.errors import NonFiniteLogitsError
    from var.samplers.collaborative import sample_collaborative

    tok, drafter = tiny_var_pair()
    _, refiner = tiny_var_pair(seed=1)
    refiner.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="scale 2"):
        sample_collaborative(drafter, refiner, tok, [1, 2], draft_steps=2, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_next_token_samplers_read_back_once_per_sample_or_pass():
    """Plain decoding: the label check and the finiteness flag, nothing per token. SJD: one read per pass (loop
    test, window width, cache truncation and finiteness flag together) plus the positions check of the window."""
    from var.models import create
    from var.samplers import sample_next_token, sample_sjd

    torch.manual_seed(0)
    gpt = create("gpt_tiny").eval()
    labels = torch.tensor([1, 2, 3])
    with HostReads() as reads:
        sample_next_token(gpt, None, labels, generator=torch.Generator().manual_seed(0), decode=False)
    assert reads.count == 2, reads.names
    with HostReads() as reads:
        out = sample_sjd(gpt, None, labels, window=4, generator=torch.Generator().manual_seed(0), decode=False)
    passes = out.stats.extra["iterations"]
    assert reads.count <= 2 * passes + 5, (passes, reads.names)
