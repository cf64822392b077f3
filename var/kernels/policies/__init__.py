"""KV-cache compression policies, passed to the samplers as ``cache=ScaleKV(budget=0.1)`` and the like."""
from var.kernels.policies.base import CacheLayout, CompressionPolicy
from var.kernels.policies.baselines import H2O, PyramidKV, SnapKV, StreamingLLM
from var.kernels.policies.calibration import CalibrationProfile, bundled_profile
from var.kernels.policies.hack import HACK
from var.kernels.policies.scalekv import ScaleKV

__all__ = ["CacheLayout", "CalibrationProfile", "CompressionPolicy", "H2O", "HACK", "PyramidKV", "ScaleKV", "SnapKV",
           "StreamingLLM", "bundled_profile"]
