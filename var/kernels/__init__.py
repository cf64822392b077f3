"""KV caches and attention kernels (PyTorch references; Triton fast paths are imported lazily)."""
from var.kernels.compressed_cache import CompressedKVCache
from var.kernels.kv_cache import FullCache, KVCache
from var.kernels.policies import H2O, HACK, CalibrationProfile, ScaleKV, SnapKV, StreamingLLM, bundled_profile
from var.kernels.protocols import AttentionCache, CachePolicy, DenseCache, SelectionPolicy
from var.kernels.ragged_attention import ragged_attention, ragged_attention_reference

__all__ = ["AttentionCache", "CachePolicy", "DenseCache", "SelectionPolicy", "CalibrationProfile", "CompressedKVCache", "FullCache", "H2O", "HACK", "KVCache", "ScaleKV", "SnapKV",
           "StreamingLLM", "bundled_profile", "ragged_attention", "ragged_attention_reference"]


def __getattr__(name: str):
    """``var.kernels.calibrate`` moved to :func:`var.samplers.calibrate` (it samples; kernels never import samplers):
    the old name resolves on access, with a DeprecationWarning, for one release."""
    if name == "calibrate":
        import importlib
        import warnings
        warnings.warn("var.kernels.calibrate moved to var.samplers.calibrate", DeprecationWarning, stacklevel=2)
        return importlib.import_module("var.samplers.calibration").calibrate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
