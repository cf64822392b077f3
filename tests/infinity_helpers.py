"""Shared builders for the Infinity tests: tiny random BSQ VAE, schedules, and released key specs."""
from pathlib import Path

import torch

from helpers import key_spec
from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig
from var.utils.scales import ScaleSchedule

DATA = Path(__file__).parent / "data" / "infinity"
TINY_SCHEDULE = ScaleSchedule(((1, 1), (2, 2), (2, 3), (4, 4)))  # 4x4 latent = 16x16 px with stride 4


def tiny_vae(seed: int = 0, codebook_dim: int = 6) -> BSQVAE:
    torch.manual_seed(seed)
    return BSQVAE(BSQVAEConfig(codebook_dim=codebook_dim, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                               norm_groups=4)).eval()


def spec_state_dict(filename: str) -> dict:
    """Meta tensors with the keys/shapes of a released key dump in ``tests/data/infinity``."""
    return key_spec(DATA / filename)


def tiny_infinity(seed: int = 0, **overrides):
    """A 2-block Infinity (width 64, 4 heads, d = 6 bits, 16-d text) with strong random AdaLN/head weights."""
    from var.models.infinity import Infinity, InfinityConfig

    torch.manual_seed(seed)
    cfg = dict(depth=2, width=64, num_heads=4, codebook_dim=6, text_channels=16, text_maxlen=16, pool_heads=2,
               drop_path_rate=0.0)
    cfg.update(overrides)
    model = Infinity(InfinityConfig(**cfg)).eval()
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    return model


def random_text(batch: int = 2, n: int = 5, channels: int = 16, seed: int = 0):
    """Random T5-like features ``[B, n, C]`` and a mask with different lengths per row."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, n, channels, generator=g)
    lengths = torch.tensor([n - (b % n) for b in range(batch)])
    mask = torch.arange(n) < lengths[:, None]
    return feats * mask[..., None], mask
