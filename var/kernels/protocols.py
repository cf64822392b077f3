"""The interfaces between models, samplers, caches and compression policies, as ``typing.Protocol`` classes.

* :class:`AttentionCache`: what a model's attention takes (:class:`~var.kernels.KVCache`,
  :class:`~var.kernels.CompressedKVCache`, wrappers).
* :class:`DenseCache`: an :class:`AttentionCache` whose K/V are preallocated ``[B, H, capacity, D]`` buffers that a
  sampler may write into (SJD moves accepted window K/V there): :func:`require_dense_cache` checks it.
* :class:`CachePolicy`: what the samplers' ``cache=`` argument takes (``FullCache()``, ``ScaleKV(...)``, ...).
* :class:`SelectionPolicy`: what :class:`~var.kernels.CompressedKVCache` asks of its policy after each layer.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from var.errors import UnsupportedCacheError
from var.kernels.selection import Selection, SelectionContext


@runtime_checkable
class AttentionCache(Protocol):
    """A KV cache a model attends through: ``length`` committed of ``capacity`` positions."""

    length: int
    capacity: int
    supports_block_prefill: bool  # one masked pass over several VAR scales attends as the per-scale passes would

    def attend(self, layer: int, q_BHlD: torch.Tensor, k_BHlD: torch.Tensor, v_BHlD: torch.Tensor, *,
               scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def advance(self, num_tokens: int) -> None: ...

    def truncate(self, length: int) -> None: ...

    def reset(self) -> None: ...

    def nbytes(self) -> int: ...


@runtime_checkable
class DenseCache(AttentionCache, Protocol):
    """An :class:`AttentionCache` with per-layer K/V buffers ``[B, H, capacity, D]`` (``k[layer]``, ``v[layer]``)."""

    k: list
    v: list


@runtime_checkable
class CachePolicy(Protocol):
    """Builds one cache per model and batch; never changes itself (a policy object serves any number of models)."""

    def new_cache(self, model, batch_size: int, *, dtype: torch.dtype | None = None,
                  device=None) -> AttentionCache: ...


@runtime_checkable
class SelectionPolicy(Protocol):
    """Decides, per layer, which of (kept prefix + new tokens) a compressed cache keeps."""

    tracks_scores: bool  # the cache keeps an accumulated score per kept token for it (H2O)

    def wants_selection(self, layer: int, start: int, n: int, max_key_len: int) -> bool: ...

    def select(self, ctx: SelectionContext) -> Selection | None: ...


def require_dense_cache(cache, sampler: str) -> DenseCache:
    """``cache`` if it is a :class:`DenseCache`, else :class:`~var.errors.UnsupportedCacheError` naming ``sampler``."""
    if not isinstance(cache, DenseCache):
        raise UnsupportedCacheError(f"{sampler} writes into the dense K/V buffers of its cache (cache.k / cache.v); "
                                    f"the model gave it a {type(cache).__name__}")
    return cache
