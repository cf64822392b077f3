"""KV caches and attention kernels (PyTorch references; Triton fast paths are imported lazily)."""
from var.kernels.kv_cache import FullCache, KVCache

__all__ = ["FullCache", "KVCache"]
