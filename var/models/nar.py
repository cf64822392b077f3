"""NAR: next-neighbour autoregressive GPT (He et al., 2025) with a horizontal and a vertical head.

The backbone is :class:`~var.models.gpt.GPT`. NAR appends one transformer block (``layers[n_layer]``) and a second
output layer (``medusa_norm`` / ``medusa_output``, names of the released checkpoints):

* horizontal head: trunk output -> ``norm`` -> ``output``, predicts the token to the **right** of each input;
* vertical head: trunk output -> extra block -> ``medusa_norm`` -> ``medusa_output``, predicts the token **below**.

A target reachable from two inputs uses the **mean of the two heads' logits** (training and sampling alike). The
sequence stays in raster order (class token at position 0, image token ``i`` at ``1 + i``); training uses the
proximity mask: an image token at Manhattan distance ``d = row + col`` attends to the class token and to every image
token at distance ``<= d`` (both directions within its anti-diagonal). Generation runs one anti-diagonal per pass
(:mod:`var.samplers.neighbor_nar`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from var.errors import ConfigError
from var.kernels.kv_cache import KVCache
from var.models.gpt import GPT, GPTConfig, RMSNorm, TransformerBlock


def grid_distance(grid_size: int, device=None) -> torch.Tensor:
    """Manhattan distance ``row + col`` of every raster position of a ``grid x grid`` map: ``[grid^2]``."""
    r = torch.arange(grid_size, device=device)
    return (r[:, None] + r[None, :]).flatten()


def proximity_mask(grid_size: int, num_inputs: int | None = None, prefix_len: int = 1, device=None) -> torch.Tensor:
    """Boolean attention mask ``[L, L]`` (True = attend) over ``[prefix; image tokens 0 .. L - prefix - 1]``.

    Prefix tokens are causal among themselves; image queries see the whole prefix and every image token whose
    distance is ``<=`` their own. ``num_inputs`` (default ``prefix + grid^2``) truncates the sequence.
    """
    L = num_inputs or prefix_len + grid_size ** 2
    dist = grid_distance(grid_size, device)[:L - prefix_len]
    mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask[prefix_len:, prefix_len:] = dist[None, :] <= dist[:, None]
    return mask


class NAR(GPT):
    """GPT with the NAR vertical head; ``forward`` returns the mixed logits of every image token."""

    def __init__(self, config: GPTConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.layers.append(TransformerBlock(c))
        self.medusa_norm = RMSNorm(c.dim, c.norm_eps)
        self.medusa_output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.init_weights()

    @property
    def trunk_depth(self) -> int:
        return self.config.n_layer

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT's init (N(0, 0.02), zero output head) plus a zero vertical output head, as in NAR."""
        super().init_weights()
        if hasattr(self, "medusa_output") and not self.medusa_output.weight.is_meta:
            nn.init.zeros_(self.medusa_output.weight)

    def forward_heads(self, x_BlC: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None = None,
                      attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk, then both heads over input embeddings at absolute ``positions`` -> fp32 ``(right, down)`` logits
        ``[B, l, V]`` each.

        ``attn_mask`` (bool, True = attend) is required without a cache; with a cache, None means every new token
        sees all cached and all new tokens (one anti-diagonal) and the new K/V are committed after the pass.
        """
        if kv_cache is None and attn_mask is None:
            raise ConfigError("NAR needs an explicit attention mask without a cache (see proximity_mask)")
        h = self.tok_dropout(x_BlC)
        cos_sin = self.rope(positions)
        for i in range(self.trunk_depth):
            h = self.layers[i](h, cos_sin, i, kv_cache, attn_mask)
        right = self.output(self.norm(h)).float()
        h = self.layers[self.trunk_depth](h, cos_sin, self.trunk_depth, kv_cache, attn_mask)
        down = self.medusa_output(self.medusa_norm(h)).float()
        if kv_cache is not None:
            kv_cache.advance(x_BlC.shape[1])
        return right, down

    def forward_embeddings(self, x_BlC, positions, kv_cache=None, attn_mask=None):
        """GPT's single-head interface is ambiguous for NAR: use :meth:`forward_heads`."""
        raise ConfigError("NAR has two heads: call forward_heads (or forward for the mixed training logits)")

    def forward(self, labels_B: torch.Tensor, idx_BL: torch.Tensor) -> torch.Tensor:
        """Teacher forcing under the proximity mask -> mixed logits ``[B, grid^2, V]``, row ``t`` for image token
        ``t`` (``idx`` must hold the full grid; the last token is a target only)."""
        n, N = self.config.grid_size, self.seq_len
        if idx_BL.shape[1] != N:
            raise ConfigError(f"NAR teacher forcing takes the full grid of {N} tokens, got {idx_BL.shape[1]}")
        x = torch.cat((self.class_embed(labels_B), self.tok_embeddings(idx_BL[:, :-1])), dim=1)
        mask = proximity_mask(n, N, self.prefix_len, device=idx_BL.device)
        right, down = self.forward_heads(x, torch.arange(N, device=idx_BL.device), attn_mask=mask)
        return mix_training_logits(right, down, n)

    def new_kv_cache(self, batch_size: int, *, capacity: int | None = None, dtype: torch.dtype | None = None,
                     device=None, k_dtype: torch.dtype | None = None) -> KVCache:
        """One cache layer per block, the extra vertical block included; default capacity prefix + grid^2."""
        param = self.output.weight
        c = self.config
        return KVCache(c.n_layer + 1, batch_size, c.n_head, capacity or self.prefix_len + c.seq_len, c.head_dim,
                       dtype=dtype or param.dtype, device=device or param.device, k_dtype=k_dtype)


def mix_training_logits(right_BLV: torch.Tensor, down_BLV: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Per-target logits from both heads over ``[cls, x_0 .. x_{N-2}]`` (output ``p`` belongs to input ``p``).

    Target ``t = (i, j)``: the right head of its left neighbour (output ``t``; for t = 0 the class token) and the
    vertical head of its upper neighbour (output ``t - n + 1``; for t = 0 the class token), averaged when both exist.
    """
    n = grid_size
    t = torch.arange(n * n, device=right_BLV.device)
    i, j = t // n, t % n
    has_left = ((j > 0) | (t == 0)).float()
    has_up = ((i > 0) | (t == 0)).float()
    up_idx = torch.where(i > 0, t - n + 1, torch.zeros_like(t))
    left = right_BLV[:, t] * has_left[None, :, None]
    up = down_BLV[:, up_idx] * has_up[None, :, None]
    return (left + up) / (has_left + has_up)[None, :, None]
