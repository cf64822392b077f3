"""Infinity: text-to-image bitwise next-scale transformer (Han et al., 2024; FoundationVision/Infinity).

Each token of scale ``k`` (grid ``h_k x w_k`` of a :class:`~var.utils.scales.ScaleSchedule`) predicts
``d`` bits: the head outputs one logit pair per bit, ``logits [B, l, 2d]`` read as ``[B, l, d, 2]``. Conditioning:

* T5 features ``[B, N, Ct5]`` (+ mask) -> ``text_norm`` (RMSNorm) -> attentive pool ``cond_BD`` (the start token
  ``cond + pos_start`` and the AdaLN condition) and ``text_proj_for_ca`` (the cross-attention tokens).
* Shared AdaLN: ``gss = shared_ada_lin(cond)`` once, each block adds its own ``ada_gss``.
* Level embedding of scale ``k`` added before the first block; 2-D RoPE in every self-attention.

The model is a pure forward: sampling loops live in :mod:`var.samplers`; inference passes a
:class:`~var.kernels.KVCache` explicitly (self-attention only: the text K/V are recomputed from ``TextCondition``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from var.errors import ConfigError
from var.kernels.kv_cache import KVCache
from var.models.infinity_layers import CrossAttnBlock, RMSNorm, TextAttentivePool, rope_angles
from var.models.var_layers import AdaLNBeforeHead, default_init_std, init_next_scale_weights
from var.utils.scales import ScaleSchedule


@dataclass
class InfinityConfig:
    """Defaults are Infinity-2B (``infinity_2b_reg.pth``): 32 blocks, width 2048, 16 heads, d = 32 bits."""

    depth: int = 32
    width: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0           # FFN hidden = round(width * mlp_ratio / 256) * 256 (the original's rounding)
    codebook_dim: int = 32           # bits per token d (the VAE's); the head has 2d outputs
    text_channels: int = 2048        # T5 feature dim (flan-t5-xl)
    text_maxlen: int = 512           # rows of the learned unconditional text ``cfg_uncond``
    pool_heads: int = 0              # heads of the text pool; 0: text_channels // (64 if width > 4096 else 128)
    num_levels: int = 15             # rows of lvl_embed (max scales)
    block_chunks: int = 8            # released key layout block_chunks.{c}.module.{i} (loading only)
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.1
    cond_drop_rate: float = 0.1      # text dropout for CFG training (the trainer's job; never at eval)
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not self.pool_heads:
            self.pool_heads = self.text_channels // (64 if self.width > 4096 else 128)
        if self.pool_heads < 1 or self.width % self.pool_heads:
            raise ConfigError(f"text pool heads {self.pool_heads} must divide width {self.width}")
        if self.ffn_hidden < 1:
            raise ConfigError(f"FFN hidden size round({self.width} * {self.mlp_ratio} / 256) * 256 is 0")

    @property
    def ffn_hidden(self) -> int:
        return round(self.width * self.mlp_ratio / 256) * 256

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class TextCondition(NamedTuple):
    """What the blocks need from the prompts (one row per batch row, CFG rows included)."""

    cond_BD: torch.Tensor    # pooled text [B, C]: start token and head AdaLN
    gss_B16C: torch.Tensor   # shared AdaLN projection [B, 1, 6, C]
    text_BNC: torch.Tensor   # projected text tokens for cross-attention [B, N, C]
    mask_BN: torch.Tensor    # real text tokens [B, N]

    def rows(self, index) -> "TextCondition":
        return TextCondition(*(t[index] for t in self))


class Infinity(nn.Module):
    def __init__(self, config: InfinityConfig | None = None, **overrides):
        super().__init__()
        config = config or InfinityConfig(**overrides)
        self.config = config
        C, Ct5 = config.width, config.text_channels
        init_std = default_init_std(C)
        # the original's fixed initialisation of the unconditional text, drawn on the CPU (same values when the
        # model is built under a CUDA device context)
        g = torch.Generator().manual_seed(0)
        uncond = torch.nn.init.trunc_normal_(torch.empty(config.text_maxlen, Ct5, device="cpu"), std=1.2, generator=g)
        self.cfg_uncond = nn.Parameter(uncond / Ct5 ** 0.5)
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.text_norm = RMSNorm(Ct5, eps=config.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct5, C, config.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(config.num_levels, C)
        self.word_embed = nn.Linear(config.codebook_dim, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        drop_path = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # linspace
        self.blocks = nn.ModuleList([
            CrossAttnBlock(C, config.num_heads, config.ffn_hidden, norm_eps=config.norm_eps, drop_path=drop_path[i])
            for i in range(config.depth)])
        self.head_nm = AdaLNBeforeHead(C, C, config.norm_eps)
        self.head = nn.Linear(C, 2 * config.codebook_dim)
        for p in (self.pos_start, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)
        self._rope_cache: dict = {}

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---- text -------------------------------------------------------------------------------------------------
    def uncond_features(self, lengths_B: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The learned unconditional text ``[B, num_tokens, Ct5]``: row ``b`` holds ``cfg_uncond[:lengths_B[b]]``
        (each prompt's own length, like the original), zeros after."""
        if int(lengths_B.max()) > self.config.text_maxlen:
            raise ConfigError(f"prompt of {int(lengths_B.max())} tokens > text_maxlen {self.config.text_maxlen}")
        rows = self.cfg_uncond[:num_tokens]
        rows = torch.cat((rows, rows.new_zeros(num_tokens - rows.shape[0], rows.shape[1])))
        mask = torch.arange(num_tokens, device=lengths_B.device) < lengths_B[:, None]
        return rows.unsqueeze(0) * mask.unsqueeze(-1).to(rows.dtype)

    def encode_text(self, features_BNC: torch.Tensor, mask_BN: torch.Tensor) -> TextCondition:
        """T5 features ``[B, N, Ct5]`` with their mask -> :class:`TextCondition` (fp32)."""
        if features_BNC.ndim != 3 or features_BNC.shape[-1] != self.config.text_channels:
            raise ConfigError(f"text features must be [B, N, {self.config.text_channels}], "
                              f"got {tuple(features_BNC.shape)} (wrong text encoder?)")
        if mask_BN.shape != features_BNC.shape[:2] or not bool(mask_BN.any(-1).all()):
            raise ConfigError("text mask must be [B, N] with at least one real token per row")
        kv = self.text_norm(features_BNC.float())
        cond = self.text_proj_for_sos(kv, mask_BN).float()
        gss = self.shared_ada_lin(cond).view(cond.shape[0], 1, 6, -1)
        return TextCondition(cond, gss, self.text_proj_for_ca(kv), mask_BN)

    # ---- inputs ---------------------------------------------------------------------------------------------
    def rope(self, schedule: ScaleSchedule, begin: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin) [end - begin, head_dim / 2]`` of the sequence span of ``schedule``."""
        key = (schedule, str(device))
        if key not in self._rope_cache:
            angles = rope_angles(schedule, self.config.head_dim, self.config.rope_base).to(device)
            self._rope_cache[key] = (angles.cos(), angles.sin())
        cos, sin = self._rope_cache[key]
        return cos[begin:end], sin[begin:end]

    def check_schedule(self, schedule: ScaleSchedule) -> None:
        if schedule.num_scales > self.config.num_levels:
            raise ConfigError(f"{schedule.num_scales} scales > the model's {self.config.num_levels} level embeddings")

    def first_scale_input(self, text: TextCondition) -> torch.Tensor:
        """Start token ``[B, 1, C]`` = pooled text + ``pos_start`` (the level embedding is added by the blocks)."""
        return text.cond_BD.unsqueeze(1) + self.pos_start

    def scale_input(self, latent_BlD: torch.Tensor) -> torch.Tensor:
        """Input of a scale >= 1 from the VAE's next-scale latent ``[B, h*w, d]``."""
        return self.word_embed(latent_BlD.float())

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Bit logits ``[B, L, 2d]`` (fp32); pair ``[2c, 2c+1]`` scores bit ``c`` being 0 / 1."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float())).float()

    # ---- forward passes -------------------------------------------------------------------------------------
    def forward_blocks(self, x_BLC: torch.Tensor, text: TextCondition, rope, *, attn_bias=None,
                       kv_cache: KVCache | None = None, cfg_mix: tuple[int, float] | None = None) -> torch.Tensor:
        """All blocks. ``cfg_mix = (layer, cfg)``: after that layer, rows ``[:B/2]`` become
        ``cfg * cond + (1 - cfg) * uncond`` and are copied to both halves (Infinity's ``cfg_insertion_layer < 0``)."""
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, text.gss_B16C, text.text_BNC, text.mask_BN, rope, attn_bias, kv_cache, i)
            if cfg_mix is not None and i == cfg_mix[0]:
                half = x_BLC.shape[0] // 2
                mixed = cfg_mix[1] * x_BLC[:half] + (1 - cfg_mix[1]) * x_BLC[half:]
                x_BLC = torch.cat((mixed, mixed))
        if kv_cache is not None:
            kv_cache.advance(x_BLC.shape[1])
        return x_BLC

    def forward_scale(self, x_BlC: torch.Tensor, text: TextCondition, si: int, schedule: ScaleSchedule,
                      kv_cache: KVCache, *, cfg_mix: tuple[int, float] | None = None) -> torch.Tensor:
        """One cached step over scale ``si``'s inputs ``[B, h*w, C]`` -> last hidden state ``[B, h*w, C]``."""
        self.check_schedule(schedule)
        begin, end = schedule.begin_ends[si]
        if kv_cache.length != begin:
            raise ConfigError(f"scale {si} starts at position {begin} but the cache holds {kv_cache.length} tokens")
        x = x_BlC + self.lvl_embed.weight[si]
        return self.forward_blocks(x, text, self.rope(schedule, begin, end, x.device), kv_cache=kv_cache,
                                   cfg_mix=cfg_mix)

    def forward(self, text: TextCondition, x_BLd_wo_first: torch.Tensor, schedule: ScaleSchedule) -> torch.Tensor:
        """Teacher forcing over all scales with the block-causal mask -> bit logits ``[B, L, 2d]``.

        ``x_BLd_wo_first``: the VAE's inputs of scales 1.. (``BSQVAE.teacher_forcing_input``). Text dropout for CFG
        training is the trainer's job (:meth:`uncond_features`)."""
        self.check_schedule(schedule)
        L = schedule.seq_len
        if x_BLd_wo_first.shape[1] != L - 1:
            raise ConfigError(f"inputs have {x_BLd_wo_first.shape[1]} tokens, the schedule needs {L - 1}")
        x = torch.cat((self.first_scale_input(text), self.scale_input(x_BLd_wo_first)), dim=1)
        levels = schedule.levels().to(x.device)
        x = x + self.lvl_embed(levels)
        mask = levels[:, None] >= levels[None, :]  # block-causal: a scale sees itself and the coarser ones
        h = self.forward_blocks(x, text, self.rope(schedule, 0, L, x.device), attn_bias=mask)
        return self.logits(h, text.cond_BD)

    def new_kv_cache(self, batch_size: int, schedule: ScaleSchedule, *, dtype: torch.dtype | None = None,
                     device=None, k_dtype: torch.dtype | None = None) -> KVCache:
        """A full preallocated self-attention cache for ``batch_size`` rows (2x the images with CFG)."""
        param = self.head.weight
        cfg = self.config
        return KVCache(cfg.depth, batch_size, cfg.num_heads, schedule.seq_len, cfg.head_dim,
                       dtype=dtype or param.dtype, device=device or param.device, k_dtype=k_dtype)

    # ---- training initialisation (Infinity.special_init with the released training flags) ----------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        init_next_scale_weights(self, lambda block: (block.sa.proj, block.ca.proj, block.ffn.fc2),
                                init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
                                init_std=init_std)


class InfinityAtSchedule:
    """Infinity seen at one scale schedule: the interface the KV-cache policies build caches from
    (``config.depth / num_heads / width / patch_nums``, ``head``, ``new_kv_cache(batch, dtype=, device=)``).

    ``config.patch_nums`` lists each scale as its side when square, else as ``(h, w)``.
    """

    def __init__(self, model: Infinity, schedule: ScaleSchedule):
        from types import SimpleNamespace

        self.model, self.schedule, self.head = model, schedule, model.head
        cfg = model.config
        self.config = SimpleNamespace(depth=cfg.depth, num_heads=cfg.num_heads, width=cfg.width,
                                      patch_nums=schedule.patch_nums)

    def new_kv_cache(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None,
                     k_dtype: torch.dtype | None = None) -> KVCache:
        return self.model.new_kv_cache(batch_size, self.schedule, dtype=dtype, device=device, k_dtype=k_dtype)
