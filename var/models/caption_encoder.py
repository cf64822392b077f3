"""A small text encoder trained from scratch (no download): word-level tokenizer over a fixed vocabulary and a
few bidirectional transformer layers. It carries the bundled text-to-image model, where T5 would be 1000x larger
than the image model; LlamaGen's released models use flan-t5-xl instead (:mod:`var.models.text_encoder`).

    enc = CaptionEncoder(CaptionEncoderConfig(vocab=("a", "red", ...), dim=64, max_words=8))
    cond = enc.condition(["a red star"], caption_len=8)    # CaptionCondition, left padded like LlamaGen's T5 path
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn

from var.errors import ConfigError, PromptError
from var.models.conditioning import CaptionCondition


@dataclass
class CaptionEncoderConfig:
    vocab: tuple = ()             # known words (lower case); id 0 is reserved for the end-of-caption token
    dim: int = 64
    n_layer: int = 2
    n_head: int = 4
    max_words: int = 7            # words per prompt; +1 end token = the caption length the GPT sees

    def __post_init__(self):
        self.vocab = tuple(self.vocab)
        if len(set(self.vocab)) != len(self.vocab) or any(not w or w != w.lower() or " " in w for w in self.vocab):
            raise ConfigError("the caption vocabulary must be distinct lower-case words")
        if self.dim % self.n_head or self.max_words < 1:
            raise ConfigError(f"bad caption encoder sizes: dim {self.dim}, heads {self.n_head}, "
                              f"max_words {self.max_words}")

    @property
    def caption_len(self) -> int:
        return self.max_words + 1


class CaptionEncoder(nn.Module):
    """Words -> ids (end token 0 appended) -> embeddings + learned positions -> pre-norm transformer encoder
    (padding masked) -> final LayerNorm: ``[B, n, dim]`` features of the real tokens."""

    def __init__(self, config: CaptionEncoderConfig | None = None, **overrides):
        super().__init__()
        self.config = c = config or CaptionEncoderConfig(**overrides)
        self.word_ids = {w: i + 1 for i, w in enumerate(c.vocab)}
        self.embed = nn.Embedding(len(c.vocab) + 1, c.dim)
        self.pos = nn.Parameter(torch.zeros(c.caption_len, c.dim))
        layer = nn.TransformerEncoderLayer(c.dim, c.n_head, 4 * c.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, c.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        nn.init.normal_(self.pos, std=0.02)

    def tokenize(self, prompt: str, *, truncate: bool = False) -> list[int]:
        """Word ids of one prompt plus the end token. Raises :class:`PromptError` for an empty prompt, an unknown
        word, or more than ``max_words`` words (``truncate=True``: keep the first ones, with a warning)."""
        words = prompt.lower().replace(",", " ").split()
        if not words:
            raise PromptError("empty prompt: describe the image, e.g. 'a pink star'")
        unknown = [w for w in words if w not in self.word_ids]
        if unknown:
            raise PromptError(f"unknown word {unknown[0]!r} in {prompt!r}; this model knows: "
                              f"{' '.join(self.config.vocab)}")
        n = self.config.max_words
        if len(words) > n:
            if not truncate:
                raise PromptError(f"{prompt!r} has {len(words)} words; this model reads at most {n}")
            warnings.warn(f"prompt {prompt!r} truncated to its first {n} words", stacklevel=2)
            words = words[:n]
        return [self.word_ids[w] for w in words] + [0]

    def forward(self, ids_Bn: torch.Tensor, mask_Bn: torch.Tensor) -> torch.Tensor:
        """Right-padded ids and their mask (True = real) -> features ``[B, n, dim]``, zero at padding."""
        x = self.embed(ids_Bn) + self.pos[: ids_Bn.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask_Bn))
        return x * mask_Bn[..., None]

    def condition(self, prompts: Sequence[str], caption_len: int | None = None, *,
                  truncate: bool = False) -> CaptionCondition:
        """Prompts -> a :class:`CaptionCondition` (left padded to ``caption_len``, default the encoder's)."""
        if isinstance(prompts, str):
            raise ConfigError("condition takes a list of prompts, not one string")
        if not prompts:
            raise PromptError("no prompts given")
        ids = [self.tokenize(p, truncate=truncate) for p in prompts]
        n = max(map(len, ids))
        device = self.embed.weight.device
        ids_Bn = torch.tensor([i + [0] * (n - len(i)) for i in ids], device=device)
        mask_Bn = torch.arange(n, device=device)[None] < torch.tensor([len(i) for i in ids], device=device)[:, None]
        feats = self(ids_Bn, mask_Bn)
        return CaptionCondition.left_padded([f[:len(i)] for f, i in zip(feats, ids)],
                                            caption_len or self.config.caption_len)

    def config_dict(self) -> dict:
        return asdict(self.config)


class T5Captions:
    """Prompts -> :class:`CaptionCondition` through a T5 :class:`~var.models.text_encoder.TextEncoder` (the
    released LlamaGen T2I models): prompts longer than ``caption_len`` T5 tokens keep their first ones, as LlamaGen
    truncates, with a warning."""

    def __init__(self, encoder):
        self.encoder = encoder

    def condition(self, prompts: Sequence[str], caption_len: int) -> CaptionCondition:
        if not prompts or any(not p.strip() for p in prompts):
            raise PromptError("empty prompt: describe the image")
        for p in prompts:
            n = len(self.encoder.tokenizer(p)["input_ids"])
            if n > caption_len:
                warnings.warn(f"prompt {p[:40]!r}... has {n} T5 tokens: truncated to {caption_len}", stacklevel=2)
        self.encoder.max_length = caption_len
        return CaptionCondition.from_prompt_embeddings(self.encoder.encode(list(prompts)), caption_len)
