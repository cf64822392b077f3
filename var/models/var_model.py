"""VAR: class-conditional next-scale prediction transformer (Tian et al., 2024).

The model is a pure forward over token inputs; sampling loops live in :mod:`var.samplers`. Inference passes a
:class:`~var.kernels.KVCache` explicitly; training uses the block-causal mask ``attn_bias_for_masking``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn

from var.errors import ConfigError
from var.models.conditioning import check_class_labels
from var.kernels.kv_cache import KVCache
from var.models.var_layers import AdaLNBeforeHead, AdaLNSelfAttn, default_init_std, init_next_scale_weights
from var.tokenizers.multiscale_vqvae import VAR_PATCH_NUMS_256
from var.utils.scales import ScaleSchedule


@dataclass
class VARConfig:
    """Defaults reproduce the released 256 px models: width 64*depth, heads = depth (head dim 64)."""

    depth: int = 16
    width: int = 0                  # 0: 64 * depth
    num_heads: int = 0              # 0: depth
    mlp_ratio: float = 4.0
    num_classes: int = 1000         # class id num_classes is the unconditional ("null") class
    vocab_size: int = 4096          # tokenizer codebook size V
    latent_channels: int = 32       # tokenizer code dim Cvae
    patch_nums: tuple = VAR_PATCH_NUMS_256
    shared_aln: bool = False        # shared AdaLN (VAR-d36-s)
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = -1.0    # < 0: 0.1 * depth / 24 (the original builder)
    cond_drop_rate: float = 0.1     # class dropout for CFG training (used by the trainer, never at eval)

    def __post_init__(self):
        self.patch_nums = tuple(self.patch_nums)
        self.width = self.width or 64 * self.depth
        self.num_heads = self.num_heads or self.depth
        if self.drop_path_rate < 0:
            self.drop_path_rate = 0.1 * self.depth / 24
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return self.schedule.seq_len


class VAR(nn.Module):
    """Next-scale transformer. Token ``0`` is the class/start token; scale ``k`` has ``patch_nums[k]**2`` tokens."""

    def __init__(self, config: VARConfig | None = None, **overrides):
        super().__init__()
        config = config or VARConfig(**overrides)
        self.config = config
        C, L = config.width, config.seq_len
        init_std = default_init_std(C)
        self.schedule = config.schedule
        self.begin_ends = self.schedule.begin_ends  # (begin, end) token range of each scale

        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        levels = self.schedule.levels()
        self.register_buffer("lvl_1L", levels.view(1, L))
        causal = torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", causal.view(1, 1, L, L).contiguous())
        self.word_embed = nn.Linear(config.latent_channels, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(config.patch_nums), C)
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        drop_path = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, C, config.num_heads, config.mlp_ratio, norm_eps=config.norm_eps,
                          drop_path=drop_path[i], attn_l2_norm=config.attn_l2_norm, shared_aln=config.shared_aln)
            for i in range(config.depth)])
        self.head_nm = AdaLNBeforeHead(C, C, config.norm_eps)
        self.head = nn.Linear(C, config.vocab_size)
        for p in (self.pos_start, self.pos_1LC, self.class_emb.weight, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)

    # ---- conditioning and inputs ----------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def check_labels(self, labels_B: torch.Tensor) -> None:
        """Raise :class:`ClassIdError` unless every label is in ``[0, num_classes]`` (num_classes = null)."""
        check_class_labels(labels_B, self.null_class)

    def class_condition(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Class embedding ``[B, C]``: the start token and the AdaLN condition."""
        return self.class_emb(labels_B)

    def level_pos(self, si: int) -> torch.Tensor:
        """Level + position embedding of scale ``si``: ``[1, pn*pn, C]``."""
        begin, end = self.begin_ends[si]
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def first_scale_input(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Start token ``[B, 1, C]`` = class embedding + ``pos_start`` + level/position of scale 0."""
        return cond_BD.unsqueeze(1) + self.pos_start + self.level_pos(0)

    def scale_input(self, si: int, latent_BlCv: torch.Tensor) -> torch.Tensor:
        """Input of scale ``si >= 1`` from the tokenizer's next-scale latent ``[B, pn*pn, Cvae]``."""
        return self.word_embed(latent_BlCv.float()) + self.level_pos(si)

    def _block_condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        if self.config.shared_aln:
            return self.shared_ada_lin(cond_BD).view(cond_BD.shape[0], 1, 6, -1)
        return cond_BD

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Output head in fp32: ``[B, L, V]``."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float()).float()).float()

    # ---- forward passes -------------------------------------------------------------------------------------
    def forward_blocks(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, *, attn_bias=None,
                       kv_cache: KVCache | None = None) -> torch.Tensor:
        """Run all blocks. With ``kv_cache``, writes the new tokens' K/V, attends over the cache and commits."""
        block_cond = self._block_condition(cond_BD)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, block_cond, attn_bias, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(x_BLC.shape[1])
        return x_BLC

    def forward_scale(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """One cached inference step over one scale's inputs ``[B, pn*pn, C]`` -> logits ``[B, pn*pn, V]``."""
        return self.logits(self.forward_blocks(x_BlC, cond_BD, kv_cache=kv_cache), cond_BD)

    def forward(self, labels_B: torch.Tensor, x_BLCv_wo_first: torch.Tensor) -> torch.Tensor:
        """Teacher forcing over all scales with the block-causal mask -> logits ``[B, L, V]``.

        ``x_BLCv_wo_first``: tokenizer inputs of scales 1.. (``[B, L-1, Cvae]``). Labels are used as given:
        class dropout for CFG training is the trainer's job (unlike the original, nothing is dropped at eval).
        """
        cond_BD = self.class_condition(labels_B)
        L = self.config.seq_len
        x = torch.cat((cond_BD.unsqueeze(1) + self.pos_start, self.word_embed(x_BLCv_wo_first.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L[:, :L]) + self.pos_1LC[:, :L]
        h = self.forward_blocks(x, cond_BD, attn_bias=self.attn_bias_for_masking[:, :, :L, :L])
        return self.logits(h, cond_BD)

    def teacher_forcing_logits(self, tokenizer, labels_B: torch.Tensor,
                               idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, L, V]`` of every scale given ground-truth index maps (no CFG, no label dropout)."""
        self.check_labels(labels_B)
        return self(labels_B, tokenizer.teacher_forcing_input(idx_list))

    def new_kv_cache(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None,
                     k_dtype: torch.dtype | None = None) -> KVCache:
        """A full preallocated cache for ``batch_size`` rows (2x the images with CFG) and all scales."""
        param = self.head.weight
        config = self.config
        return KVCache(config.depth, batch_size, config.num_heads, config.seq_len, config.width // config.num_heads,
                       dtype=dtype or param.dtype, device=device or param.device, k_dtype=k_dtype)

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---- training initialisation (VAR.init_weights) ---------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The original initialisation for training from scratch (released checkpoints overwrite it)."""
        init_next_scale_weights(self, lambda block: (block.attn.proj, block.ffn.fc2), init_adaln=init_adaln,
                                init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
