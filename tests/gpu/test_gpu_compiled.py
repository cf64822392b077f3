"""GPU tier: the compiled sampling steps on CUDA (``compile=True``: inductor with CUDA graphs) against eager, that the
CUDA graphs really replay (inductor's ``cudagraph_skips`` stays 0), and the host synchronisations of a sample counted
with ``torch.cuda.set_sync_debug_mode``. On the CPU dry run the same bodies compile with dynamo's ``eager`` backend and
count host reads with helpers.HostReads."""
import contextlib
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import HostReads, preset_gpt, tiny_var_pair
from var.models.compiled import DecodeStep, decode_cache
from var.samplers import sample_next_scale

pytestmark = pytest.mark.gpu


def _compile(device):
    return True if device.type == "cuda" else "eager"  # inductor on a CPU takes minutes: the dry run traces only


@contextlib.contextmanager
def count_syncs(device):
    """Yields a list that ends up holding one entry per host synchronisation in the block."""
    found = []
    if device.type != "cuda":
        with HostReads() as reads:
            yield found
        found.extend(reads.names)
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


@torch.no_grad()
def test_compiled_next_scale_sampling_matches_eager_and_replays_cuda_graphs(device, gen):
    """fp32: greedy (top_k=1) tokens identical; with sampling, the same generator gives the same tokens (the draws are
    eager; a compiled logit that rounds differently can only flip a near-tie); one graph per scale, none skipped."""
    torch._dynamo.reset()
    tok, model = tiny_var_pair()
    model, tok = model.to(device), tok.to(device)
    labels = torch.tensor([1, 2, 3, 10], device=device)
    skips0 = counters["inductor"]["cudagraph_skips"]
    graphs0 = counters["stats"]["unique_graphs"]
    for top_k in (1, 20):
        runs = [sample_next_scale(model, tok, labels, cfg=1.5, top_k=top_k, generator=gen(0), decode=False,
                                  compile=compile) for compile in (False, _compile(device), _compile(device))]
        eager, first, again = (torch.cat([t.flatten(1) for t in r.tokens], 1) for r in runs)
        assert torch.equal(first, again)
        agree = (first == eager).float().mean().item()
        assert agree == 1.0 if top_k == 1 else agree >= 0.95, (top_k, agree)
    assert counters["stats"]["unique_graphs"] - graphs0 == len(tok.patch_nums)  # rows and shapes equal: reused
    assert counters["inductor"]["cudagraph_skips"] == skips0, "CUDA graphs were skipped (see TORCH_LOGS=cudagraphs)"


@torch.no_grad()
def test_compiled_decode_step_matches_eager_and_replays_cuda_graphs(device):
    torch._dynamo.reset()
    gpt = preset_gpt().to(device)
    labels = torch.tensor([1, 2, 3], device=device)
    idx = torch.randint(0, gpt.vocab_size, (3, gpt.seq_len), device=device)
    skips0 = counters["inductor"]["cudagraph_skips"]
    graphs0 = counters["stats"]["unique_graphs"]

    def logits(compile):
        from var.models.compiled import compile_spec
        spec = compile_spec(compile)
        cache = decode_cache(gpt, 3, spec)
        out = [gpt.prefill(labels, cache)]
        step = DecodeStep(gpt, cache, spec)
        out += [step(idx[:, i:i + 1]).clone() for i in range(gpt.seq_len - 1)]  # outputs live in the graph's pool
        return torch.cat(out, 1)

    ref = logits(False)
    for _ in range(2):
        torch.testing.assert_close(logits(_compile(device)), ref, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs0 == 1
    assert counters["inductor"]["cudagraph_skips"] == skips0, "CUDA graphs were skipped (see TORCH_LOGS=cudagraphs)"


@torch.no_grad()
def test_next_scale_sampling_synchronises_twice(device, gen):
    """Nothing per scale: the label check before the loop and the finiteness flag after it (labels already on the
    device; no decode)."""
    tok, model = tiny_var_pair()
    model, tok = model.to(device), tok.to(device)
    labels = torch.tensor([1, 2, 3], device=device)
    sample_next_scale(model, tok, labels, cfg=1.5, generator=gen(0), decode=False)  # warm-up (lazy inits)
    with count_syncs(device) as syncs:
        sample_next_scale(model, tok, labels, cfg=1.5, generator=gen(0), decode=False)
    assert len(syncs) <= 2, syncs


@torch.no_grad()
def test_compiled_next_token_sampling_matches_eager_and_synchronises_twice(device, gen):
    """``compile=True`` decoding on CUDA: greedy tokens identical, sampled ones agree (the draws are eager); the
    plain sampler synchronises twice per sample (label check, finiteness flag), nothing per token."""
    from var.samplers import sample_next_token

    torch._dynamo.reset()
    gpt = preset_gpt().to(device)
    labels = torch.tensor([1, 2, 3], device=device)
    skips0 = counters["inductor"]["cudagraph_skips"]
    for top_k in (1, 20):
        eager, compiled = (sample_next_token(gpt, None, labels, top_k=top_k, generator=gen(0), decode=False,
                                             compile=compile).tokens for compile in (False, _compile(device)))
        agree = (eager == compiled).float().mean().item()
        assert agree == 1.0 if top_k == 1 else agree >= 0.95, (top_k, agree)
    assert counters["inductor"]["cudagraph_skips"] == skips0, "CUDA graphs were skipped (see TORCH_LOGS=cudagraphs)"
    with count_syncs(device) as syncs:
        sample_next_token(gpt, None, labels, generator=gen(0), decode=False)
    assert len(syncs) <= 2, syncs


@torch.no_grad()
def test_compiled_sjd_window_matches_eager_and_synchronises_once_per_pass(device, gen):
    """The Jacobi window pass compiled (full width, explicit positions and mask over the whole cache): greedy tokens
    identical to eager, one graph for every pass, CUDA graphs not skipped; eager SJD synchronises at most twice per
    pass (the one per-pass read-back and the window positions' range check) plus a few per sample."""
    from var.samplers import sample_sjd

    torch._dynamo.reset()
    gpt = preset_gpt().to(device)
    labels = torch.tensor([1, 2, 3], device=device)
    skips0, graphs0 = counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"]
    eager, compiled = (sample_sjd(gpt, None, labels, window=6, top_k=1, generator=gen(0), decode=False,
                                  compile=compile).tokens for compile in (False, _compile(device)))
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] - graphs0 == 1
    assert counters["inductor"]["cudagraph_skips"] == skips0, "CUDA graphs were skipped (see TORCH_LOGS=cudagraphs)"
    with count_syncs(device) as syncs:
        out = sample_sjd(gpt, None, labels, window=6, generator=gen(0), decode=False)
    assert len(syncs) <= 2 * out.stats.extra["iterations"] + 5, syncs
