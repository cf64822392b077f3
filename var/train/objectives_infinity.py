"""Training objective of the Infinity transformer: teacher forcing of per-bit labels over all scales.

``batch = (images [B, 3, H, W] in [-1, 1], labels [B])``; each label picks a caption whose T5 features were
computed once (``captions``: :class:`~var.models.text_encoder.PromptEmbeddings`, one row per label). The frozen
BSQ VAE gives the bit labels of every scale of ``schedule`` and the teacher-forcing inputs; the loss is the mean
binary cross-entropy over every bit of every token (the two logits of a bit are its classes). Captions are replaced
by the learned unconditional text with probability ``cond_drop_rate`` (classifier-free guidance training). The
released recipe's bitwise self-correction (flipping input bits) is not included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.models.text_encoder import PromptEmbeddings
from var.utils.scales import ScaleSchedule
from var.train.data import SHAPE_CLASSES
from var.train.objectives import Objective, unwrap


def shape_captions(num_classes: int = 10) -> list[str]:
    """One caption per class of :class:`~var.train.data.ProceduralShapes`, e.g. "a red disc, solid"."""
    captions = []
    for cls in SHAPE_CLASSES[:num_classes]:
        colour = cls.name.split("_")[0]
        fill = {"solid": "solid", "hstripes": "with horizontal stripes", "vstripes": "with vertical stripes",
                "checker": "with a checker pattern"}[cls.texture]
        captions.append(f"a {colour} {cls.shape} {fill}")
    return captions


class InfinityObjective(Objective):
    def __init__(self, vae, schedule: ScaleSchedule, captions: PromptEmbeddings, *, cond_drop_rate: float | None = None,
                 seed: int = 0):
        super().__init__(seed)
        self.vae = vae.eval().requires_grad_(False)
        self.schedule, self.cond_drop_rate = schedule, cond_drop_rate
        self.register_buffer("caption_features", captions.features_BNC.float(), persistent=False)
        self.register_buffer("caption_lengths", captions.lengths_B.long(), persistent=False)

    def forward(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        core = unwrap(model)
        if int(labels.max()) >= self.caption_lengths.shape[0]:
            raise ConfigError(f"label {int(labels.max())} has no caption ({self.caption_lengths.shape[0]} given)")
        feats, lengths = self.caption_features[labels], self.caption_lengths[labels]
        rate = core.config.cond_drop_rate if self.cond_drop_rate is None else self.cond_drop_rate
        drop = torch.rand(labels.shape[0], generator=self.generator) < rate
        if bool(drop.any()):
            uncond = core.uncond_features(lengths, feats.shape[1]).to(feats.dtype)
            feats = torch.where(drop.to(feats.device)[:, None, None], uncond, feats)
        mask = torch.arange(feats.shape[1], device=feats.device) < lengths[:, None]
        with torch.no_grad():
            bits = self.vae.encode(images, self.schedule)
            gt_BLd = torch.cat([b.flatten(1, 2) for b in bits], dim=1)
            x = self.vae.teacher_forcing_input(bits, self.schedule)
        logits = model(core.encode_text(feats, mask), x, self.schedule).float()
        B, L, two_d = logits.shape
        pairs = logits.view(B, L, two_d // 2, 2)
        loss = F.cross_entropy(pairs.reshape(-1, 2), gt_BLd.reshape(-1))
        with torch.no_grad():
            last = self.schedule.lengths[-1]
            pred = pairs.argmax(-1)
            metrics = {"bit_acc": (pred == gt_BLd).float().mean().item(),
                       "bit_acc_tail": (pred[:, -last:] == gt_BLd[:, -last:]).float().mean().item()}
        return loss, metrics
