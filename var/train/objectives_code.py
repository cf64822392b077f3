"""CoDe's optional "specialized fine-tuning" objectives (the paper's training code is unreleased).

* Drafter: cross-entropy against the ground-truth tokens of the drafted scales ``0 .. N-1`` only; the forward
  pass stops after those scales (block-causal teacher forcing makes the prefix exact).
* Refiner: distillation from a larger frozen VAR teacher, ``KL(p_refiner || p_teacher)`` per token (the paper's
  direction; ``direction="forward"`` gives ``KL(p_teacher || p_refiner)``), weighted by ``early_weight`` on the
  drafted scales and 1 on the refined ones. The paper decays ``early_weight`` linearly from 1 to 0 over the
  fine-tuning run: :func:`linear_decay`.

A batch is a dict made by :func:`make_batch`: ``labels [B]`` (class dropout already applied by the trainer),
``x_BLCv_wo_first [B, L-1, Cvae]`` (the tokenizer's teacher-forcing inputs) and ``targets_BL [B, L]``.
Both losses are means over the ``B * L`` (or ``B * L_N``) tokens. :class:`CoDeDrafterObjective` and
:class:`CoDeRefinerObjective` wrap them for :mod:`var.train.trainer` (batch ``(images | tokens, labels)``, class
dropout, the early-weight decay driven by ``after_step``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from var.errors import ConfigError


@torch.no_grad()
def make_batch(tokenizer, labels_B: torch.Tensor, idx_list: Sequence[torch.Tensor]) -> dict:
    """Ground-truth index maps (one ``[B, pn, pn]`` per scale) -> the batch dict the objectives take."""
    return {"labels": labels_B,
            "x_BLCv_wo_first": tokenizer.teacher_forcing_input(idx_list),
            "targets_BL": torch.cat([idx.reshape(idx.shape[0], -1) for idx in idx_list], dim=1)}


def linear_decay(step: int, total_steps: int) -> float:
    """The refiner's early-scale weight: 1 at step 0, 0 at ``total_steps``."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    return max(0.0, 1.0 - step / total_steps)


def _num_tokens(model, num_scales: int) -> int:
    if not 0 < num_scales <= len(model.config.patch_nums):
        raise ConfigError(f"num_scales must be in [1, {len(model.config.patch_nums)}], got {num_scales}")
    return model.schedule.tokens_through(num_scales - 1)


def prefix_logits(model, batch: dict, num_scales: int) -> torch.Tensor:
    """Teacher-forced logits ``[B, L_n, V]`` of the first ``num_scales`` scales, running only those tokens."""
    L = _num_tokens(model, num_scales)
    cond_BD = model.class_condition(batch["labels"])
    x_BLC = torch.cat((cond_BD.unsqueeze(1) + model.pos_start,
                       model.word_embed(batch["x_BLCv_wo_first"][:, :L - 1].float())), dim=1)
    x_BLC = x_BLC + model.lvl_embed(model.lvl_1L[:, :L]) + model.pos_1LC[:, :L]
    h_BLC = model.forward_blocks(x_BLC, cond_BD, attn_bias=model.attn_bias_for_masking[:, :, :L, :L])
    return model.logits(h_BLC, cond_BD)


def drafter_loss(drafter, batch: dict, *, draft_steps: int) -> torch.Tensor:
    """Mean cross-entropy over the tokens of scales ``0 .. draft_steps - 1``."""
    logits_BLV = prefix_logits(drafter, batch, draft_steps)
    targets_BL = batch["targets_BL"][:, :logits_BLV.shape[1]]
    return F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten())


def refiner_distill_loss(refiner, teacher, batch: dict, *, draft_steps: int, early_weight: float = 1.0,
                         direction: str = "reverse", temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL between the refiner and a frozen teacher over all scales (teacher under no_grad).

    ``direction="reverse"``: ``KL(p_refiner || p_teacher)``; ``"forward"``: ``KL(p_teacher || p_refiner)``.
    Tokens of scales ``< draft_steps`` are weighted by ``early_weight``, the others by 1; the sum is divided by the
    number of tokens.
    """
    if direction not in ("reverse", "forward"):
        raise ConfigError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    if not early_weight >= 0:
        raise ConfigError(f"early_weight must be >= 0, got {early_weight}")
    if tuple(refiner.config.patch_nums) != tuple(teacher.config.patch_nums):
        raise ConfigError("refiner and teacher must share the tokenizer's scales")
    num_scales = len(refiner.config.patch_nums)
    with torch.no_grad():
        teacher_logp = F.log_softmax(prefix_logits(teacher, batch, num_scales) / temperature, dim=-1)
    student_logp = F.log_softmax(prefix_logits(refiner, batch, num_scales) / temperature, dim=-1)
    if direction == "reverse":
        kl_BL = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    else:
        kl_BL = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    weights_L = torch.ones(kl_BL.shape[1], device=kl_BL.device)
    if draft_steps > 0:
        weights_L[:_num_tokens(refiner, draft_steps)] = early_weight
    return (kl_BL * weights_L).mean()


# ---- adapters for var.train.trainer (``loss, metrics = objective(model, batch)``) ----------------------------------
from var.train.objectives import Objective, drop_labels, split_scales, unwrap  # noqa: E402


class _CoDeObjective(Objective):
    """Shared batch handling: ``batch = (images [B, 3, S, S] | tokens [B, L] int64, labels [B])`` like
    :class:`var.train.objectives.VARObjective`, with class dropout for CFG from the objective's generator."""

    def __init__(self, tokenizer, *, draft_steps: int, cond_drop_rate: float | None = None, seed: int = 0):
        super().__init__(seed)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.draft_steps, self.cond_drop_rate = draft_steps, cond_drop_rate

    def batch_dict(self, model, batch) -> dict:
        inputs, labels = batch
        core = unwrap(model)
        with torch.no_grad():
            idx_list = (split_scales(inputs, self.tokenizer.patch_nums) if inputs.dtype == torch.long
                        else self.tokenizer.encode(inputs))
        rate = core.config.cond_drop_rate if self.cond_drop_rate is None else self.cond_drop_rate
        return make_batch(self.tokenizer, drop_labels(labels, rate, core.null_class, self.generator), idx_list)


class CoDeDrafterObjective(_CoDeObjective):
    """Trainer objective for the drafter: :func:`drafter_loss` on the first ``draft_steps`` scales."""

    def forward(self, model, batch):
        loss = drafter_loss(unwrap(model), self.batch_dict(model, batch), draft_steps=self.draft_steps)
        return loss, {"ce_drafted": loss.item()}


class CoDeRefinerObjective(_CoDeObjective):
    """Trainer objective for the refiner: :func:`refiner_distill_loss` from a frozen ``teacher`` VAR, with the
    early-scale weight decaying linearly from 1 to 0 over ``decay_steps`` optimizer steps (``after_step``)."""

    def __init__(self, tokenizer, teacher, *, draft_steps: int, decay_steps: int, direction: str = "reverse",
                 cond_drop_rate: float | None = None, seed: int = 0):
        super().__init__(tokenizer, draft_steps=draft_steps, cond_drop_rate=cond_drop_rate, seed=seed)
        linear_decay(0, decay_steps)  # validates decay_steps
        self.teacher = teacher.eval().requires_grad_(False)
        self.decay_steps, self.direction, self.step = decay_steps, direction, 0

    def forward(self, model, batch):
        weight = linear_decay(self.step, self.decay_steps)
        loss = refiner_distill_loss(unwrap(model), self.teacher, self.batch_dict(model, batch),
                                    draft_steps=self.draft_steps, early_weight=weight, direction=self.direction)
        return loss, {"kl": loss.item(), "early_weight": weight}

    def after_step(self, step: int) -> dict:
        self.step = step + 1
        return {}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "step": self.step}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.step = state.get("step", 0)
