"""LlamaGen's text-to-image next-token GPT (``model_type='t2i'``): the class token is replaced by a caption prefix.

* The prefix is ``caption_len`` (120) rows of text-encoder features (flan-t5-xl: 2048-d), left padded (text at the
  end, zeros before), projected into the GPT width by ``cap_proj`` (``fc1 -> GELU(tanh) -> fc2``, no biases).
* Padding mask: the padded caption slots are hidden from every query (keys), except that each padded prefix row
  still sees itself (so no attention row is empty), in teacher forcing, prefill and every later decode pass.
* CFG: the null caption is the learned ``uncond_embedding [caption_len, caption_dim]`` buffer (the whole table, in
  feature space), with the conditional row's padding mask; training drops captions to it with ``class_dropout_p``.
* Image token ``i`` sits at absolute position ``caption_len + i``; the output at ``caption_len - 1 + i`` predicts it.
  The caption positions get zero RoPE rows, as the class token does in the c2i model.

Everything else (blocks, head, KV cache, decode with arbitrary positions/masks) is :class:`~var.models.gpt.GPT`'s,
so every next-token sampler runs unchanged with a :class:`~var.models.conditioning.CaptionCondition`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from var.errors import ConfigError
from var.kernels.kv_cache import KVCache
from var.models.conditioning import CaptionCondition
from var.models.gpt import GPT, GPTConfig


@dataclass
class GPTT2IConfig(GPTConfig):
    """LlamaGen t2i: defaults are GPT-XL t2i at 256 px (stage 1; ``grid_size=32`` for the 512 px stage 2)."""

    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    num_classes: int = 0              # unused: the condition is a caption
    caption_dim: int = 2048           # text-encoder feature width (flan-t5-xl)
    caption_len: int = 120            # caption prefix rows (T5 max length)

    def __post_init__(self):
        self.check_trunk()
        if self.caption_dim < 1 or self.caption_len < 1:
            raise ConfigError(f"caption_dim and caption_len must be >= 1, got {self.caption_dim}, {self.caption_len}")


class CaptionEmbedder(nn.Module):
    """``cap_proj`` MLP (no biases) of caption features into the GPT width, and the null caption buffer."""

    def __init__(self, caption_dim: int, dim: int, caption_len: int):
        super().__init__()
        self.cap_proj = nn.Sequential()
        self.cap_proj.add_module("fc1", nn.Linear(caption_dim, dim, bias=False))
        self.cap_proj.add_module("act", nn.GELU(approximate="tanh"))
        self.cap_proj.add_module("fc2", nn.Linear(dim, dim, bias=False))
        # a persistent buffer in the released files (LlamaGen registers it as a buffer, not a parameter)
        self.register_buffer("uncond_embedding", torch.randn(caption_len, caption_dim) / caption_dim ** 0.5)

    def forward(self, features_BTC: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(features_BTC.to(self.cap_proj.fc1.weight.dtype))


def prefix_attention_mask(mask_BT: torch.Tensor, num_queries: int, num_keys: int, first_query: int) -> torch.Tensor:
    """``[B, 1, num_queries, num_keys]`` bool: causal (query ``q`` sits at position ``first_query + q``), padded
    caption keys hidden, the diagonal always visible (LlamaGen's rule for padded prefix rows)."""
    B, T = mask_BT.shape
    device = mask_BT.device
    q_pos = first_query + torch.arange(num_queries, device=device)
    k_pos = torch.arange(num_keys, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]
    keys = torch.ones(B, num_keys, dtype=torch.bool, device=device)
    keys[:, :T] = mask_BT
    return ((causal[None] & keys[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None])[:, None]


class GPTT2I(GPT):
    """Caption-conditioned next-token GPT over ``grid_size^2`` image tokens (``caption_len`` prefix rows)."""

    config: GPTT2IConfig

    def __init__(self, config: GPTT2IConfig | None = None, **overrides):
        config = config or GPTT2IConfig(**overrides)
        self.prefix_len = config.caption_len
        super().__init__(config)

    def prefix_embedder(self) -> nn.Module:
        c = self.config
        return CaptionEmbedder(c.caption_dim, c.dim, c.caption_len)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        buf = self.cls_embedding.uncond_embedding
        if not buf.is_meta:
            buf.normal_(0.0, self.config.caption_dim ** -0.5)

    # ---- the condition ----------------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        raise ConfigError("a text-to-image GPT has no null class: CFG uses its null caption (condition_rows)")

    def check_labels(self, labels_B) -> None:
        raise ConfigError("this is a text-to-image GPT: condition it on captions (CaptionCondition), not class ids")

    def check_condition(self, cond) -> None:
        """Raise :class:`ConfigError` unless ``cond`` is a :class:`CaptionCondition` of this model's shape with at
        least one real token per caption."""
        c = self.config
        if not isinstance(cond, CaptionCondition):
            raise ConfigError(f"this text-to-image GPT takes a CaptionCondition (caption features and mask), got "
                              f"{type(cond).__name__}")
        if tuple(cond.features_BTC.shape[1:]) != (c.caption_len, c.caption_dim):
            raise ConfigError(f"caption features must be [B, {c.caption_len}, {c.caption_dim}], got "
                              f"{tuple(cond.features_BTC.shape)}")
        if len(cond) and not bool(cond.mask_BT.any(1).all()):
            raise ConfigError("a caption has no token (empty prompt?): every caption needs at least one")

    def null_condition(self, mask_BT: torch.Tensor) -> CaptionCondition:
        """The null caption (``uncond_embedding``, unmasked features) with the given padding mask."""
        uncond = self.cls_embedding.uncond_embedding
        return CaptionCondition(uncond.expand(mask_BT.shape[0], -1, -1).to(mask_BT.device), mask_BT)

    def condition_rows(self, cond: CaptionCondition, guided: bool) -> CaptionCondition:
        """``[captions; null captions]`` when ``guided`` (the null rows keep the caption's padding mask)."""
        if not guided:
            return cond
        null = self.null_condition(cond.mask_BT)
        return cond.cat(null.to(cond.device, cond.features_BTC.dtype))

    def drop_captions(self, cond: CaptionCondition, generator: torch.Generator | None = None) -> CaptionCondition:
        """Replace each caption's features by the null caption with probability ``class_dropout_p`` (mask kept)."""
        drop = torch.rand(len(cond), generator=generator).to(cond.device) < self.config.class_dropout_p
        null = self.null_condition(cond.mask_BT).features_BTC.to(cond.features_BTC.dtype)
        return CaptionCondition(torch.where(drop[:, None, None], null, cond.features_BTC), cond.mask_BT)

    def drop_labels(self, labels_B, generator=None):
        raise ConfigError("a text-to-image GPT drops captions (drop_captions), not labels")

    def caption_embed(self, cond: CaptionCondition) -> torch.Tensor:
        """``[B, caption_len, dim]`` prefix embeddings."""
        return self.cls_embedding(cond.features_BTC)

    def class_embed(self, labels_B):
        raise ConfigError("a text-to-image GPT embeds captions (caption_embed), not class ids")

    # ---- forward passes ---------------------------------------------------------------------------------------
    def forward_embeddings(self, x_BlC: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None = None,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`GPT.forward_embeddings`, with the caption padding of the cache rows hidden from the new queries."""
        pad = kv_cache.prefix_mask if kv_cache is not None else None
        if pad is not None:
            n, l = kv_cache.length, x_BlC.shape[1]
            if attn_mask is None:  # GPT's default: each new token sees the cache and the new tokens up to itself
                attn_mask = prefix_attention_mask(pad[:, :0], l, n + l, n)
            elif attn_mask.dtype != torch.bool:
                raise ConfigError("a text-to-image GPT takes boolean attention masks (True = attend)")
            keys = torch.ones(pad.shape[0], n + l, dtype=torch.bool, device=pad.device)
            keys[:, :pad.shape[1]] = pad
            attn_mask = attn_mask & keys[:, None, None, :]
        return super().forward_embeddings(x_BlC, positions, kv_cache, attn_mask)

    def decode_step_mask(self, slots_l: torch.Tensor, kv_cache: KVCache,
                         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`GPT.decode_step_mask` with the caption padding of the cache rows hidden: ``[B, 1, l, capacity]``."""
        mask = super().decode_step_mask(slots_l, kv_cache, attn_mask)
        pad = kv_cache.prefix_mask
        if pad is None:
            return mask
        keys = torch.ones(pad.shape[0], kv_cache.capacity, dtype=torch.bool, device=pad.device)
        keys[:, :pad.shape[1]] = pad
        return mask & keys[:, None, None, :]

    def forward(self, cond: CaptionCondition, idx_BL: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``[B, L, V]``, row ``i`` predicts ``idx[:, i]`` from the caption and
        ``idx[:, :i]`` (L <= grid^2). Captions are used as given (dropout is :meth:`drop_captions`)."""
        L, T = idx_BL.shape[1], self.prefix_len
        if not 1 <= L <= self.seq_len:
            raise ConfigError(f"teacher forcing takes 1..{self.seq_len} tokens, got {L}")
        x = torch.cat((self.caption_embed(cond), self.tok_embeddings(idx_BL[:, :-1])), dim=1)
        mask = prefix_attention_mask(cond.mask_BT, T + L - 1, T + L - 1, 0)
        h = self.blocks_and_head_rows(x, mask, T - 1)
        return h

    def blocks_and_head_rows(self, x_BlC: torch.Tensor, attn_mask: torch.Tensor, first_row: int) -> torch.Tensor:
        """Blocks over the whole sequence (no cache), head on rows ``first_row..`` only -> fp32 logits."""
        h = self.tok_dropout(x_BlC)
        cos_sin = self.rope(torch.arange(x_BlC.shape[1], device=x_BlC.device))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin, i, None, attn_mask)
        return self.output(self.norm(h[:, first_row:])).float()

    def teacher_forcing_logits(self, cond: CaptionCondition, idx_BL: torch.Tensor) -> torch.Tensor:
        """Checked :meth:`forward`: a caption condition and tokens ``[B, L]`` (or ``[B, h, w]``)."""
        self.check_condition(cond)
        idx_BL = idx_BL.reshape(idx_BL.shape[0], -1)
        self.check_tokens(idx_BL)
        if len(cond) != idx_BL.shape[0]:
            raise ConfigError(f"{len(cond)} captions for {idx_BL.shape[0]} token rows")
        return self(cond, idx_BL)

    def prefill(self, cond: CaptionCondition, kv_cache: KVCache) -> torch.Tensor:
        """Write the caption prefix (positions ``0..T-1``) into an empty cache and record its padding mask on the
        cache -> logits of image token 0 ``[B, 1, V]``."""
        if kv_cache.length != 0:
            raise ConfigError(f"prefill needs an empty cache (length {kv_cache.length})")
        T = self.prefix_len
        kv_cache.prefix_mask = None
        mask = prefix_attention_mask(cond.mask_BT, T, T, 0)
        logits = super().forward_embeddings(self.caption_embed(cond), range(T),
                                            kv_cache, mask)
        # recorded only when some slot is padding, so unpadded captions decode with the plain masks
        kv_cache.prefix_mask = None if bool(cond.mask_BT.all()) else cond.mask_BT.clone()
        return logits[:, -1:]
