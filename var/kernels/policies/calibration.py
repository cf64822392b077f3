"""Offline calibration shared by ScaleKV and HACK: what one full-cache sampling run records (attention statistics).

:func:`record_profile` takes the sampling run as a callable, so kernels never import samplers; the VAR workflow is
:func:`var.samplers.calibrate` (Infinity's: :func:`var.samplers.infinity.calibrate_infinity`).

For every layer ``l`` and scale ``k >= 1`` it records ScaleKV's Attention Selectivity Index::

    ASI(l, k) = E_i[ sum_{j in current map} a_ij ] * E_i[ TopKSum_{K'} { a_ij : j in earlier scales } ]

(expectations over the current map's queries, then averaged over heads, batch rows (both CFG halves) and
calibration runs; ``K' = ceil(topk_frac * history length)``), and, at the final scale, HACK's per-head
column variance ``sum_j Var_i(a_ij)`` (variance over queries of each key's attention, summed over keys).

Profiles hold the raw statistics plus the model's signature and are saved as small JSON files; the policies derive
their classification (drafters/refiners, contextual/structural heads) from them with their own knobs.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import KVCache
from var.kernels.policies.base import CacheLayout


@dataclass
class CalibrationProfile:
    """Attention statistics of one model: ``asi[l][k]`` (None at k = 0) and ``head_variance[l][h]``."""

    model: dict
    asi: list
    head_variance: list
    meta: dict = field(default_factory=dict)

    def check(self, layout: CacheLayout) -> None:
        if self.model != layout.signature():
            raise ConfigError(f"calibration profile is for {self.model}, the model is {layout.signature()}")

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "CalibrationProfile":
        try:
            data = json.loads(Path(path).read_text())
            return cls(model=data["model"], asi=data["asi"], head_variance=data["head_variance"],
                       meta=data.get("meta", {}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"cannot read calibration profile {path}: {err}") from err

    @classmethod
    def coerce(cls, profile) -> "CalibrationProfile | None":
        """Accept a profile, a path to its JSON, or None."""
        if profile is None or isinstance(profile, cls):
            return profile
        if isinstance(profile, (str, Path)):
            return cls.load(profile)
        raise ConfigError(f"profile must be a CalibrationProfile, a JSON path or None, got {type(profile).__name__}")


BUNDLED_PROFILE_NAME = "kv_profile.json"


def bundled_profile_path() -> Path:
    """Where the calibration profile of the bundled VAR (``var/assets/var_bundled``) is shipped."""
    from var.assets import ASSETS_DIR
    return ASSETS_DIR / "var_bundled" / BUNDLED_PROFILE_NAME


def bundled_profile() -> CalibrationProfile:
    """The shipped profile of the bundled VAR: ``ScaleKV(budget=0.1, profile=bundled_profile())``, same for HACK."""
    path = bundled_profile_path()
    if not path.exists():
        raise ConfigError(f"no bundled calibration profile at {path}")
    return CalibrationProfile.load(path)


class _RecordingCache(KVCache):
    """A full cache that also accumulates the calibration statistics from the softmax of each attention."""

    supports_block_prefill = False  # the statistics are per VAR scale: one write must be one scale

    def __init__(self, layout: CacheLayout, batch_size: int, topk_frac: float, sums: dict, **kw):
        super().__init__(layout.depth, batch_size, layout.num_heads, layout.seq_len, layout.head_dim, **kw)
        self.layout, self.topk_frac, self.sums = layout, topk_frac, sums

    def attend(self, layer, q_BHlD, k_BHlD, v_BHlD, *, scale, attn_mask=None):
        out = super().attend(layer, q_BHlD, k_BHlD, v_BHlD, scale=scale, attn_mask=attn_mask)
        hist, n = self.length, q_BHlD.shape[2]
        keys = self.k[layer][:, :, :hist + n].float()
        probs = (q_BHlD.float() @ keys.transpose(-1, -2) * scale).softmax(-1)  # [B, H, n, hist + n]
        if hist > 0:
            si = self._scale_index(hist, n)
            current = probs[..., hist:].sum(-1).mean(-1)                            # [B, H]
            k_top = min(hist, max(1, math.ceil(self.topk_frac * hist)))
            history = probs[..., :hist].topk(k_top, dim=-1).values.sum(-1).mean(-1)  # [B, H]
            self.sums["asi"][layer][si] += float((current * history).mean())
            self.sums["asi_n"][layer][si] += 1
        if hist + n == self.capacity:
            var = probs.var(dim=2, unbiased=False).sum(-1).mean(0)                  # [H]
            self.sums["var"][layer] += var.double().cpu()
            self.sums["var_n"][layer] += 1
        return out

    def _scale_index(self, start: int, n: int) -> int:
        si = self.layout.schedule.scale_index(start, n)
        if si is None:
            raise ConfigError(f"calibration expects one scale per forward (got {n} tokens at position {start})")
        return si


class _RecordingPolicy:
    def __init__(self, layout, topk_frac, sums):
        self.layout, self.topk_frac, self.sums = layout, topk_frac, sums

    def new_cache(self, model, batch_size, *, dtype=None, device=None):
        param = model.head.weight
        return _RecordingCache(self.layout, batch_size, self.topk_frac, self.sums, dtype=dtype or param.dtype,
                               device=device or param.device)


def record_profile(layout: CacheLayout, run, *, topk_frac: float = 0.1, meta: dict | None = None) -> CalibrationProfile:
    """The profile of one full-cache sampling run: ``run(policy)`` must sample with ``cache=policy`` (any family
    whose model the policy's ``new_cache(model, batch)`` accepts: VAR, or Infinity at one schedule)."""
    if not 0 < topk_frac <= 1:
        raise ConfigError(f"topk_frac must be in (0, 1], got {topk_frac!r}")
    num_scales = layout.schedule.num_scales
    sums = {"asi": [[0.0] * num_scales for _ in range(layout.depth)],
            "asi_n": [[0] * num_scales for _ in range(layout.depth)],
            "var": [torch.zeros(layout.num_heads, dtype=torch.float64) for _ in range(layout.depth)],
            "var_n": [0] * layout.depth}
    run(_RecordingPolicy(layout, topk_frac, sums))
    asi = [[(s / c if c else None) for s, c in zip(row, cnt)] for row, cnt in zip(sums["asi"], sums["asi_n"])]
    variance = [(v / max(c, 1)).tolist() for v, c in zip(sums["var"], sums["var_n"])]
    return CalibrationProfile(model=layout.signature(), asi=asi, head_variance=variance,
                              meta={**(meta or {}), "topk_frac": topk_frac})
