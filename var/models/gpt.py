"""LlamaGen's class-conditional next-token GPT (Sun et al., 2024): Llama blocks over a raster-order token grid.

* Pre-norm blocks ``h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))``, no biases, fused ``wqkv``.
* One class-embedding prefix token (row ``num_classes`` is the null class used for CFG), then the image tokens.
  Image token ``i`` (raster index in the ``grid x grid`` map) is fed at absolute position ``1 + i`` and the output
  at position ``p`` predicts token ``p`` (so the class token's output predicts token 0).
* 2D RoPE: half of the rotation pairs follow the row, half the column; the prefix position gets cos = sin = 0
  (LlamaGen's quirk: the class token's q and k are zeroed, only its value is seen).
* Inference takes a :class:`~var.kernels.kv_cache.KVCache` explicitly; :meth:`decode` writes new tokens at the cache
  pointer and accepts arbitrary absolute positions and masks (speculative and row-parallel samplers). Rolling back
  rejected tokens is ``kv_cache.truncate(n)``.

Module names follow the released checkpoints (``layers.{i}.attention.wqkv`` ...) so they load strictly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import ClassIdError, ConfigError
from var.models.conditioning import check_class_labels
from var.kernels.kv_cache import KVCache


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    """Defaults are LlamaGen GPT-B c2i at 256 px (16 x 16 tokens, codebook 16384)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256              # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000             # class id num_classes is the null (unconditional) class
    vocab_size: int = 16384             # tokenizer codebook size V
    grid_size: int = 16                 # tokens per side: 16 for 256 px, 24 for 384 px (ds16 tokenizer)
    token_dropout_p: float = 0.1        # training-only dropouts (inactive in eval mode)
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_p: float = 0.1        # label dropout rate for CFG training (applied by the trainer)
    initializer_range: float = 0.02

    def __post_init__(self):
        self.check_trunk()
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")

    def check_trunk(self) -> None:
        """Checks shared with the caption-conditioned config (which has no classes)."""
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ConfigError(f"2D RoPE needs a head dim divisible by 4, got {self.dim // self.n_head}")
        if self.grid_size < 1 or self.vocab_size < 2:
            raise ConfigError(f"bad sizes: grid {self.grid_size}, vocab {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return _round_up(hidden, self.multiple_of)

    @property
    def seq_len(self) -> int:
        """Image tokens per sample."""
        return self.grid_size ** 2


def rope_2d_table(grid_size: int, head_dim: int, base: float, prefix_len: int) -> torch.Tensor:
    """``[prefix_len + grid^2, head_dim / 2, 2]`` (cos, sin) per absolute position; prefix rows are all zero.

    Pair ``j < head_dim / 4`` rotates by ``row * f_j``, pair ``head_dim / 4 + j`` by ``col * f_j`` with
    ``f_j = base^(-2j / (head_dim / 2))``.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size).float(), freqs)  # [g, hd/4]
    grid = torch.cat((angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)),
                     dim=-1)  # [g(row), g(col), hd/2]
    table = torch.stack((grid.cos(), grid.sin()), dim=-1).flatten(0, 1)
    return torch.cat((torch.zeros(prefix_len, half, 2), table))


def apply_rope(x_BlHD: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2j], x[2j+1])``; ``cos_sin`` is ``[l or B x l, D/2, 2]`` (computed in fp32)."""
    x = x_BlHD.float().reshape(*x_BlHD.shape[:-1], -1, 2)
    if cos_sin.ndim == 3:
        cos_sin = cos_sin[None]
    cos, sin = cos_sin[:, :, None, :, 0], cos_sin[:, :, None, :, 1]  # [B|1, l, 1, D/2]
    out = torch.stack((x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin), dim=-1)
    return out.flatten(3).type_as(x_BlHD)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = c.n_head, c.head_dim
        self.wqkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.resid_dropout = nn.Dropout(c.resid_dropout_p)

    def forward(self, x_BlC: torch.Tensor, cos_sin: torch.Tensor, layer: int, kv_cache: KVCache | None,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, l, C = x_BlC.shape
        q, k, v = self.wqkv(x_BlC).view(B, l, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, l, D]
        scale = self.head_dim ** -0.5
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                                 scale=scale)
        else:
            out = kv_cache.attend(layer, q, k, v, scale=scale, attn_mask=attn_mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, l, C)))


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.ffn_hidden, bias=False)
        self.w3 = nn.Linear(c.dim, c.ffn_hidden, bias=False)
        self.w2 = nn.Linear(c.ffn_hidden, c.dim, bias=False)
        self.ffn_dropout = nn.Dropout(c.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = FeedForward(c)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x, cos_sin, layer, kv_cache, attn_mask):
        h = x + self.attention(self.attention_norm(x), cos_sin, layer, kv_cache, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedder(nn.Module):
    """``embedding_table [num_classes + 1, dim]``; the last row is the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels_B).unsqueeze(1)  # [B, 1, C]


class ClassPrefixTransformer(nn.Module):
    """LlamaGen's trunk over ``[class; grid^2 inputs]``: class embedding, one input embedding, 2D-RoPE blocks, final
    norm and vocabulary head. :class:`GPT` feeds it image tokens causally; CTF's stage 2 its coarse labels
    bidirectionally. Module names (and their order) follow LlamaGen's checkpoints."""

    prefix_len = 1

    def __init__(self, config: GPTConfig, input_embedding: str, input_vocab_size: int):
        super().__init__()
        self.config = config
        self.cls_embedding = self.prefix_embedder()
        self.add_module(input_embedding, nn.Embedding(input_vocab_size, config.dim))
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: dict = {}  # (cos, sin) table per device, built lazily (works for meta-device construction)

    def prefix_embedder(self) -> nn.Module:
        """The module that embeds the condition into the prefix (``cls_embedding``): class ids here."""
        return ClassEmbedder(self.config.num_classes, self.config.dim)

    # ---- sizes, labels ----------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_labels(self, labels_B: torch.Tensor) -> None:
        """Raise :class:`ClassIdError` unless every label is in ``[0, num_classes]`` (num_classes = null)."""
        check_class_labels(labels_B, self.null_class)

    def check_condition(self, cond) -> None:
        """Samplers' entry: the condition of a class-conditional GPT is its class ids (see :meth:`check_labels`)."""
        if not isinstance(cond, torch.Tensor):
            raise ClassIdError(f"this class-conditional GPT takes class ids, got a {type(cond).__name__}")
        self.check_labels(cond)

    def condition_rows(self, labels_B: torch.Tensor, guided: bool) -> torch.Tensor:
        """The model batch for CFG: ``[labels; null class]`` when ``guided``, else ``labels``."""
        return torch.cat((labels_B, torch.full_like(labels_B, self.null_class))) if guided else labels_B

    # ---- RoPE and the blocks ----------------------------------------------------------------------------------
    def rope_table(self, device) -> torch.Tensor:
        """(cos, sin) of every absolute position: ``[prefix_len + grid^2, head_dim/2, 2]`` fp32 on ``device``."""
        table = self._rope.get(device)
        if table is None:
            c = self.config
            table = rope_2d_table(c.grid_size, c.head_dim, c.rope_base, self.prefix_len).to(device)
            self._rope[device] = table
        return table

    def rope(self, positions: torch.Tensor | range, device=None) -> torch.Tensor:
        """(cos, sin) of absolute positions ``[l]`` or ``[B, l]`` -> ``[..., head_dim/2, 2]`` (fp32), range-checked.

        A ``range`` (consecutive positions known on the host, e.g. after the cache's length) is checked on the host
        and sliced; a tensor costs one device read-back for its check."""
        if isinstance(positions, range):
            table = self.rope_table(device)
            if positions.start < 0 or positions.stop > table.shape[0] or positions.step != 1:
                raise ConfigError(f"positions must be in [0, {table.shape[0]}), got {positions}")
            return table[positions.start:positions.stop]
        table = self.rope_table(positions.device)
        if positions.numel() and bool(((positions < 0) | (positions >= table.shape[0])).any()):
            raise ConfigError(f"positions must be in [0, {table.shape[0]}), got [{positions.min()}, {positions.max()}]")
        return table[positions]

    def blocks_and_head(self, x_BlC: torch.Tensor, cos_sin: torch.Tensor, kv_cache: KVCache | None,
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings ``[B, l, C]`` with the RoPE (cos, sin) of their positions (:meth:`rope`) -> fp32 logits
        ``[B, l, V]``."""
        h = self.tok_dropout(x_BlC)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin, i, kv_cache, attn_mask)
        return self.output(self.norm(h)).float()

    def config_dict(self) -> dict:
        return asdict(self.config)

    @torch.no_grad()
    def init_weights(self) -> None:
        """LlamaGen's init: N(0, 0.02) for linear and embedding weights, zero output head."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
                nn.init.normal_(m.weight, 0.0, std)
        if not self.output.weight.is_meta:
            nn.init.zeros_(self.output.weight)


class GPT(ClassPrefixTransformer):
    """Class-conditional next-token transformer over ``grid_size^2`` image tokens (one class prefix token)."""

    def __init__(self, config: GPTConfig | None = None, **overrides):
        config = config or GPTConfig(**overrides)
        super().__init__(config, "tok_embeddings", config.vocab_size)
        self.init_weights()

    def check_tokens(self, idx: torch.Tensor) -> None:
        if idx.dtype.is_floating_point or (idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size)):
            raise ConfigError(f"token ids must be integers in [0, {self.vocab_size})")

    def drop_labels(self, labels_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout_p`` (CFG training)."""
        drop = torch.rand(labels_B.shape, generator=generator, device=labels_B.device) < self.config.class_dropout_p
        return torch.where(drop, torch.full_like(labels_B, self.null_class), labels_B)

    # ---- embeddings ------------------------------------------------------------------------------------------
    def class_embed(self, labels_B: torch.Tensor) -> torch.Tensor:
        return self.cls_embedding(labels_B)

    # ---- forward passes ---------------------------------------------------------------------------------------
    def forward_embeddings(self, x_BlC: torch.Tensor, positions: torch.Tensor | range,
                           kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks + head over input embeddings at absolute ``positions`` (a tensor, or a host ``range``: see
        :meth:`rope`) -> fp32 logits ``[B, l, V]``.

        Without a cache ``attn_mask=None`` means causal. With a cache the new K/V are written at
        ``[kv_cache.length, +l)`` and committed (``advance``); ``attn_mask`` (bool, True = attend) must broadcast to
        ``[B, H, l, kv_cache.length + l]``; None = every new token sees the cache and the new tokens up to itself.
        """
        if kv_cache is not None and attn_mask is None and x_BlC.shape[1] > 1:
            n, l = kv_cache.length, x_BlC.shape[1]
            slots = torch.arange(n + l, device=x_BlC.device)
            attn_mask = slots[None, :] <= (n + torch.arange(l, device=x_BlC.device))[:, None]
        logits = self.blocks_and_head(x_BlC, self.rope(positions, x_BlC.device), kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(x_BlC.shape[1])
        return logits

    def forward(self, labels_B: torch.Tensor, idx_BL: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``[B, L, V]`` where row ``i`` predicts ``idx[:, i]`` from the class and
        ``idx[:, :i]`` (L <= grid^2). Labels are used as given (label dropout is the trainer's job)."""
        L = idx_BL.shape[1]
        if not 1 <= L <= self.seq_len:
            raise ConfigError(f"teacher forcing takes 1..{self.seq_len} tokens, got {L}")
        x = torch.cat((self.class_embed(labels_B), self.tok_embeddings(idx_BL[:, :-1])), dim=1)
        return self.forward_embeddings(x, range(L))

    def teacher_forcing_logits(self, labels_B: torch.Tensor, idx_BL: torch.Tensor) -> torch.Tensor:
        """Checked :meth:`forward`: ``labels [B]``, tokens ``[B, L]`` (or ``[B, h, w]``) -> logits ``[B, L, V]``."""
        self.check_labels(labels_B)
        idx_BL = idx_BL.reshape(idx_BL.shape[0], -1)
        self.check_tokens(idx_BL)
        return self(labels_B, idx_BL)

    def prefill(self, labels_B: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Write the class prefix at position 0 of an empty cache -> logits of token 0 ``[B, 1, V]``."""
        if kv_cache.length != 0:
            raise ConfigError(f"prefill needs an empty cache (length {kv_cache.length})")
        return self.forward_embeddings(self.class_embed(labels_B), range(1), kv_cache)

    def decode(self, idx_Bl: torch.Tensor, kv_cache: KVCache, *, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed image tokens ``[B, l]`` through the cache -> logits ``[B, l, V]`` (row j predicts the token after
        input j). ``positions`` (absolute, ``[l]`` or ``[B, l]``): where the inputs sit in the sequence (token i is
        at ``1 + i``); default ``kv_cache.length + arange(l)``, i.e. cache slot = position."""
        if positions is None:  # a host range: checked without reading anything back from the device
            positions = range(kv_cache.length, kv_cache.length + idx_Bl.shape[1])
        return self.forward_embeddings(self.tok_embeddings(idx_Bl), positions, kv_cache, attn_mask)

    def decode_step(self, idx_Bl: torch.Tensor, slots_l: torch.Tensor, kv_cache: KVCache,
                    positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`decode` with static shapes, for compiled / CUDA-graph decoding: tokens ``[B, l]`` enter the cache
        slots ``slots_l`` (long ``[l]`` on the device) and attend over the whole preallocated cache
        (:meth:`KVCache.attend_at`). ``positions`` (``[l]`` or ``[B, l]``; default: the slots, as in plain decoding)
        and ``attn_mask`` (bool ``[B|1, 1, l, capacity]``; default: each input sees the slots up to its own) are
        device tensors too. No host value is read, so every step of a given ``l`` is the same program; the caller
        keeps slots and positions in range and advances the cache (:class:`var.models.compiled.DecodeStep`)."""
        cos_sin = self.rope_table(idx_Bl.device)[slots_l if positions is None else positions]
        mask = self.decode_step_mask(slots_l, kv_cache, attn_mask)
        return self.blocks_and_head(self.tok_embeddings(idx_Bl), cos_sin, kv_cache.at_slots(slots_l), mask)

    def decode_step_mask(self, slots_l: torch.Tensor, kv_cache: KVCache,
                         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mask of :meth:`decode_step` over every cache slot: ``attn_mask``, or ``[1, 1, l, capacity]`` where each
        input sees the slots up to its own."""
        if attn_mask is not None:
            return attn_mask
        keys = torch.arange(kv_cache.capacity, device=slots_l.device)
        return (keys[None, :] <= slots_l[:, None])[None, None]

    def new_kv_cache(self, batch_size: int, *, capacity: int | None = None, dtype: torch.dtype | None = None,
                     device=None, k_dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated cache for ``batch_size`` rows (2x the images with CFG); default capacity is the class
        prefix + ``grid^2`` tokens (speculative samplers ask for room for a window)."""
        param = self.output.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, capacity or self.prefix_len + c.seq_len, c.head_dim,
                       dtype=dtype or param.dtype, device=device or param.device, k_dtype=k_dtype)
