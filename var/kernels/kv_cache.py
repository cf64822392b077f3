"""The full, preallocated KV cache that the models take explicitly (no global caching toggles).

Per layer it holds ``k, v: [B, H, capacity, D]``. A forward pass over ``l`` new tokens writes them at
``[length, length + l)`` in every layer, attends over ``[0, length + l)`` and then the caller commits them
with :meth:`KVCache.advance`. :meth:`truncate` rolls back uncommitted or rejected positions (speculative
decoding). :meth:`KVCache.attend_at` is the static-shape variant for compiled / CUDA-graph decode steps: it writes at
slots held in a device tensor and attends over the whole buffer under a mask, so it reads no host state. Compressed caches (ScaleKV, HACK, ...) implement the same ``attend / advance / truncate / nbytes``
interface, so the models never know which cache they are given.

Memory is reported the same way by every cache: :meth:`nbytes` = bytes allocated (every tensor the cache holds),
:meth:`live_nbytes` = bytes of K/V holding live tokens (tokens a later pass can attend to), and the peaks of both
over the cache's life (:meth:`peak_nbytes`, :meth:`peak_live_nbytes`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var.errors import ConfigError


class SequenceCursor:
    """The write pointer shared by the dense and the compressed caches: ``length`` committed positions out of
    ``capacity``; a pass writes ``[length, length + l)``, :meth:`advance` commits them, :meth:`truncate` rolls back."""

    length: int
    capacity: int

    def span(self, num_new: int) -> tuple[int, int]:
        """``(start, end)`` of ``num_new`` new positions; raises when they do not fit."""
        start, end = self.length, self.length + num_new
        if end > self.capacity:
            raise ConfigError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        return start, end

    def advance(self, num_tokens: int) -> None:
        """Commit the ``num_tokens`` tokens written by the last forward pass."""
        self.length += num_tokens

    def check_truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot truncate a cache of length {self.length} to {length}")


class KVCache(SequenceCursor):
    """Preallocated dense K/V buffers shared by all layers' write pointer ``length``
    (a :class:`~var.kernels.protocols.DenseCache`)."""

    supports_block_prefill = True  # attends densely over whatever one pass writes, under the caller's mask

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, capacity: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 k_dtype: torch.dtype | None = None):
        shape = (batch_size, num_heads, capacity, head_dim)
        # zeros, not empty: attend_at reads every slot under a mask, and a masked NaN would still poison P @ V
        self.k = [torch.zeros(shape, dtype=k_dtype or dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0
        self._peak_length = 0
        # [B, P] bool or None: which of the first P slots later queries may see (a padded caption prefix); the
        # model that wrote the prefix sets it and folds it into its attention masks
        self.prefix_mask: torch.Tensor | None = None

    def advance(self, num_tokens: int) -> None:
        super().advance(num_tokens)
        self._peak_length = max(self._peak_length, self.length)

    def attend(self, layer: int, q_BHlD: torch.Tensor, k_BHlD: torch.Tensor, v_BHlD: torch.Tensor, *,
               scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Write the new keys/values of ``layer`` and return attention of ``q`` over all cached + new tokens.

        ``attn_mask`` (bool, True = attend, or additive float) must broadcast to ``[B, H, l, length + l]``;
        None means every new token sees every cached and new token (one VAR scale).
        """
        start, end = self.span(q_BHlD.shape[2])
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache[:, :, start:end] = k_BHlD
        v_cache[:, :, start:end] = v_BHlD
        return _attention(q_BHlD, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask, scale).to(v_BHlD.dtype)

    def attend_at(self, layer: int, q_BHlD: torch.Tensor, k_BHlD: torch.Tensor, v_BHlD: torch.Tensor,
                  slots_l: torch.Tensor, *, scale: float, attn_mask: torch.Tensor) -> torch.Tensor:
        """Static-shape :meth:`attend` (compiled / CUDA-graph decode steps): write the new K/V at cache slots
        ``slots_l`` (long ``[l]`` on the cache's device; the caller keeps them in range) and attend over the whole
        buffer under ``attn_mask`` (bool, True = attend, broadcast to ``[B, H, l, capacity]``; it must hide every slot
        not written yet). Neither reads nor moves ``length``: the caller advances the cache."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache.index_copy_(2, slots_l, k_BHlD.to(k_cache.dtype))
        v_cache.index_copy_(2, slots_l, v_BHlD.to(v_cache.dtype))
        return _attention(q_BHlD, k_cache, v_cache, attn_mask, scale).to(v_BHlD.dtype)

    def at_slots(self, slots_l: torch.Tensor) -> "SlotWriter":
        """This cache seen by one static-shape pass that writes at ``slots_l`` (see :meth:`attend_at`)."""
        return SlotWriter(self, slots_l)

    def clear(self) -> None:
        """:meth:`reset` and zero the buffers (a reused cache then holds no stale value, e.g. a NaN, in masked slots)."""
        self.reset()
        for t in self.k + self.v:
            t.zero_()

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` tokens (later positions are overwritten by the next write)."""
        self.check_truncate(length)
        self.length = length

    def reset(self) -> None:
        self.length = 0
        self._peak_length = 0
        self.prefix_mask = None

    def nbytes(self) -> int:
        """Bytes allocated: the preallocated K/V buffers of all layers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def live_nbytes(self) -> int:
        """Bytes of K/V holding the committed tokens."""
        return self._token_nbytes() * self.length

    def peak_nbytes(self) -> int:
        """Largest allocation over the cache's life (constant: the buffers are preallocated)."""
        return self.nbytes()

    def peak_live_nbytes(self) -> int:
        """Largest :meth:`live_nbytes` over the cache's life (since the last :meth:`reset`)."""
        return self._token_nbytes() * self._peak_length

    def _token_nbytes(self) -> int:
        return sum(t[:, :, :1].numel() * t.element_size() for t in self.k + self.v)


def _attention(q_BHlD, k_all, v_all, attn_mask, scale: float) -> torch.Tensor:
    """SDPA over cached K/V read in their stored dtype: q is rounded to K's dtype, never K up."""
    q_BHlD = q_BHlD.to(k_all.dtype)
    if v_all.dtype != k_all.dtype:  # SDPA takes one dtype: a mixed cache (fp32 K, bf16 V) computes in the wider
        dtype = torch.promote_types(k_all.dtype, v_all.dtype)
        q_BHlD, k_all, v_all = q_BHlD.to(dtype), k_all.to(dtype), v_all.to(dtype)
    return F.scaled_dot_product_attention(q_BHlD, k_all, v_all, attn_mask=attn_mask, scale=scale)


class SlotWriter:
    """A :class:`KVCache` as seen by one static-shape pass: ``attend`` writes at the device-side ``slots_l``
    (:meth:`KVCache.attend_at`), so model layers written for ``cache.attend`` run unchanged."""

    def __init__(self, cache: KVCache, slots_l: torch.Tensor):
        self.cache, self.slots_l = cache, slots_l

    def attend(self, layer: int, q_BHlD, k_BHlD, v_BHlD, *, scale: float, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.cache.attend_at(layer, q_BHlD, k_BHlD, v_BHlD, self.slots_l, scale=scale, attn_mask=attn_mask)


class FullCache:
    """The default cache policy: keep every token (``cache=FullCache()`` or ``cache=None`` in the samplers)."""

    def new_cache(self, model, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> KVCache:
        return model.new_kv_cache(batch_size, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return "FullCache()"
