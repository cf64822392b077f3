"""cfg_interval (LlamaGen and NAR): guidance only for the first tokens. Greedy sampling (top-k 1) must equal the
argmax of teacher-forced logits guided exactly where each release guides."""
import pytest
import torch

from var.errors import ConfigError
from helpers import tiny_gpt
from var.models import create
from var.models import nar_ctf_presets  # noqa: F401  (registers nar_tiny)
from var.samplers.jacobi import sample_sjd
from var.samplers.logits import apply_cfg
from var.samplers.neighbor_nar import diagonal_rows, sample_nar
from var.samplers.next_token import sample_next_token

CFG, LABELS = 4.0, torch.tensor([0, 3, 7])


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt(output_std=0.5)


def teacher_forced_argmax(model, tokens, guided_N):
    with torch.no_grad():
        cond = model(LABELS, tokens)
        uncond = model(torch.full_like(LABELS, model.null_class), tokens)
    guided = apply_cfg(cond, uncond, CFG)
    return torch.where(guided_N[None, :, None], guided, cond).argmax(-1)


@pytest.mark.parametrize("interval", [-1, 0, 5])
def test_next_token_and_sjd_follow_llamagen_cfg_interval(gpt, interval):
    out = sample_next_token(gpt, None, LABELS, cfg_scale=CFG, top_k=1, cfg_interval=interval, decode=False)
    token = torch.arange(16)
    guided = torch.ones(16, dtype=torch.bool) if interval < 0 else token <= interval + 1  # LlamaGen's rule
    assert torch.equal(out.tokens, teacher_forced_argmax(gpt, out.tokens, guided))
    sjd = sample_sjd(gpt, None, LABELS, cfg_scale=CFG, top_k=1, cfg_interval=interval, window=5, decode=False,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(sjd.tokens, out.tokens)
    if interval >= 0:  # the interval changes the samples (not a vacuous check)
        full = sample_next_token(gpt, None, LABELS, cfg_scale=CFG, top_k=1, decode=False)
        assert not torch.equal(full.tokens, out.tokens)


def test_nar_follows_its_release_cfg_interval():
    torch.manual_seed(0)
    model = create("nar_tiny").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    n, interval = model.config.grid_size, 3
    out = sample_nar(model, None, LABELS, cfg_scale=CFG, top_k=1, cfg_interval=interval, decode=False)
    generated_before = {d: sum(len(diagonal_rows(e, n)) for e in range(d)) for d in range(2 * n - 1)}
    guided = torch.tensor([generated_before[r + c] <= interval for r in range(n) for c in range(n)])
    with torch.no_grad():
        logits = model(LABELS, out.tokens)
        uncond = model(torch.full_like(LABELS, 10), out.tokens)
    expected = torch.where(guided[None, :, None], apply_cfg(logits, uncond, CFG), logits).argmax(-1)
    assert torch.equal(out.tokens, expected)
    assert not guided.all() and guided.any()


def test_bad_cfg_interval_raises(gpt):
    with pytest.raises(ConfigError, match="cfg_interval"):
        sample_next_token(gpt, None, LABELS, cfg_scale=CFG, cfg_interval=-2)
