"""The multi-scale token layout of VAR: ``patch_nums`` -> token ranges, scale levels, scale lookup.

Scale ``si`` is a ``pn x pn`` map (``pn = patch_nums[si]``) whose tokens occupy ``[begin, end)`` of the flattened
sequence of all scales, in order. Models, tokenizers, caches, policies and losses all read this one object.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch


@dataclass(frozen=True)
class ScaleSchedule:
    """Token layout of the scales ``patch_nums`` (strictly increasing map sides)."""

    patch_nums: tuple

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(pn) for pn in self.patch_nums))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @cached_property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        """``(begin, end)`` token range of every scale."""
        ranges, start = [], 0
        for pn in self.patch_nums:
            ranges.append((start, start + pn * pn))
            start += pn * pn
        return tuple(ranges)

    @property
    def seq_len(self) -> int:
        """Tokens of all scales."""
        return self.begin_ends[-1][1]

    def tokens_through(self, si: int) -> int:
        """Tokens of scales ``0..si`` (0 for ``si < 0``)."""
        return self.begin_ends[si][1] if si >= 0 else 0

    def scale_index(self, start: int, n: int) -> int | None:
        """The scale whose tokens are exactly ``[start, start + n)``, or None (a write that is not one scale)."""
        for si, (begin, end) in enumerate(self.begin_ends):
            if begin == start:
                return si if end - begin == n else None
        return None

    def levels(self) -> torch.Tensor:
        """Scale index of every token ``[seq_len]`` (long)."""
        return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(self.patch_nums)])

    def split(self, tokens_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flattened tokens ``[B, L]`` -> one map ``[B, pn, pn]`` per scale."""
        return [tokens_BL[:, begin:end].reshape(-1, pn, pn)
                for (begin, end), pn in zip(self.begin_ends, self.patch_nums)]


def as_schedule(patch_nums: Sequence[int] | ScaleSchedule) -> ScaleSchedule:
    """A :class:`ScaleSchedule` from itself or its ``patch_nums``."""
    return patch_nums if isinstance(patch_nums, ScaleSchedule) else ScaleSchedule(tuple(patch_nums))
