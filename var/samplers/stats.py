"""Records returned by every sampler."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from var.errors import ConfigError, NonFiniteImagesError


@dataclass
class SamplerStats:
    """Cost of one sampler call (for the whole batch)."""

    forward_passes: int = 0          # model forward passes (a CFG pass over cond+uncond rows counts once)
    tokens: int = 0                  # tokens generated per image
    peak_kv_cache_bytes: int = 0     # largest KV-cache allocation during the call (cache.peak_nbytes())
    peak_kv_live_bytes: int = 0      # largest K/V bytes holding live tokens (cache.peak_live_nbytes())
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)  # sampler-specific numbers (accept lengths, ...)

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens produced per forward pass (accepted tokens per pass for speculative samplers)."""
        return self.tokens / max(self.forward_passes, 1)

    def track_kv(self, cache) -> None:
        """Fold a cache's allocated and live peaks into the call's peaks (the same two numbers for every cache)."""
        self.peak_kv_cache_bytes = max(self.peak_kv_cache_bytes, cache.peak_nbytes())
        self.peak_kv_live_bytes = max(self.peak_kv_live_bytes, cache.peak_live_nbytes())

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_pass": self.tokens_per_pass}


@dataclass
class SampleOutput:
    """``images [B, 3, H, W]`` in [0, 1], the sampled ``tokens`` (list per scale, or ``[B, L]``) and stats."""

    images: torch.Tensor | None
    tokens: object
    stats: SamplerStats

    def save(self, path, *, nrow: int | None = None):
        """Write the images as one grid PNG/JPEG at ``path`` (``nrow`` per row; default about the square root)."""
        from var.utils.images import save_image_grid
        return save_image_grid(self._decoded(), path, nrow=nrow)

    def save_images(self, directory, start_index: int = 0):
        """Write each image as a lossless ``{index:06d}.png`` into ``directory``; returns the paths."""
        from var.utils.images import save_images
        return save_images(self._decoded(), directory, start_index=start_index)

    def _decoded(self) -> torch.Tensor:
        if self.images is None:
            raise ConfigError("this output has no images (sampled with decode=False): decode the tokens first")
        return self.images.float().cpu()

    def __post_init__(self):
        # NaN/inf decoder weights or codebook entries would otherwise be written as black images with exit 0
        if self.images is not None and not torch.isfinite(self.images).all():
            bad = (~torch.isfinite(self.images.flatten(1))).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteImagesError(f"non-finite values (NaN/inf) in the decoded images {bad[:8]} of a batch of "
                                       f"{len(self.images)}: check the tokenizer's weights and codebook")
