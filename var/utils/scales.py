"""The multi-scale token layout of VAR and Infinity: scales -> token grids, token ranges, scale levels, scale lookup.

Scale ``si`` is an ``h x w`` token grid whose tokens occupy ``[begin, end)`` of the flattened sequence of all
scales, in order. A square scale is written as its side (VAR's ``patch_nums``), a non-square one as ``(h, w)``
(Infinity's aspect-ratio templates). Models, tokenizers, caches, policies, losses and samplers all read this one
object; Infinity's templates (:mod:`var.tokenizers.scale_schedules`) build it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from var.errors import ConfigError


def _normalise(scale) -> int | tuple[int, int]:
    """A scale as its side when square, else ``(h, w)``."""
    if isinstance(scale, (tuple, list)):
        h, w = (int(x) for x in scale)
        return h if h == w else (h, w)
    return int(scale)


@dataclass(frozen=True)
class ScaleSchedule:
    """Token layout of the scales ``patch_nums`` (a side per square scale, ``(h, w)`` per non-square one).

    ``rope_grid``: the ``(H, W)`` grid 2-D RoPE positions are normalised to (Infinity places every scale on its
    template's 1M final grid); defaults to the last scale's grid.
    """

    patch_nums: tuple
    rope_grid: tuple | None = None

    def __post_init__(self):
        patch_nums = tuple(_normalise(pn) for pn in self.patch_nums)
        object.__setattr__(self, "patch_nums", patch_nums)
        if not patch_nums or any(h < 1 or w < 1 for h, w in self.grids):
            raise ConfigError(f"a scale schedule needs positive token grids, got {self.patch_nums}")
        object.__setattr__(self, "rope_grid", tuple(self.rope_grid) if self.rope_grid else self.grids[-1])

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @cached_property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` token grid of every scale."""
        return tuple(pn if isinstance(pn, tuple) else (pn, pn) for pn in self.patch_nums)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """Tokens of every scale."""
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        """``(begin, end)`` token range of every scale."""
        ranges, start = [], 0
        for n in self.lengths:
            ranges.append((start, start + n))
            start += n
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
        return torch.cat([torch.full((n,), si, dtype=torch.long) for si, n in enumerate(self.lengths)])

    def split(self, tokens_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flattened tokens ``[B, L]`` -> one map ``[B, h, w]`` per scale."""
        return [tokens_BL[:, begin:end].reshape(-1, h, w) for (begin, end), (h, w) in zip(self.begin_ends, self.grids)]

    def image_size(self, stride: int = 16) -> tuple[int, int]:
        """``(height, width)`` in pixels of the last grid through a VAE of ``stride`` (16 for VAR's and Infinity's)."""
        h, w = self.grids[-1]
        return h * stride, w * stride

    def prefix(self, num_scales: int) -> "ScaleSchedule":
        """The first ``num_scales`` scales (same RoPE grid)."""
        return ScaleSchedule(self.patch_nums[:num_scales], self.rope_grid)
