"""What a compression policy sees and returns: the candidates of one layer's write (:class:`SelectionContext`)
and the policy's decision (:class:`Selection`). Shared by :mod:`var.kernels.protocols` (the policy interface)
and :mod:`var.kernels.compressed_cache` (the cache that asks policies)."""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from var.utils.scales import ScaleSchedule


@dataclass
class Selection:
    """A policy's decision for one layer: ``keep [B, H, P]`` over the candidates, optionally the new accumulated
    scores ``[B, H, P]`` of every candidate (carried along for the kept ones) and replacement K/V values
    ``[B, H, P, D]`` of the candidates (merging policies; only the kept entries are read)."""

    keep_BHP: torch.Tensor
    scores_BHP: torch.Tensor | None = None
    k_BHPD: torch.Tensor | None = None
    v_BHPD: torch.Tensor | None = None


@dataclass
class NewTokens:
    """The ``n`` tokens a forward pass wrote at sequence positions ``[start, start + n)``: K/V ``[B, H, n, D]``."""

    k_BHnD: torch.Tensor
    v_BHnD: torch.Tensor
    start: int

    @property
    def n(self) -> int:
        return self.k_BHnD.shape[2]


@dataclass
class SelectionContext:
    """What a policy sees when one layer has attended over its cache plus ``n`` new tokens.

    Candidates are ``[B, H, P]``, ``P = max_prefix + n``: padded prefix rows first, then the ``n`` new tokens.
    """

    layer: int
    start: int                      # sequence position of the first new token
    n_cur: int
    scale: float                    # logit scale the attention used
    q_BHnD: torch.Tensor
    k_cand_BHPD: torch.Tensor
    valid_BHP: torch.Tensor
    pos_BHP: torch.Tensor           # sequence position of each candidate (-1 where invalid)
    max_prefix: int
    acc_scores_BHP: torch.Tensor | None = None
    schedule: ScaleSchedule | None = None  # the model's scales (None: writes are not known to be scales)
    v_pre_BHPD: torch.Tensor | None = field(default=None, repr=False)
    v_cur_BHnD: torch.Tensor | None = field(default=None, repr=False)
    _scale_index: int | None = field(default=None, repr=False)

    @property
    def v_cand_BHPD(self) -> torch.Tensor:
        """Values of the candidates ``[B, H, P, D]`` (built on demand: only merging policies need them)."""
        return torch.cat((self.v_pre_BHPD.to(self.v_cur_BHnD.dtype), self.v_cur_BHnD), dim=2)

    @property
    def is_current_BHP(self) -> torch.Tensor:
        return self.pos_BHP >= self.start

    @property
    def key_len_BH(self) -> torch.Tensor:
        return self.valid_BHP.sum(-1)

    @property
    def scale_index(self) -> int | None:
        """Index of the scale being written, when the write is exactly one scale of ``schedule``."""
        if self._scale_index is None and self.schedule is not None:
            self._scale_index = self.schedule.scale_index(self.start, self.n_cur)
        return self._scale_index

    @property
    def grid(self) -> int | None:
        """Side of the current square token map (None when the write is not one scale or the scale is not square)."""
        si = self.scale_index
        pn = None if si is None else self.schedule.patch_nums[si]
        return None if isinstance(pn, tuple) else pn

    def observation_scores(self, query_idx: torch.Tensor, *, softmax: bool = True) -> torch.Tensor:
        """Sum over the selected current queries of their attention to each candidate: ``[B, H, P]`` fp32.

        ``softmax=True`` sums attention probabilities (SnapKV, H2O, HACK, ScaleKV paper); ``False`` sums raw
        logits. Invalid candidates get ``-inf``.
        """
        q = self.q_BHnD[:, :, query_idx].float()
        logits = q @ self.k_cand_BHPD.float().transpose(-1, -2) * self.scale  # [B, H, W, P]
        logits = logits.masked_fill(~self.valid_BHP.unsqueeze(2), float("-inf"))
        scores = logits.softmax(-1).sum(2) if softmax else logits.sum(2)
        return scores.masked_fill(~self.valid_BHP, float("-inf"))
