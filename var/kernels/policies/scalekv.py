"""ScaleKV (Li et al., 2025): scale-aware layer budgets (drafters vs refiners) + SnapKV-style selection.

Variant implemented (documented choices):

* **Classification** (paper): ASI from a calibration profile, z-scored over layers within each scale; all
  ``(layer, scale)`` pairs of scales ``1..K-1`` are pooled and the ``drafters_per_scale * (K-1)`` lowest become
  drafters. The role at scale ``k`` sets the budget of the cache carried *into* scale ``k`` (compressed after
  scale ``k-1``).
* **Budget allocation** (released code; ``refiner_start`` / ``refiner_decay`` give the paper's linear refiner
  decay ``B_r(j) = B_r(0) - delta * j`` instead, as fractions of ``B``): at every compressed scale the per-layer average is exactly the
  uniform budget ``B``; drafters keep up to the whole cache, ``B_d = min(S, (L*B - N_r*r_min) / N_d)``, and the
  refiners share the rest, ``B_r = (L*B - N_d*B_d) / N_r``, with the refiner floor ``r_min = min(window, B // 2)``
  (our choice: the released budgets give refiners ~30% of B; a floor of ``min(B, window)`` would leave nothing
  for the drafters whenever ``B <= window``, as on small models). No compression while the cache holds ``<= B``
  tokens (the code's ``base_capacity``).
* **Selection** (paper): observation window = centre tokens of a ``sqrt(W) x sqrt(W)`` grid over the current
  map (the last ``W`` tokens for maps smaller than the grid); scores = *softmax* attention of the window's real
  (normalised, scaled) queries summed over the window (``scores="logits"``: summed raw logits, as the release);
  the window's own columns are taken out before the 1-D **max**-pool with kernel 5 (the release sets them to
  -inf, so a token next to a window token does not inherit its score; the paper says average pooling); per-head
  top-k of ``cap - W`` plus the window, kept in sequence order; when ``cap <= W`` the window is not forced and the
  top-``cap`` pooled scores are kept (otherwise only current-scale tokens, chosen by position, would survive).

Without a profile every layer is a refiner with the uniform budget (logged): grid-window SnapKV.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from var.errors import ConfigError
from var.kernels.selection import Selection, SelectionContext
from var.kernels.policies.base import (CacheLayout, CompressionPolicy, grid_window, pool_outside_window,
                                       rank_keep, window_priority)
from var.kernels.policies.calibration import CalibrationProfile

log = logging.getLogger(__name__)
SCORES = ("softmax", "logits")  # the paper's softmax attention, or the release's summed raw logits


def default_drafters_per_scale(depth: int) -> int:
    """Drafter layers per scale: ``ceil(depth / 16)``, as the released budgets mostly have (Infinity-8B's 40 blocks:
    3 at every compressed scale; Infinity-2B's 32: 2 at the release's scales 9-12, but 1 at scale 13)."""
    return max(1, math.ceil(depth / 16))


@dataclass(frozen=True)
class ReleasedBudgets:
    """A budget file of the ScaleKV release (``budgets/{2b,8b}_10%_budget.json``): for some scales, which blocks
    are drafters (flag 1) and the per-layer caps of drafters (``Max``) and refiners (``Min``).

    The release's entry ``"Scale k"`` caps the cache carried into the ``k``-th scale (1-based; its
    ``cache_sizes[scale_ind + 2]``), i.e. ``caps[k - 2]`` here; scales without an entry are not compressed (the
    released files name every scale whose cache exceeds the release's ``base_capacity`` of 650 tokens, 9-13).

    The release reads only the block flags, ``Max`` and ``Min`` (``enable_scale_kv_{2b,8b}.py``); its two other
    fields are checked here, not used: ``High`` is the number of drafters (must match the flags) and ``Limit`` the
    tokens a drafter holds when that scale's compression runs (the previous scale's ``Max`` plus the scale's
    tokens, on the 1:1 1024 px schedule the file was made for): ``Max <= Limit``, and a schedule whose drafters
    hold other counts is reported (the caps are then absolute token counts made for another schedule)."""

    depth: int
    entries: dict  # scale index si (cache kept after scale si) -> (drafter blocks, drafter cap, refiner cap)
    limits: dict = field(default_factory=dict)  # si -> the file's Limit (where given)

    @classmethod
    def load(cls, path) -> "ReleasedBudgets":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read a ScaleKV budget file from {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a ScaleKV budget file is a JSON object of 'Scale <k>' entries")
        return cls.parse(raw, source=str(path))

    @classmethod
    def parse(cls, raw: dict, source: str = "budget file") -> "ReleasedBudgets":
        entries, limits, depth = {}, {}, None
        for key, scale in raw.items():
            k = key[len("Scale "):] if key.startswith("Scale ") else ""
            if not k.isdigit() or int(k) < 2 or not isinstance(scale, dict):
                raise ConfigError(f"{source}: unexpected entry {key!r} (want 'Scale <k>' objects, k >= 2)")
            blocks = sorted(int(name.split()[1]) for name in scale if name.startswith("Block "))
            if blocks != list(range(len(blocks))) or not blocks:
                raise ConfigError(f"{source}: {key} must list 'Block 0'..'Block <L-1>'")
            if depth not in (None, len(blocks)):
                raise ConfigError(f"{source}: {key} has {len(blocks)} blocks, other scales {depth}")
            depth = len(blocks)
            missing = {"Max", "Min"} - set(scale)
            if missing:
                raise ConfigError(f"{source}: {key} lacks {sorted(missing)}")
            flags = {b: scale[f"Block {b}"] for b in blocks}
            if any(flag not in (0, 1) for flag in flags.values()):
                raise ConfigError(f"{source}: {key}: block flags must be 0 (refiner) or 1 (drafter)")
            drafters = frozenset(b for b, flag in flags.items() if flag)
            drafter_cap, refiner_cap = int(scale["Max"]), int(scale["Min"])
            if "High" in scale and scale["High"] != len(drafters):
                raise ConfigError(f"{source}: {key} says High={scale['High']} drafters but flags {len(drafters)}")
            if "Limit" in scale and drafters and drafter_cap > scale["Limit"]:
                raise ConfigError(f"{source}: {key}: Max={drafter_cap} exceeds Limit={scale['Limit']}")
            if min(drafter_cap, refiner_cap) < 1:
                raise ConfigError(f"{source}: {key}: caps must be >= 1 token (Max={drafter_cap}, Min={refiner_cap})")
            si = int(k) - 2
            entries[si] = (drafters, drafter_cap, refiner_cap)
            if "Limit" in scale:
                limits[si] = int(scale["Limit"])
        if depth is None:
            raise ConfigError(f"{source}: no 'Scale <k>' entries")
        return cls(depth, entries, limits)

    def check_depth(self, depth: int, source: str = "the budget file") -> None:
        """A :class:`ConfigError` unless the file is for a model of ``depth`` layers."""
        if depth != self.depth:
            raise ConfigError(f"{source} is for {self.depth} layers, the model has {depth}")

    def caps(self, layout: CacheLayout) -> list[list[int]]:
        """``caps[si][l]`` for ``layout`` (its depth must match the file's, and it must have every named scale)."""
        self.check_depth(layout.depth)
        num_scales = layout.schedule.num_scales
        if max(self.entries) > num_scales - 2:
            raise ConfigError(f"the budget file names Scale {max(self.entries) + 2}, but a schedule of {num_scales} "
                              f"scales carries a cache into scales 2..{num_scales} only")
        caps, off = [], []
        for si in range(num_scales):
            full = layout.schedule.tokens_through(si)
            if si not in self.entries:
                caps.append([full] * layout.depth)
                continue
            drafters, drafter_cap, refiner_cap = self.entries[si]
            if drafters and si in self.limits:  # what a drafter holds here: its previous cap + this scale's tokens
                held = max(caps[si - 1][l] if si else 0 for l in drafters) + layout.schedule.lengths[si]
                if held != self.limits[si]:
                    off.append(f"Scale {si + 2}: {held} vs Limit {self.limits[si]}")
            caps.append([min(full, drafter_cap if l in drafters else refiner_cap) for l in range(layout.depth)])
        if off:
            log.warning("the ScaleKV budget file was made for another schedule (drafters hold %s); its caps are "
                        "used as absolute token counts", ", ".join(off))
        return caps


def classify_drafters(asi: list, drafters_per_scale: int) -> list[set]:
    """Drafter layers per scale from ``asi[l][k]`` (None where undefined): lowest pooled per-scale z-scores."""
    depth, num_scales = len(asi), len(asi[0]) if asi else 0
    pooled = []
    scored_scales = 0
    for k in range(num_scales):
        column = [asi[l][k] for l in range(depth)]
        if any(a is None for a in column):
            continue
        scored_scales += 1
        mu = statistics.fmean(column)
        sigma = statistics.pstdev(column)
        pooled += [((a - mu) / (sigma + 1e-8), l, k) for l, a in enumerate(column)]
    pooled.sort()
    drafters = [set() for _ in range(num_scales)]
    for _, l, k in pooled[:drafters_per_scale * scored_scales]:
        drafters[k].add(l)
    return drafters


def allocate(layout: CacheLayout, budget_tokens: int, drafters: list[set], window: int, *,
             refiner_start: float | None = None, refiner_decay: float = 0.0) -> list[list[int]]:
    """``caps[si][l]``: tokens layer ``l`` keeps after scale ``si`` (its role at scale ``si + 1`` decides).

    Default (the released budget files): drafters take up to the whole cache and refiners the rest. With
    ``refiner_start`` (the paper's linear refiner decay): at the ``j``-th compressed scale the refiners keep
    ``B_r(j) = (refiner_start - j * refiner_decay) * B`` (never below the floor ``min(window, B // 2)``) and the
    drafters the rest, at most the whole cache (then the refiners get what the drafters cannot take). Either way
    the per-layer average is the uniform budget ``B`` at every compressed scale."""
    depth, num_scales = layout.depth, layout.schedule.num_scales
    r_min = min(window, max(1, budget_tokens // 2))
    caps, compressed = [], 0
    for si in range(num_scales):
        S = layout.schedule.tokens_through(si)
        role = drafters[si + 1] if si + 1 < num_scales else set()
        n_d = len(role)
        if S <= budget_tokens or n_d in (0, depth):
            caps.append([min(S, budget_tokens)] * depth)
            compressed += S > budget_tokens
            continue
        total, n_r = depth * budget_tokens, depth - n_d
        b_r = r_min
        if refiner_start is not None:
            b_r = max(r_min, min(budget_tokens, int((refiner_start - compressed * refiner_decay) * budget_tokens)))
        b_d = min(S, (total - n_r * b_r) // n_d)
        b_r = (total - n_d * b_d) // n_r  # what the drafters cannot take (their whole cache) goes to the refiners
        caps.append([b_d if l in role else b_r for l in range(depth)])
        compressed += 1
    return caps


class ScaleKV(CompressionPolicy):
    """``ScaleKV(budget=0.1, profile=...)``: budget is a fraction of the cache carried into the last scale.

    ``released_budgets``: a budget file of the release (path or :class:`ReleasedBudgets`) whose per-layer caps and
    drafters are used as they are (no profile needed); ``drafters_per_scale`` defaults to
    :func:`default_drafters_per_scale`."""

    def __init__(self, budget: float, *, profile=None, drafters_per_scale: int | None = None, window: int = 16,
                 kernel: int = 5, pooling: str = "max", scores: str = "softmax",
                 released_budgets: ReleasedBudgets | str | Path | None = None, refiner_start: float | None = None,
                 refiner_decay: float = 0.0, **kw):
        super().__init__(budget, **kw)
        if refiner_start is not None and not 0 < refiner_start <= 1:
            raise ConfigError(f"refiner_start must be in (0, 1] (a fraction of the uniform budget), got {refiner_start}")
        if not (refiner_decay >= 0 and math.isfinite(refiner_decay)) or (refiner_decay and refiner_start is None):
            raise ConfigError(f"refiner_decay must be a finite fraction >= 0 of the uniform budget, with "
                              f"refiner_start, got {refiner_decay} (refiner_start {refiner_start})")
        self.refiner_start, self.refiner_decay = refiner_start, refiner_decay
        self.profile = CalibrationProfile.coerce(profile)
        if released_budgets is not None and not isinstance(released_budgets, ReleasedBudgets):
            released_budgets = ReleasedBudgets.load(released_budgets)
        self.released_budgets = released_budgets
        if drafters_per_scale is not None and (isinstance(drafters_per_scale, bool) or drafters_per_scale < 0):
            raise ConfigError(f"drafters_per_scale must be >= 0, got {drafters_per_scale!r}")
        if pooling not in ("max", "avg"):
            raise ConfigError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        if scores not in SCORES:
            raise ConfigError(f"scores must be one of {SCORES}, got {scores!r}")
        self.scores = scores
        self.drafters_per_scale, self.window, self.kernel, self.pooling = drafters_per_scale, window, kernel, pooling
        self.drafters: list[set] = []
        self.caps: list[list[int]] = []
        self.floor = 0

    def prepare(self, layout: CacheLayout) -> None:
        super().prepare(layout)
        num_scales = layout.schedule.num_scales
        if self.released_budgets is not None:  # the release's own per-layer caps (and drafters) replace ours
            self.caps = self.released_budgets.caps(layout)
            self.drafters = [set(self.released_budgets.entries.get(si - 1, (set(),))[0]) for si in range(num_scales)]
            self.floor = min(min(self.caps[si]) for si in self.released_budgets.entries)  # fewer keys: never cut
            return
        if self.profile is None:
            log.warning("ScaleKV without a calibration profile: every layer gets the uniform budget")
            self.drafters = [set() for _ in range(num_scales)]
        else:
            self.profile.check(layout)
            per_scale = self.drafters_per_scale
            if per_scale is None:
                per_scale = default_drafters_per_scale(layout.depth)
            self.drafters = classify_drafters(self.profile.asi, min(per_scale, layout.depth))
        self.caps = allocate(layout, self.budget_per_head, self.drafters, self.window,
                             refiner_start=self.refiner_start, refiner_decay=self.refiner_decay)
        self.floor = self.budget_per_head  # no layer keeps fewer tokens than this before it is compressed

    def _cap(self, layer: int, si: int | None) -> int:
        return self.caps[si][layer] if si is not None else self.budget_per_head

    def wants_selection(self, layer: int, start: int, n: int, max_key_len: int) -> bool:
        return max_key_len > self.floor and max_key_len > self._cap(layer, self.scale_index(start, n))

    def select(self, ctx: SelectionContext) -> Selection | None:
        key_len = ctx.max_prefix + ctx.n_cur
        if key_len <= self.floor:
            return None
        si = ctx.scale_index
        cap = self._cap(ctx.layer, si)
        if key_len <= cap:
            return None
        idx = grid_window(ctx, self.window)
        raw = ctx.observation_scores(idx, softmax=self.scores == "softmax")
        scores = pool_outside_window(raw, ctx, idx, cap, self.kernel, self.pooling)
        priority = window_priority(scores, ctx, idx, cap)
        return Selection(rank_keep(priority, cap, ctx.valid_BHP))

    def __repr__(self) -> str:
        return (f"ScaleKV(budget={self.budget}, calibrated={self.profile is not None}, window={self.window}, "
                f"kernel={self.kernel}, pooling={self.pooling!r}, scores={self.scores!r})")
