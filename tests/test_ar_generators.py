"""A batch with one generator per sample equals the single runs, for every next-token sampler that claims it.

The speculative samplers draw a fixed number of uniforms per sample and pass (whatever the batch's window width),
so a sample's random stream does not depend on which other samples share its batch or how long they accept.
"""
import pytest
import torch

from helpers import tiny_gpt
from var.models import create
from var.samplers.jacobi import sample_gsd, sample_lantern, sample_mcsjd, sample_sjd
from var.samplers.neighbor import sample_zipar
from var.samplers.next_token import sample_next_token

SEEDS, LABELS = (3, 5, 8), [1, 7, 4]


@pytest.fixture(scope="module")
def pair():
    return tiny_gpt(), create("vq_tiny").eval()


SAMPLERS = {
    "next_token": (sample_next_token, {}),
    "sjd": (sample_sjd, dict(window=6)),
    "sjd_horizon": (sample_sjd, dict(window=5, init="repeat_horizon")),
    "mcsjd_maximal": (sample_mcsjd, dict(window=7, coupling="maximal")),
    "mcsjd_gumbel": (sample_mcsjd, dict(window=5, coupling="gumbel", init="repeat_vertical")),
    "lantern": (sample_lantern, dict(window=6, k=8, delta=0.2)),
    "gsd": (sample_gsd, dict(window=6, group_size=6, embed_threshold=None)),
    "zipar": (sample_zipar, dict(window=2)),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_batch_with_per_sample_generators_equals_single_runs(pair, name):
    gpt, vq = pair
    sampler, kwargs = SAMPLERS[name]
    knobs = dict(cfg_scale=2.0, temperature=1.2, top_k=0, top_p=0.0, decode=False, **kwargs)
    batch = sampler(gpt, vq, LABELS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], **knobs)
    for b, (seed, label) in enumerate(zip(SEEDS, LABELS)):
        single = sampler(gpt, vq, [label], generator=[torch.Generator().manual_seed(seed)], **knobs)
        assert torch.equal(single.tokens[0], batch.tokens[b]), f"{name}: sample {b} differs from its single run"
