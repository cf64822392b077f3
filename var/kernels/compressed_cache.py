"""A KV cache that keeps, per layer and per head, a variable number of tokens chosen by a compression policy.

Per layer it holds a head-major ragged pool (see :mod:`var.kernels.ragged_attention`)::

    k_pool [T, D] (k_dtype), v_pool [T, D] (dtype), pos_pool [T] int32 (each kept token's position in the
    sequence), seg_start/seg_len [B*H] int32, and score_pool [T] float32 for policies that accumulate
    attention scores (H2O).

``attend(layer, q, k, v, scale=)`` computes attention of the new tokens over (the layer's kept prefix + the new
tokens) with the dispatched kernel, then asks the policy which of (prefix + new) tokens to keep and compacts the
layer right away, so at most one layer's fresh scale is held uncompressed at a time. It implements the
interface of :class:`~var.kernels.KVCache` (``attend / advance / truncate / reset / nbytes``), so models and
samplers take either. With no policy, or a policy that keeps everything, the attention inputs are the same values
as the full cache's and the results match it exactly.

The tokens of a write that reaches ``capacity`` (VAR's last scale) are attended to but not stored: nothing can
attend to them later. ``keep_last_scale=True`` stores them anyway (e.g. to inspect the final cache).
"""
from __future__ import annotations

import torch

from var.errors import ConfigError
from var.kernels.compaction import gather_rows, kept_rows, segment_starts
from var.kernels.kv_cache import SequenceCursor
from var.kernels.protocols import SelectionPolicy
from var.kernels.ragged_attention import gather_prefix, ragged_attention
from var.kernels.selection import NewTokens, Selection, SelectionContext
from var.utils.scales import ScaleSchedule


class CompressedKVCache(SequenceCursor):
    """Ragged per-head KV cache driven by a compression policy (a :class:`~var.kernels.protocols.SelectionPolicy`;
    None = keep everything)."""

    supports_block_prefill = False  # a policy selects per VAR scale: one write must be one scale

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, *, capacity: int,
                 policy=None, schedule: ScaleSchedule | None = None, dtype: torch.dtype = torch.float32,
                 k_dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 backend: str | None = None, keep_last_scale: bool = False):
        if min(num_layers, batch_size, num_heads, head_dim, capacity) <= 0:
            raise ConfigError(f"cache dimensions must be positive: layers {num_layers}, batch {batch_size}, "
                              f"heads {num_heads}, head_dim {head_dim}, capacity {capacity}")
        self.num_layers, self.batch_size, self.num_heads, self.head_dim = num_layers, batch_size, num_heads, head_dim
        self.capacity = capacity
        if policy is not None and not isinstance(policy, SelectionPolicy):
            raise ConfigError(f"policy {type(policy).__name__} lacks the SelectionPolicy interface "
                              "(tracks_scores, wants_selection, select)")
        self.policy = policy
        self.schedule = schedule  # lets policies see which scale a write is
        self.k_dtype, self.v_dtype = k_dtype or dtype, dtype
        self.device = torch.device(device)
        self.backend = backend
        self.keep_last_scale = keep_last_scale
        self.tracks_scores = policy is not None and bool(policy.tracks_scores)
        self.reset()

    # ---- state ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        BH, D, dev = self.batch_size * self.num_heads, self.head_dim, self.device
        L = self.num_layers
        self.k_pool = [torch.empty(0, D, dtype=self.k_dtype, device=dev) for _ in range(L)]
        self.v_pool = [torch.empty(0, D, dtype=self.v_dtype, device=dev) for _ in range(L)]
        self.pos_pool = [torch.empty(0, dtype=torch.int32, device=dev) for _ in range(L)]
        self.score_pool = [torch.empty(0, dtype=torch.float32, device=dev) for _ in range(L)] \
            if self.tracks_scores else None
        self.seg_start = [torch.zeros(BH, dtype=torch.int32, device=dev) for _ in range(L)]
        self.seg_len = [torch.zeros(BH, dtype=torch.int32, device=dev) for _ in range(L)]
        self._uniform: list[int | None] = [0] * L  # every head holds this many rows, or None (ragged)
        self._max_len: list[int] = [0] * L  # max(seg_len) per layer, mirrored on the host: no read-back to size pads
        self.length = 0
        self._stored_until = self.capacity  # positions >= this were attended to but not stored
        self._peak = 0
        self._peak_live = 0
        self.selections = 0  # policy decisions that were made (compressions)

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (what :meth:`nbytes` counts)."""
        tensors = self.k_pool + self.v_pool + self.pos_pool + self.seg_start + self.seg_len
        return tensors + (self.score_pool or [])

    def nbytes(self) -> int:
        """Bytes allocated: all tensors held, K/V pools plus the index metadata (positions, segments, scores)."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())

    def kv_nbytes(self) -> int:
        """Bytes of the kept K and V only (the quantity papers report)."""
        return sum(t.numel() * t.element_size() for t in self.k_pool + self.v_pool)

    def live_nbytes(self) -> int:
        """Bytes of K/V holding live tokens: the kept ones (the pools are exactly their size)."""
        return self.kv_nbytes()

    def peak_nbytes(self) -> int:
        """Largest allocation seen, including one layer's uncompressed new tokens during :meth:`attend`."""
        return max(self._peak, self.nbytes())

    def peak_live_nbytes(self) -> int:
        """Largest :meth:`live_nbytes` seen since the last :meth:`reset`."""
        return max(self._peak_live, self.live_nbytes())

    def lengths(self, layer: int) -> torch.Tensor:
        """Kept tokens per (batch row, head) of ``layer``: ``[B, H]`` int32."""
        return self.seg_len[layer].view(self.batch_size, self.num_heads)

    def kept_tokens(self) -> int:
        """Kept tokens summed over layers, batch rows and heads."""
        return sum(p.shape[0] for p in self.pos_pool)

    # ---- the KVCache interface ---------------------------------------------------------------------------------
    def attend(self, layer: int, q_BHlD: torch.Tensor, k_BHlD: torch.Tensor, v_BHlD: torch.Tensor, *,
               scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend the new tokens over the kept prefix and themselves, then store the survivors of the policy."""
        if attn_mask is not None:
            raise ConfigError("CompressedKVCache does not take attn_mask: a VAR scale attends to everything kept")
        B, H, n, D = q_BHlD.shape
        if (B, H, D) != (self.batch_size, self.num_heads, self.head_dim):
            raise ConfigError(f"attend got q {tuple(q_BHlD.shape)}, cache is for batch {self.batch_size}, "
                              f"heads {self.num_heads}, head_dim {self.head_dim}")
        start, end = self.span(n)
        k_new, v_new = k_BHlD.to(self.k_dtype), v_BHlD.to(self.v_dtype)
        out = ragged_attention(q_BHlD, self.k_pool[layer], self.v_pool[layer], self.seg_start[layer],
                               self.seg_len[layer], k_new, v_new, scale=scale, backend=self.backend,
                               uniform_len=self._uniform[layer], max_len=self._max_len[layer])
        self._peak = max(self._peak, self.nbytes() + k_new.numel() * k_new.element_size()
                         + v_new.numel() * v_new.element_size())
        if end >= self.capacity and not self.keep_last_scale:
            self._stored_until = min(self._stored_until, start)
        else:
            self._merge(layer, q_BHlD, k_new, v_new, start, scale)
            self._peak_live = max(self._peak_live, self.live_nbytes())
        return out.to(v_BHlD.dtype)

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` sequence positions: drop every kept token at position >= length."""
        self.check_truncate(length)
        if length > self._stored_until:
            raise ConfigError(f"cannot truncate to {length}: positions >= {self._stored_until} (the last scale) "
                              f"were not stored; use keep_last_scale=True")
        metas = [self._padded_prefix_meta(layer) for layer in range(self.num_layers)]
        keeps = [valid & (pos < length) for pos, valid in metas]
        # one read-back for every layer: which ones hold a token to drop
        drops = torch.stack([(valid & ~keep).any() for (_, valid), keep in zip(metas, keeps)]).tolist()
        for layer, ((pos, _), keep, drop) in enumerate(zip(metas, keeps, drops)):
            if drop:
                self._compact(layer, Selection(keep), pos.shape[-1])  # no new tokens: only drops
        self.length = length
        self._stored_until = self.capacity

    # ---- internals -----------------------------------------------------------------------------------------
    def _padded_prefix_meta(self, layer: int):
        """Padded positions ``[B, H, P]`` (-1 where invalid) and validity of the layer's prefix."""
        B, H = self.batch_size, self.num_heads
        seg_len = self.seg_len[layer]
        max_len = self._max_len[layer]
        ar = torch.arange(max_len, device=self.device)
        valid = ar < seg_len[:, None]
        rows = torch.where(valid, self.seg_start[layer][:, None].long() + ar, 0)
        pool = self.pos_pool[layer]
        pos = pool[rows.view(-1)].view(B * H, max_len) if pool.numel() else rows.to(torch.int32)
        pos = torch.where(valid, pos, -1)
        return pos.view(B, H, max_len), valid.view(B, H, max_len)

    def _context(self, layer, q, k_new, v_new, start, scale) -> SelectionContext:
        B, H, n, D = q.shape
        k_pre, v_pre, valid_pre = gather_prefix(self.k_pool[layer], self.v_pool[layer], self.seg_start[layer],
                                            self.seg_len[layer], B, H, uniform_len=self._uniform[layer],
                                            max_len=self._max_len[layer])
        P0 = k_pre.shape[2]
        if valid_pre is None:
            valid_pre = torch.ones(B, H, P0, dtype=torch.bool, device=self.device)
        pos_pre, _ = self._padded_prefix_meta(layer)
        pos_cur = torch.arange(start, start + n, dtype=torch.int32, device=self.device).expand(B, H, n)
        acc = None
        if self.tracks_scores:
            pool = self.score_pool[layer]
            rows = torch.where(valid_pre.view(B * H, P0),
                               self.seg_start[layer][:, None].long() + torch.arange(P0, device=self.device), 0)
            acc_pre = pool[rows.view(-1)].view(B, H, P0) if pool.numel() else rows.float().view(B, H, P0) * 0
            acc = torch.cat((acc_pre.masked_fill(~valid_pre, 0), acc_pre.new_zeros(B, H, n)), dim=2)
        return SelectionContext(
            layer=layer, start=start, n_cur=n, scale=scale, q_BHnD=q,
            k_cand_BHPD=torch.cat((k_pre.to(k_new.dtype), k_new), dim=2),
            valid_BHP=torch.cat((valid_pre, valid_pre.new_ones(B, H, n)), dim=2),
            pos_BHP=torch.cat((pos_pre, pos_cur), dim=2), max_prefix=P0, acc_scores_BHP=acc,
            schedule=self.schedule, v_pre_BHPD=v_pre, v_cur_BHnD=v_new)

    def _merge(self, layer, q, k_new, v_new, start, scale) -> None:
        B, H, n, D = q.shape
        uniform = self._uniform[layer]
        selection = None
        if self.policy is not None:
            max_key_len = self._max_len[layer] + n
            if self.policy.wants_selection(layer, start, n, max_key_len):
                selection = self.policy.select(self._context(layer, q, k_new, v_new, start, scale))
        if selection is None and uniform is not None and not self.tracks_scores:
            # keep everything and the layout stays rectangular: concatenate per head
            def cat(pool, new):
                return torch.cat((pool.view(B, H, uniform, *new.shape[3:]), new), dim=2).reshape(-1, *new.shape[3:])
            pos_new = torch.arange(start, start + n, dtype=torch.int32, device=self.device)
            pos_new = pos_new.view(n, 1).expand(B, H, n, 1)
            self.k_pool[layer] = cat(self.k_pool[layer], k_new)
            self.v_pool[layer] = cat(self.v_pool[layer], v_new)
            self.pos_pool[layer] = cat(self.pos_pool[layer].unsqueeze(-1), pos_new).view(-1)
            self.seg_len[layer] = torch.full_like(self.seg_len[layer], uniform + n)
            self.seg_start[layer] = segment_starts(self.seg_len[layer])
            self._uniform[layer] = self._max_len[layer] = uniform + n
            return
        max_prefix = self._max_len[layer]
        if selection is None:
            selection = Selection(torch.ones(B, H, max_prefix + n, dtype=torch.bool, device=self.device))
        else:
            self.selections += 1
        self._compact(layer, selection, max_prefix, NewTokens(k_new, v_new, start))

    def _compact(self, layer, selection: Selection, max_prefix: int, new: NewTokens | None = None) -> None:
        """Rebuild ``layer``'s pools from the kept candidates: its padded prefix (``max_prefix`` per head) followed
        by the ``new`` tokens of this pass (None when only dropping tokens, as :meth:`truncate` does)."""
        keep_BHP, scores_BHP = selection.keep_BHP, selection.scores_BHP
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        T = self.k_pool[layer].shape[0]
        rows, new_len, cand, (lo, hi) = kept_rows(keep_BHP, self.seg_start[layer], self.seg_len[layer], max_prefix, T)
        if new is None:  # zero new tokens, so gather_rows reads the prefix only
            new = NewTokens(self.k_pool[layer].new_empty(B, H, 0, D), self.v_pool[layer].new_empty(B, H, 0, D), 0)
        n, k_cur, v_cur = new.n, new.k_BHnD, new.v_BHnD
        pos_cur = torch.arange(new.start, new.start + n, dtype=torch.int32, device=self.device).expand(B, H, n)
        bh = None
        if any(t is not None for t in (selection.k_BHPD, selection.v_BHPD, scores_BHP)):
            bh = torch.repeat_interleave(torch.arange(B * H, device=self.device), new_len.long(),
                                         output_size=rows.shape[0])  # the size is known: no read-back
        if selection.k_BHPD is not None:
            self.k_pool[layer] = selection.k_BHPD.reshape(B * H, -1, D)[bh, cand].to(self.k_dtype)
        else:
            self.k_pool[layer] = gather_rows(self.k_pool[layer], k_cur, rows)
        if selection.v_BHPD is not None:
            self.v_pool[layer] = selection.v_BHPD.reshape(B * H, -1, D)[bh, cand].to(self.v_dtype)
        else:
            self.v_pool[layer] = gather_rows(self.v_pool[layer], v_cur, rows)
        self.pos_pool[layer] = gather_rows(self.pos_pool[layer], pos_cur, rows)
        if self.tracks_scores:
            if scores_BHP is not None:
                self.score_pool[layer] = scores_BHP.reshape(B * H, -1)[bh, cand].float()
            else:
                self.score_pool[layer] = gather_rows(self.score_pool[layer],
                                                     torch.zeros(B, H, n, device=self.device), rows)
        self.seg_len[layer] = new_len
        self.seg_start[layer] = segment_starts(new_len)
        self._uniform[layer] = hi if lo == hi else None
        self._max_len[layer] = hi

    def __repr__(self) -> str:
        return (f"CompressedKVCache(layers={self.num_layers}, batch={self.batch_size}, heads={self.num_heads}, "
                f"length={self.length}, kept={self.kept_tokens()}, policy={self.policy!r})")
