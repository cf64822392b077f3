"""KV caches and attention kernels (PyTorch references; Triton fast paths are imported lazily)."""
from var.kernels.compressed_cache import CompressedKVCache
from var.kernels.kv_cache import FullCache, KVCache
from var.kernels.policies import (H2O, HACK, CalibrationProfile, ScaleKV, SnapKV, StreamingLLM, bundled_profile,
                                  calibrate)
from var.kernels.ragged_attention import ragged_attention, ragged_attention_reference

__all__ = ["CalibrationProfile", "CompressedKVCache", "FullCache", "H2O", "HACK", "KVCache", "ScaleKV", "SnapKV",
           "StreamingLLM", "bundled_profile", "calibrate", "ragged_attention", "ragged_attention_reference"]
