"""Shared pieces of the compression policies: budget checks, the model layout, ranking and windows."""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.kernels.compressed_cache import CompressedKVCache
from var.kernels.selection import Selection, SelectionContext
from var.utils.scales import ScaleSchedule


def check_fraction(name: str, value, *, low_open: bool = True, high: float = 1.0) -> float:
    """``value`` as a float in ``(0, high]`` (``[0, high]`` when ``low_open`` is False) or :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number in (0, {high}], got {value!r}")
    ok = (0 < value <= high) if low_open else (0 <= value <= high)
    if not ok:
        interval = f"(0, {high}]" if low_open else f"[0, {high}]"
        raise ConfigError(f"{name} must be in {interval} (a fraction of the full cache), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CacheLayout:
    """The dimensions of a VAR model that the policies budget against (``patch_nums``: a side per scale, or
    ``(h, w)`` for Infinity's non-square scales)."""

    depth: int
    num_heads: int
    head_dim: int
    patch_nums: tuple

    @classmethod
    def of(cls, model) -> "CacheLayout":
        config = model.config
        return cls(config.depth, config.num_heads, config.width // config.num_heads, tuple(config.patch_nums))

    @cached_property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return self.schedule.seq_len

    @property
    def full_carried(self) -> int:
        """Tokens per (layer, head) carried into the last scale by the full cache (the 100% reference)."""
        return self.schedule.tokens_through(self.schedule.num_scales - 2)

    def budget_tokens(self, budget: float) -> int:
        """Average kept tokens per (layer, head) for a budget fraction (ScaleKV's definition, >= 1)."""
        return max(1, round(budget * self.full_carried))

    def signature(self) -> dict:
        return {"depth": self.depth, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "patch_nums": [list(pn) if isinstance(pn, tuple) else pn for pn in self.patch_nums]}


def rank_keep(priority_BHP: torch.Tensor, cap, valid_BHP: torch.Tensor) -> torch.Tensor:
    """Keep the ``cap`` highest-priority valid candidates per (b, h); ties go to the earlier position.

    ``cap`` is an int or a tensor broadcastable to ``[B, H]`` (per-head budgets).
    """
    priority = priority_BHP.float().masked_fill(~valid_BHP, float("-inf"))
    order = priority.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                             .expand_as(order))
    if not isinstance(cap, torch.Tensor):
        cap = torch.tensor(cap, device=priority.device)
    cap = cap.to(priority.device)
    while cap.ndim < 3:
        cap = cap.unsqueeze(-1)
    return valid_BHP & (ranks < cap)


def forced(priority_BHP: torch.Tensor, must_keep_BHP: torch.Tensor) -> torch.Tensor:
    """Priorities with ``must_keep`` candidates lifted above every finite score (kept first, in position order)."""
    return priority_BHP.masked_fill(must_keep_BHP, float("inf"))


def pool1d(scores_BHP: torch.Tensor, valid_BHP: torch.Tensor, kernel: int, mode: str, *,
           include_pad: bool = False) -> torch.Tensor:
    """1-D max/avg pool (stride 1, same length) over the candidate axis; entries outside ``valid`` take no part
    (they count as -inf in a max and as 0 in an average) and come out -inf. ``include_pad``: the average divides
    by ``kernel`` at the ends too (``F.avg_pool1d``'s default, used by the SnapKV release)."""
    if kernel <= 1:
        return scores_BHP.masked_fill(~valid_BHP, float("-inf"))
    B, H, P = scores_BHP.shape
    pad = kernel // 2
    if mode == "max":
        x = scores_BHP.float().masked_fill(~valid_BHP, float("-inf")).reshape(B * H, 1, P)
        y = F.max_pool1d(x, kernel, stride=1, padding=pad)
    elif mode == "avg":
        x = scores_BHP.float().masked_fill(~valid_BHP, 0.0).reshape(B * H, 1, P)
        y = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=include_pad)
    else:
        raise ConfigError(f"pooling must be 'max' or 'avg', got {mode!r}")
    return y[..., :P].reshape(B, H, P).masked_fill(~valid_BHP, float("-inf"))


def pool_outside_window(scores_BHP: torch.Tensor, ctx: SelectionContext, idx_cur: torch.Tensor, cap: int,
                        kernel: int, mode: str, *, include_pad: bool = False) -> torch.Tensor:
    """Pooled scores with the observation window taken out before pooling when it will be kept anyway
    (``cap > len(window)``), as the SnapKV and ScaleKV releases do: a token next to the window does not inherit
    the window's (self-attention) score. Window entries come out -inf; :func:`window_priority` forces them in."""
    if cap > idx_cur.numel():
        outside = ctx.valid_BHP & ~current_index_mask(ctx, idx_cur)
        return pool1d(scores_BHP, outside, kernel, mode, include_pad=include_pad)
    return pool1d(scores_BHP, ctx.valid_BHP, kernel, mode, include_pad=include_pad)


def grid_window(ctx: SelectionContext, window: int) -> torch.Tensor:
    """ScaleKV's observation window: centres of a ``sqrt(W) x sqrt(W)`` grid of patches over the current map
    (indices into the current scale), or the last ``W`` tokens when the map is smaller or not a VAR scale."""
    g = math.isqrt(window)
    pn = ctx.grid
    dev = ctx.q_BHnD.device
    if pn is None or g * g != window or pn < g:
        return torch.arange(max(0, ctx.n_cur - window), ctx.n_cur, device=dev)
    patch = pn // g
    centres = torch.arange(g, device=dev) * patch + (patch - 1) // 2
    return (centres[:, None] * pn + centres[None, :]).reshape(-1)


def uniform_queries(n: int, count: int, device) -> torch.Tensor:
    """``min(count, n)`` evenly spaced query positions of the current scale (HACK's N_obs sampling)."""
    return torch.tensor(_uniform_query_positions(n, min(count, n)), dtype=torch.long, device=device)


@functools.lru_cache(maxsize=None)
def _uniform_query_positions(n: int, k: int) -> tuple:
    # on the host, once per size (unique's size is data-dependent: on the device it would wait for the GPU)
    return tuple(torch.linspace(0, n - 1, k).round().long().unique().tolist())


def window_priority(scores_BHP: torch.Tensor, ctx: SelectionContext, idx_cur: torch.Tensor, cap: int) -> torch.Tensor:
    """SnapKV/ScaleKV priorities: the observation window is forced in only when ``cap`` holds it with room to
    spare; otherwise (``cap <= len(window)``, small models or tiny budgets) every candidate, window included, is
    ranked by its pooled score, so the cache is not filled with current-scale tokens chosen by position."""
    if cap > idx_cur.numel():
        return forced(scores_BHP, current_index_mask(ctx, idx_cur) & ctx.valid_BHP)
    return scores_BHP


def current_index_mask(ctx: SelectionContext, idx_cur: torch.Tensor) -> torch.Tensor:
    """``[B, H, P]`` mask of the given current-scale token indices."""
    B, H, P = ctx.valid_BHP.shape
    mask = torch.zeros(P, dtype=torch.bool, device=ctx.valid_BHP.device)
    mask[ctx.max_prefix + idx_cur] = True
    return mask.expand(B, H, P)


class CompressionPolicy:
    """Base class: holds the budget and dtypes, builds caches, and is asked which tokens to keep.

    A policy object has no hidden per-model state: :meth:`new_cache` binds a copy of it to the model's layout
    (:meth:`bind`) and gives that copy to the cache, so one object serves models of any size (CoDe's drafter and
    refiner) at once. Subclasses implement :meth:`prepare` (set-up of a bound copy) and :meth:`select`.
    """

    tracks_scores = False

    def __init__(self, budget: float, *, backend: str | None = None, k_dtype: torch.dtype | None = None,
                 dtype: torch.dtype | None = None):
        self.budget = check_fraction(f"{type(self).__name__} budget", budget)
        self.backend, self.k_dtype, self.dtype = backend, k_dtype, dtype
        self.layout: CacheLayout | None = None  # set on bound copies only
        self.budget_per_head = 0

    def bind(self, layout: CacheLayout) -> "CompressionPolicy":
        """A copy of this policy set up for ``layout`` (this object is left unchanged)."""
        bound = copy.copy(self)
        bound.prepare(layout)
        return bound

    def prepare(self, layout: CacheLayout) -> None:
        """Per-layout set-up of a bound copy (called by :meth:`bind`; extended by subclasses)."""
        self.layout = layout
        self.budget_per_head = layout.budget_tokens(self.budget)

    def new_cache(self, model, batch_size: int, *, dtype: torch.dtype | None = None, device=None):
        bound = self.bind(CacheLayout.of(model))
        layout, param = bound.layout, model.head.weight
        dtype = self.dtype or dtype or param.dtype
        return CompressedKVCache(layout.depth, batch_size, layout.num_heads, layout.head_dim,
                                 capacity=layout.seq_len, policy=bound, schedule=layout.schedule, dtype=dtype,
                                 k_dtype=self.k_dtype, device=device or param.device, backend=self.backend)

    def wants_selection(self, layer: int, start: int, n: int, max_key_len: int) -> bool:
        """Cheap pre-check before the cache builds a :class:`SelectionContext`: False = keep everything."""
        return max_key_len > self.budget_per_head

    def scale_index(self, start: int, n: int) -> int | None:
        """The VAR scale a write of ``n`` tokens at ``start`` is, or None."""
        if self.layout is None:
            raise ConfigError(f"{type(self).__name__} is not bound to a model: use policy.bind(layout) or new_cache")
        return self.layout.schedule.scale_index(start, n)

    def select(self, ctx: SelectionContext) -> Selection | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"
