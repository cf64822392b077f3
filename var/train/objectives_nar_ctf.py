"""Training losses of NAR and CTF (the models live in :mod:`var.models.nar` and :mod:`var.models.ctf`).

* :func:`nar_loss`: cross-entropy of NAR's mixed right/down-head logits against every grid token.
* :func:`stage1_loss`: CTF stage 1, next-token CE on the coarse labels ``cluster_of[tokens]``.
* :func:`stage2_loss`: CTF stage 2, per-position CE of the fine codes given the coarse labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var.models.ctf import CTFStage2
from var.models.nar import NAR
from var.samplers.logits import constrain_logits


def nar_loss(model: NAR, labels_B: torch.Tensor, idx_BL: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the mixed logits against every grid token (labels used as given)."""
    idx_BL = idx_BL.reshape(idx_BL.shape[0], -1)
    logits = model(labels_B, idx_BL)
    return F.cross_entropy(logits.flatten(0, 1), idx_BL.flatten())


def stage1_loss(stage1, labels_B: torch.Tensor, fine_BN: torch.Tensor, cluster_of_V: torch.Tensor) -> torch.Tensor:
    """Next-token CE of the stage-1 GPT on the coarse labels of ground-truth codes (labels used as given)."""
    coarse_BN = cluster_of_V[fine_BN.reshape(fine_BN.shape[0], -1)]
    return F.cross_entropy(stage1(labels_B, coarse_BN).flatten(0, 1), coarse_BN.flatten())


def stage2_loss(stage2: CTFStage2, labels_B: torch.Tensor, fine_BN: torch.Tensor, *,
                constrained: bool = False) -> torch.Tensor:
    """Per-position CE of the fine codes given their coarse labels under ``stage2.cluster_of`` (``constrained``:
    softmax over the codes of the position's cluster only)."""
    fine_BN = fine_BN.reshape(fine_BN.shape[0], -1)
    coarse_BN = stage2.cluster_of[fine_BN]
    logits = stage2(labels_B, coarse_BN)
    if constrained:
        logits = constrain_logits(logits, coarse_BN, stage2.members())
    return F.cross_entropy(logits.flatten(0, 1), fine_BN.flatten())
