"""HACK (Qin et al., 2025): head-aware KV compression with contextual vs structural heads.

* **Classification** (offline): from a calibration profile, each head's column variance of its final-scale
  attention (``sum_j Var_i a_ij``); sorted globally over all layers and heads, the lowest
  ``contextual_fraction`` become *contextual* (vertical pattern), the rest *structural* (diagonal pattern).
* **Asymmetric budgets**: average per head ``B = a*B_C + (1-a)*B_S`` with ``B_C = contextual_share * B_S``
  (``a`` the realised contextual fraction); ``B_S`` is capped at the full cache and any excess goes to ``B_C``,
  so 100% keeps everything.
* **Selection**, after every scale, from ``num_queries`` evenly spaced queries of the current scale (softmax
  attention summed over them): contextual heads keep their top-``B_C`` keys; structural heads keep the first
  ``init_scales`` scales, then the current scale, then the top-scoring middle tokens, up to ``B_S``.

* **Merge** (``merge=True``, off by default): at the last compression (the cache carried into the final scale),
  each token a contextual head evicts is averaged into the kept token of that head whose key is most
  cosine-similar (LOOK-M style; keys and values averaged with equal weights). The paper's exact scope of this
  "final step" merge is not verified; it costs a ``[P, P]`` similarity per contextual head.

Not implemented: the static head permutation (the ragged per-head cache takes the two budgets directly). Without
a profile every head is structural with the uniform budget (logged).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.kernels.selection import Selection, SelectionContext
from var.kernels.policies.base import CacheLayout, CompressionPolicy, check_fraction, rank_keep, uniform_queries
from var.kernels.policies.calibration import CalibrationProfile

log = logging.getLogger(__name__)


def classify_heads(head_variance: list, contextual_fraction: float) -> torch.Tensor:
    """``[depth, H]`` bool, True = contextual: the globally lowest-variance ``contextual_fraction`` of heads."""
    var = torch.tensor(head_variance, dtype=torch.float64)
    count = round(contextual_fraction * var.numel())
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    mask[var.flatten().argsort(stable=True)[:count]] = True
    return mask.view(var.shape)


def merge_evicted(k_BHPD: torch.Tensor, v_BHPD: torch.Tensor, keep_BHP: torch.Tensor, evict_BHP: torch.Tensor):
    """Average every evicted candidate into the kept candidate of its head with the most cosine-similar key.

    Returns new ``(k, v)`` in fp32; kept entries that absorb nothing are unchanged.
    """
    k, v = k_BHPD.float(), v_BHPD.float()
    unit = F.normalize(k, dim=-1)
    sim = (unit @ unit.transpose(-1, -2)).masked_fill(~keep_BHP.unsqueeze(2), float("-inf"))
    target = sim.argmax(-1)                                                     # [B, H, P]
    w = evict_BHP.float()
    count = keep_BHP.float().scatter_add(-1, target, w)
    idx = target.unsqueeze(-1).expand_as(k)
    k_sum = (k * keep_BHP.unsqueeze(-1)).scatter_add(2, idx, k * w.unsqueeze(-1))
    v_sum = (v * keep_BHP.unsqueeze(-1)).scatter_add(2, idx, v * w.unsqueeze(-1))
    denom = count.clamp_min(1).unsqueeze(-1)
    return k_sum / denom, v_sum / denom


class HACK(CompressionPolicy):
    """``HACK(budget=0.5, profile=...)``: budget is a fraction of the cache carried into the last scale."""

    def __init__(self, budget: float, *, profile=None, contextual_fraction: float = 0.5,
                 contextual_share: float = 0.25, num_queries: int = 32, init_scales: int = 2, merge: bool = False,
                 **kw):
        super().__init__(budget, **kw)
        self.profile = CalibrationProfile.coerce(profile)
        self.contextual_fraction = check_fraction("contextual_fraction", contextual_fraction, low_open=False)
        self.contextual_share = check_fraction("contextual_share", contextual_share)
        if num_queries < 1 or init_scales < 0:
            raise ConfigError(f"num_queries must be >= 1 and init_scales >= 0, got {num_queries}, {init_scales}")
        self.num_queries, self.init_scales, self.merge = num_queries, init_scales, bool(merge)
        self.contextual: torch.Tensor | None = None
        self.caps_LH: torch.Tensor | None = None
        self.budget_structural = self.budget_contextual = 0

    def prepare(self, layout: CacheLayout) -> None:
        super().prepare(layout)
        if self.profile is None:
            log.warning("HACK without a calibration profile: every head is structural with the uniform budget")
            self.contextual = torch.zeros(layout.depth, layout.num_heads, dtype=torch.bool)
        else:
            self.profile.check(layout)
            self.contextual = classify_heads(self.profile.head_variance, self.contextual_fraction)
        alpha = float(self.contextual.float().mean())
        B, full = self.budget_per_head, layout.full_carried
        b_s = min(full, int(B / (alpha * self.contextual_share + 1 - alpha)))
        b_c = int((B - (1 - alpha) * b_s) / alpha) if alpha > 0 else 0
        self.budget_structural, self.budget_contextual = b_s, max(1, min(full, b_c)) if alpha > 0 else 0
        self.caps_LH = torch.where(self.contextual, self.budget_contextual, self.budget_structural)
        self.min_cap_L = self.caps_LH.min(dim=1).values.tolist()  # on the host: the per-layer checks read no tensor
        self.init_tokens = layout.schedule.tokens_through(self.init_scales - 1)

    def wants_selection(self, layer: int, start: int, n: int, max_key_len: int) -> bool:
        return max_key_len > self.min_cap_L[layer]

    def select(self, ctx: SelectionContext) -> Selection | None:
        caps_H = self.caps_LH[ctx.layer].to(ctx.valid_BHP.device)
        if ctx.max_prefix + ctx.n_cur <= self.min_cap_L[ctx.layer]:
            return None
        idx = uniform_queries(ctx.n_cur, self.num_queries, ctx.q_BHnD.device)
        scores = ctx.observation_scores(idx).masked_fill(~ctx.valid_BHP, 0.0)
        tier = 2.0 * (ctx.pos_BHP < self.init_tokens) + 1.0 * ctx.is_current_BHP  # init > recent scale > middle
        structural = scores + tier * (idx.numel() + 1)
        contextual = self.contextual[ctx.layer].to(scores.device).view(1, -1, 1)
        priority = torch.where(contextual, scores, structural)
        keep = rank_keep(priority, caps_H.view(1, -1), ctx.valid_BHP)
        last_stored = ctx.schedule is not None and ctx.scale_index == ctx.schedule.num_scales - 2
        if self.merge and last_stored:
            evict = ctx.valid_BHP & ~keep & contextual
            if bool(evict.any()):
                k, v = merge_evicted(ctx.k_cand_BHPD, ctx.v_cand_BHPD, keep, evict)
                return Selection(keep, k_BHPD=k, v_BHPD=v)
        return Selection(keep)

    def __repr__(self) -> str:
        return (f"HACK(budget={self.budget}, calibrated={self.profile is not None}, "
                f"contextual_fraction={self.contextual_fraction}, contextual_share={self.contextual_share}, "
                f"merge={self.merge})")
