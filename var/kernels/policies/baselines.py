"""Generic KV-compression baselines ported to next-scale prediction, all at an equal average budget per head.

* :class:`StreamingLLM`: ``sinks`` first tokens + the most recent tokens (Xiao et al., 2024).
* :class:`SnapKV`: the last ``window`` queries of the current scale score every key (softmax attention summed over
  the window, 1-D pool of the non-window part only, zero-padded and divided by the kernel at the ends, as the
  release's ``F.avg_pool1d``), keep the window + the top-scoring rest, per head (Li et al., 2024); when the
  budget is not larger than the window, the top-scoring tokens only (window not forced, everything pooled).
* :class:`H2O`: accumulated attention received by each key over all scales (estimated from ``num_queries``
  evenly spaced queries per scale, rescaled to the scale's size), keep the most recent ``recent_ratio`` of the
  budget + the heaviest hitters (Zhang et al., 2023).

The budget is a fraction of the tokens the full cache carries into the last scale (see :class:`CacheLayout`).
"""
from __future__ import annotations

import torch

from var.errors import ConfigError
from var.kernels.selection import Selection, SelectionContext
from var.kernels.policies.base import (CompressionPolicy, check_fraction, forced, pool_outside_window, rank_keep,
                                       uniform_queries, window_priority)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
    return value


class StreamingLLM(CompressionPolicy):
    """Attention sinks + sliding window (``sinks=0`` is the plain sliding window)."""

    def __init__(self, budget: float, *, sinks: int = 4, **kw):
        super().__init__(budget, **kw)
        self.sinks = _positive_int("sinks", sinks)

    def select(self, ctx: SelectionContext) -> Selection | None:
        if ctx.max_prefix + ctx.n_cur <= self.budget_per_head:
            return None
        priority = forced(ctx.pos_BHP.float(), ctx.valid_BHP & (ctx.pos_BHP < self.sinks))
        return Selection(rank_keep(priority, self.budget_per_head, ctx.valid_BHP))

    def __repr__(self) -> str:
        return f"StreamingLLM(budget={self.budget}, sinks={self.sinks})"


class SnapKV(CompressionPolicy):
    """Observation window = last ``window`` tokens of the current scale; pooled softmax scores; per-head top-k."""

    def __init__(self, budget: float, *, window: int = 16, kernel: int = 5, pooling: str = "avg", **kw):
        super().__init__(budget, **kw)
        self.window, self.kernel, self.pooling = _positive_int("window", window), kernel, pooling
        if pooling not in ("max", "avg"):
            raise ConfigError(f"pooling must be 'max' or 'avg', got {pooling!r}")

    def layer_cap(self, layer: int, key_len: int) -> int:
        """Tokens layer ``layer`` keeps (window included): the uniform budget."""
        return self.budget_per_head

    def select(self, ctx: SelectionContext) -> Selection | None:
        key_len = ctx.max_prefix + ctx.n_cur
        if key_len <= self.budget_per_head:
            return None
        cap = self.layer_cap(ctx.layer, key_len)
        idx = torch.arange(max(0, ctx.n_cur - max(1, self.window)), ctx.n_cur, device=ctx.q_BHnD.device)
        scores = pool_outside_window(ctx.observation_scores(idx), ctx, idx, cap, self.kernel, self.pooling,
                                     include_pad=True)
        priority = window_priority(scores, ctx, idx, cap)
        return Selection(rank_keep(priority, cap, ctx.valid_BHP))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(budget={self.budget}, window={self.window}, kernel={self.kernel}, "
                f"pooling={self.pooling!r})")


class PyramidKV(SnapKV):
    """SnapKV's selection with a pyramid of per-layer budgets, large in shallow layers (Cai et al., 2024; the
    fourth baseline of ScaleKV's Table 1). With ``C`` the budget and ``w`` the window: ``min = (C - w) // beta``,
    ``max = 2 (C - w) - min`` (capped at ``key_len - w``, ``min`` re-balanced), layer ``l`` keeps
    ``max - l * ((max - min) // (L - 1))`` tokens plus the window; below ``key_len = 2 (C - w)`` every layer keeps
    ``C`` (plain SnapKV), as the release's ``PyramidKVCluster``."""

    def __init__(self, budget: float, *, beta: int = 20, **kw):
        super().__init__(budget, **kw)
        self.beta = max(1, _positive_int("beta", beta))

    def layer_cap(self, layer: int, key_len: int) -> int:
        budget, window, depth = self.budget_per_head, self.window, self.layout.depth
        if budget <= window or key_len < 2 * (budget - window) or depth < 2:
            return budget
        low = (budget - window) // self.beta
        high = 2 * (budget - window) - low
        if high >= key_len - window:
            high = key_len - window
            low = 2 * (budget - window) - high
        return window + high - layer * ((high - low) // (depth - 1))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", beta={self.beta})"


class H2O(CompressionPolicy):
    """Heavy hitters (accumulated attention) + recent tokens."""

    tracks_scores = True

    def __init__(self, budget: float, *, recent_ratio: float = 0.5, num_queries: int = 64, **kw):
        super().__init__(budget, **kw)
        self.recent_ratio = check_fraction("recent_ratio", recent_ratio, low_open=False)
        self.num_queries = max(1, _positive_int("num_queries", num_queries))

    def wants_selection(self, layer: int, start: int, n: int, max_key_len: int) -> bool:
        return True  # scores accumulate at every scale

    def select(self, ctx: SelectionContext) -> Selection:
        idx = uniform_queries(ctx.n_cur, self.num_queries, ctx.q_BHnD.device)
        new = ctx.observation_scores(idx).masked_fill(~ctx.valid_BHP, 0.0) * (ctx.n_cur / idx.numel())
        acc = ctx.acc_scores_BHP + new
        if ctx.max_prefix + ctx.n_cur <= self.budget_per_head:
            return Selection(ctx.valid_BHP, acc)
        recent = rank_keep(ctx.pos_BHP.float(), round(self.recent_ratio * self.budget_per_head), ctx.valid_BHP)
        keep = rank_keep(forced(acc, recent), self.budget_per_head, ctx.valid_BHP)
        return Selection(keep, acc)

    def __repr__(self) -> str:
        return f"H2O(budget={self.budget}, recent_ratio={self.recent_ratio}, num_queries={self.num_queries})"
