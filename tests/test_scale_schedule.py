"""One ScaleSchedule (VAR squares and Infinity (h, w) grids): token ranges, levels and scale lookup, shared by the
models, tokenizers, cache layout, losses and samplers."""
import pytest
import torch

from var.kernels.policies.base import CacheLayout
from var.models import create
from var.train.objectives import split_scales
from var.errors import ConfigError
from var.tokenizers.scale_schedules import dynamic_schedule
from var.utils.scales import ScaleSchedule


def test_ranges_levels_and_lookup():
    sched = ScaleSchedule((1, 2, 3))
    assert sched.begin_ends == ((0, 1), (1, 5), (5, 14)) and sched.seq_len == 14 and sched.num_scales == 3
    assert [sched.tokens_through(si) for si in (-1, 0, 1, 2)] == [0, 1, 5, 14]
    assert sched.levels().tolist() == [0] + [1] * 4 + [2] * 9
    assert [sched.scale_index(s, n) for s, n in ((0, 1), (1, 4), (5, 9), (1, 3), (2, 4), (14, 1))] == \
        [0, 1, 2, None, None, None]
    maps = sched.split(torch.arange(28).view(2, 14))
    assert [m.shape for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)] and maps[2][1, 0, 0] == 19
    assert sched.grids == ((1, 1), (2, 2), (3, 3)) and sched.lengths == (1, 4, 9) and sched.rope_grid == (3, 3)


def test_non_square_scales_are_h_w_and_square_ones_their_side():
    sched = ScaleSchedule(((1, 1), (2, 3), [4, 4]), rope_grid=(8, 8))
    assert sched.patch_nums == (1, (2, 3), 4) and sched.grids == ((1, 1), (2, 3), (4, 4))
    assert sched == ScaleSchedule((1, (2, 3), 4), (8, 8)) and sched.begin_ends == ((0, 1), (1, 7), (7, 23))
    assert [m.shape for m in sched.split(torch.zeros(2, 23))] == [(2, 1, 1), (2, 2, 3), (2, 4, 4)]
    assert sched.prefix(2) == ScaleSchedule((1, (2, 3)), (8, 8)) and sched.image_size(4) == (16, 16)
    wide = dynamic_schedule(0.5, "0.06M")  # Infinity's template, the same class
    assert isinstance(wide, ScaleSchedule) and wide.grids[-1] == (11, 22) and wide.rope_grid == (45, 90)
    with pytest.raises(ConfigError):
        ScaleSchedule(((1, 1), (0, 2)))


def test_every_user_reads_the_same_schedule():
    model, tok = create("var_tiny"), create("msvq_tiny")
    sched = ScaleSchedule(model.config.patch_nums)
    assert model.schedule == tok.schedule == sched and CacheLayout.of(model).seq_len == sched.seq_len
    assert model.begin_ends == sched.begin_ends and model.config.seq_len == sched.seq_len
    assert torch.equal(model.lvl_1L[0], sched.levels())
    idx = torch.randint(0, 8, (2, sched.seq_len))
    assert all(torch.equal(a, b) for a, b in zip(split_scales(idx, tok.patch_nums), sched.split(idx)))
