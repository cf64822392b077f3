"""Calibration of ScaleKV/HACK for a VAR model: one full-cache next-scale sampling run whose attention statistics
become a :class:`~var.kernels.policies.calibration.CalibrationProfile` (recorded by
:func:`~var.kernels.policies.calibration.record_profile`)."""
from __future__ import annotations

import torch

from var.kernels.policies.base import CacheLayout
from var.kernels.policies.calibration import CalibrationProfile, record_profile
from var.samplers.next_scale import sample_next_scale


def calibrate(model, tokenizer, labels, *, cfg: float = 1.5, seed: int = 0, topk_frac: float = 0.1,
              **sampler_kwargs) -> CalibrationProfile:
    """Sample ``labels`` (a handful of class ids: the "prompts") with the full cache and return the profile."""
    device = model.head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    labels_list = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)

    def run(policy):
        sample_next_scale(model, tokenizer, labels, cfg=cfg, generator=generator, decode=False, cache=policy,
                          **sampler_kwargs)

    return record_profile(CacheLayout.of(model), run, topk_frac=topk_frac,
                          meta={"labels": labels_list, "cfg": cfg, "seed": seed})
