"""One ScaleSchedule: token ranges, levels and scale lookup, shared by the model, tokenizer, cache layout, losses."""
import torch

from var.kernels.policies.base import CacheLayout
from var.models import create
from var.train.objectives import split_scales
from var.utils.scales import ScaleSchedule, as_schedule


def test_ranges_levels_and_lookup():
    sched = ScaleSchedule((1, 2, 3))
    assert sched.begin_ends == ((0, 1), (1, 5), (5, 14)) and sched.seq_len == 14 and sched.num_scales == 3
    assert [sched.tokens_through(si) for si in (-1, 0, 1, 2)] == [0, 1, 5, 14]
    assert sched.levels().tolist() == [0] + [1] * 4 + [2] * 9
    assert [sched.scale_index(s, n) for s, n in ((0, 1), (1, 4), (5, 9), (1, 3), (2, 4), (14, 1))] == \
        [0, 1, 2, None, None, None]
    maps = sched.split(torch.arange(28).view(2, 14))
    assert [m.shape for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)] and maps[2][1, 0, 0] == 19
    assert as_schedule((1, 2, 3)) == sched and as_schedule(sched) is sched


def test_every_user_reads_the_same_schedule():
    model, tok = create("var_tiny"), create("msvq_tiny")
    sched = ScaleSchedule(model.config.patch_nums)
    assert model.schedule == tok.schedule == sched and CacheLayout.of(model).seq_len == sched.seq_len
    assert model.begin_ends == sched.begin_ends and model.config.seq_len == sched.seq_len
    assert torch.equal(model.lvl_1L[0], sched.levels())
    idx = torch.randint(0, 8, (2, sched.seq_len))
    assert all(torch.equal(a, b) for a, b in zip(split_scales(idx, tok.patch_nums), sched.split(idx)))
