"""ZipAR's released schedule (ThisisBillhe/ZipAR @ 2a5695c, generate_zipar.py), pass for pass."""
import pytest
import torch

from var.errors import ConfigError
from helpers import tiny_gpt
from var.samplers.neighbor import released_schedule, sample_zipar


@pytest.mark.parametrize("grid, window, passes", [(24, 8, 224), (16, 8, 144)])
def test_released_pass_counts(grid, window, passes):
    """Row 0 one token per pass after the prefill, then the release's row-parallel passes (24 x 24, s = 8: 224)."""
    assert 1 + (grid - 1) + len(released_schedule(grid, grid, window)) == passes


def test_released_rows_are_seeded_from_two_rows_above():
    schedule = released_schedule(6, 6, 2)
    first_inputs = schedule[0][0]
    assert first_inputs == [((0, 5), (0, 5), 1)]  # row 1 starts from row 0's true last token, at its slot
    seeds = [(source, slot, row) for inputs, _ in schedule for source, slot, row in inputs if source[0] == "seed"]
    assert seeds[0] == (("seed", (0, 5)), (1, 5), 2)  # row 2: newest token of row 0, at row 1's last slot
    assert seeds[1] == (("seed", (1, 3)), (2, 5), 3)  # row 3: newest token of row 1 when row 2 reached s = 2
    predicted = [cell for _, cells in schedule for cell in cells]
    assert sorted(predicted) == [(r, c) for r in range(1, 6) for c in range(6)]  # every cell once


def test_released_sampler_runs_the_schedule_and_zero_slots_matter():
    gpt = tiny_gpt(output_std=0.5, grid_size=6)
    out = sample_zipar(gpt, None, [1, 2], schedule="released", window=2, cfg_scale=2.0, decode=False,
                       generator=torch.Generator().manual_seed(0))
    assert out.stats.forward_passes == 1 + 5 + len(released_schedule(6, 6, 2))
    eager = sample_zipar(gpt, None, [1, 2], window=2, cfg_scale=2.0, decode=False, generator=torch.Generator().manual_seed(0))
    assert eager.stats.forward_passes < out.stats.forward_passes
    # greedy: rows 0 and 1 see a complete causal context (equal to teacher forcing); later rows attend zeros for
    # the undecoded cells of the row above, as the release does, so some of their tokens differ
    labels = torch.tensor([1, 2])
    greedy = sample_zipar(gpt, None, labels, schedule="released", window=2, cfg_scale=1.0, top_k=1, decode=False)
    with torch.no_grad():
        forced = gpt(labels, greedy.tokens).argmax(-1)
    assert torch.equal(forced[:, :12], greedy.tokens[:, :12])
    assert not torch.equal(forced[:, 12:], greedy.tokens[:, 12:])
    with pytest.raises(ConfigError, match="schedule"):
        sample_zipar(gpt, None, [1], schedule="adaptive")
